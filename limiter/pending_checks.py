"""A check waiting for Redis, and how its outcome reaches the caller: its future, or its resolver.

Shared by the single-Redis and the cluster paths of `RedisBucket`. Every queued check is settled
exactly once, with its outcome or a `RedisUnavailable`; a resolver that raises is logged (throttled)
and its request still gets an answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from limiter.check_encoding import EncodedCheck, RawOutcome
from limiter.errors import RedisUnavailable
from limiter.throttled_log import ThrottledLog

__all__ = ["Pending", "Resolver", "fail", "resolver_failed", "settle"]

log = logging.getLogger("ratepilot.redis_bucket")

# What a caller of RedisBucket.submit_to() gets per check instead of a future result: (future, its
# context, the outcome or the RedisUnavailable the check met). It settles the future itself and must not raise.
Resolver = Callable[[asyncio.Future[Any], Any, "RawOutcome | RedisUnavailable"], None]

# A queued check: (check, future, resolver, context). A plain tuple, one per request (cheaper to build
# than a NamedTuple); resolver None means the future gets the outcome (result) or the error (exception).
Pending = tuple[EncodedCheck, "asyncio.Future[Any]", "Resolver | None", Any]

_resolver_errors = ThrottledLog("settling a check failed", logger=log)


def settle(item: Pending, outcome: RawOutcome | RedisUnavailable) -> None:
    """Hand one check's outcome (or the error it met) to its future, or to its resolver."""
    _, future, resolve, context = item
    if future.done():
        return
    if resolve is None:
        if type(outcome) is tuple:
            future.set_result(outcome)
        else:
            future.set_exception(outcome)  # type: ignore[arg-type]
        return
    try:
        resolve(future, context, outcome)
    except Exception as error:
        resolver_failed(item, error)


def fail(batch: list[Pending], message: str) -> None:
    """Settle every check of `batch` with RedisUnavailable(message)."""
    for item in batch:
        settle(item, RedisUnavailable(message))


def resolver_failed(item: Pending, error: Exception) -> None:
    """A resolver raised on an outcome (a bug, or a reply it could not read): its request still gets an
    answer (the resolver's failure path, else the error itself), and the checks after it in the reply
    are settled as usual; a hung request would wait forever, its batch already counted as answered."""
    _, future, resolve, context = item
    _resolver_errors.error(error)
    if future.done() or resolve is None:
        return
    failure = RedisUnavailable(f"could not settle the check: {error!r:.200}")
    try:
        resolve(future, context, failure)
    except Exception:
        if not future.done():
            future.set_exception(failure)
