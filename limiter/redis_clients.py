"""redis-py clients for the buckets, the failures that count as "Redis unreachable", and the one
place that handles a missing script (NOSCRIPT): load it and resend what did not run.

A client must never resend a command on its own: a check that failed or timed out may have run
(and consumed tokens), so only a check the server answered with NOSCRIPT is ever sent again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import hiredis
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
import redis.retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

__all__ = [
    "CONNECTION_ERRORS",
    "DEFAULT_TIMEOUT_S",
    "check_no_retries",
    "is_noscript",
    "make_async_client",
    "make_sync_client",
    "resend_noscript",
    "run_blocking",
]

DEFAULT_TIMEOUT_S = 0.005  # per call: a limiter that waits longer than this had better fall back

# Failures after which Redis is presumed unreachable (back off); other RedisErrors (a script
# error, OOM, WRONGTYPE) fail only the check that met them.
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError, asyncio.TimeoutError)

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def _no_retry(asyncio_client: bool) -> Any:
    """A Retry policy that never resends (the asyncio clients need their own Retry class)."""
    if asyncio_client:
        return redis.asyncio.retry.Retry(NoBackoff(), 0)
    return redis.retry.Retry(NoBackoff(), 0)


def check_no_retries(client: Any) -> None:
    """Refuse a client that would silently resend a timed-out command (it may have run)."""
    retry = getattr(client, "retry", None)
    if retry is None and hasattr(client, "get_retry"):
        retry = client.get_retry()
    if retry is not None and retry.get_retries() > 0:
        raise ValueError(
            "the Redis client retries failed commands, which could consume tokens twice; build it with "
            "retry=Retry(NoBackoff(), 0) or use RedisBucket.from_url / SyncRedisBucket.from_url"
        )


def make_sync_client(url: str, timeout_s: float = DEFAULT_TIMEOUT_S, cluster: bool = False) -> Any:
    """A redis-py client (hiredis parser when installed) with the per-call timeout and no retries."""
    options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "retry": _no_retry(asyncio_client=False)}
    if cluster:
        return redis.cluster.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def make_async_client(url: str, timeout_s: float = DEFAULT_TIMEOUT_S, cluster: bool = False) -> Any:
    """An asyncio redis-py client (hiredis parser when installed) with the per-call timeout and no retries."""
    options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "retry": _no_retry(asyncio_client=True)}
    if cluster:
        return redis.asyncio.cluster.RedisCluster.from_url(url, **options)
    return redis.asyncio.Redis.from_url(url, **options)


def is_noscript(reply: Any) -> bool:
    """True for the error reply of a server that does not have the script (the command did not run)."""
    if isinstance(reply, NoScriptError):  # redis-py's clients
        return True
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")  # PipelinedConnection


async def resend_noscript(
    items: Sequence[_Item],
    send: Callable[[list[_Item]], Awaitable[list[Any]]],
    load: Callable[[], Awaitable[None]],
) -> list[Any]:
    """`send(items)` (one reply per item, error replies in place); the items answered NOSCRIPT did not
    run, so load the script once and send only those again. Their second replies stand, whatever they are."""
    replies = await send(list(items))
    missing = [i for i, reply in enumerate(replies) if is_noscript(reply)]
    if missing:
        await load()
        for i, reply in zip(missing, await send([items[i] for i in missing]), strict=True):
            replies[i] = reply
    return replies


def run_blocking(coroutine: Coroutine[Any, Any, _Result]) -> _Result:
    """The result of a coroutine that never suspends (every call it awaits blocks instead): lets the
    blocking bucket share `resend_noscript` with the asyncio one."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("run_blocking() needs a coroutine that does not suspend")
