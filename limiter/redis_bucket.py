"""Token buckets on Redis: one atomic Lua check-and-consume per request, on the server clock.

Two front ends share the script and its argument encoding:

- `RedisBucket` (asyncio): `await bucket.check(keys, specs, cost)`. Every check arriving in the
  same event-loop turn goes out in ONE pipelined round trip (each check still its own atomic
  EVALSHA inside the pipeline, so the semantics are exactly those of one call per check).
- `SyncRedisBucket`: `check(keys, specs, cost)` per call and `check_many(requests)`, many checks
  in one pipelined round trip.

Both return `(allowed, [Decision per key])`, raise `BucketError` for bad input before touching
Redis (a cost above a capacity could never pass), and wrap every Redis failure in
`RedisUnavailable`. A check that failed or timed out is never sent again (it may have run);
only a check the server answered with NOSCRIPT (so it did not run) is resent, after loading the
script once. After a connection failure or timeout the bucket stops calling Redis for a short,
growing back-off window in which checks fail at once, so callers fall back immediately and a
dead Redis sees a trickle of probes rather than a reconnect storm.

Keys of one check must share a Redis Cluster hash tag (`rp:{TIER}:c:CLIENT` with `rp:{TIER}:tier`),
so the cluster clients of redis-py (`RedisCluster`, `redis.asyncio.RedisCluster`) work as well.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any, NamedTuple

import hiredis
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
import redis.retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from limiter.backoff import Backoff
from limiter.bucket import MICRO, BucketError, BucketSpec, Decision, validate_cost
from limiter.errors import RedisUnavailable

__all__ = [
    "SCRIPT",
    "SCRIPT_SHA",
    "CheckRequest",
    "RedisBucket",
    "ScriptResult",
    "SyncRedisBucket",
    "make_async_client",
    "make_sync_client",
]

SCRIPT: str = resources.files("limiter.lua").joinpath("token_bucket.lua").read_text()
SCRIPT_SHA: str = hashlib.sha1(SCRIPT.encode()).hexdigest()
DEFAULT_TIMEOUT_S = 0.005  # per call: a limiter that waits longer than this had better fall back

# Failures after which Redis is presumed unreachable (back off); other RedisErrors (a script
# error, OOM, WRONGTYPE) fail only the check that met them.
_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError, asyncio.TimeoutError)


class ScriptResult(NamedTuple):
    """The script's raw answer: allowed, server time µs, per key (tokens µt, retry µs, reset µs)."""

    allowed: bool
    now_us: int
    buckets: list[tuple[int, int, int]]


class CheckRequest(NamedTuple):
    """One check of a batch: the bucket keys (one hash tag), their specs, and the cost in tokens."""

    keys: Sequence[str]
    specs: Sequence[BucketSpec]
    cost: float


_ARGS_CACHE_LIMIT = 10_000
_args_cache: dict[tuple[float, float, float], tuple[bytes, bytes, bytes]] = {}


def _bucket_args(spec: BucketSpec, cost: float) -> tuple[bytes, bytes, bytes]:
    """ARGV of one bucket: rate (repr round-trips to the same double in Lua), capacity µt, cost µt.

    Cached per (spec, cost): a limiter sees few distinct ones, and validation runs once each.
    """
    cache_key = (spec.rate, spec.capacity, cost)  # a plain tuple hashes faster than the dataclass
    cached = _args_cache.get(cache_key)
    if cached is None:
        cost_ut = validate_cost(cost, spec)  # raises BucketError: nothing cached, nothing sent
        if len(_args_cache) >= _ARGS_CACHE_LIMIT:
            _args_cache.clear()
        cached = (repr(spec.rate).encode(), str(spec.capacity_ut).encode(), str(cost_ut).encode())
        _args_cache[cache_key] = cached
    return cached


def encode_check(keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> list[Any]:
    """The EVALSHA command for one check; raises BucketError on bad input (nothing is sent)."""
    if not keys or len(keys) != len(specs):
        raise BucketError(f"a check needs one spec per key and at least one key, got {len(keys)} keys, {len(specs)} specs")
    command: list[Any] = ["EVALSHA", SCRIPT_SHA, len(keys), *keys]
    for spec in specs:
        command += _bucket_args(spec, cost)
    return command


def decode_reply(reply: Any) -> ScriptResult:
    """ScriptResult from the script's flat integer array."""
    return ScriptResult(
        reply[0] == 1,
        reply[1],
        [(reply[i], reply[i + 1], reply[i + 2]) for i in range(2, len(reply), 3)],
    )


def to_decisions(reply: Any, specs: Sequence[BucketSpec]) -> tuple[bool, list[Decision]]:
    """(allowed, one Decision per key) from the script's flat integer array."""
    allowed = reply[0] == 1
    if len(reply) != 2 + 3 * len(specs):
        raise RedisUnavailable(f"unexpected script reply for {len(specs)} keys: {reply!r}")
    if len(specs) == 1:  # the common shapes without the generic loop: this runs once per request
        spec = specs[0]
        return allowed, [Decision(allowed, reply[2] / MICRO, reply[3] / MICRO, reply[4] / MICRO, spec.capacity, "redis")]
    if len(specs) == 2:
        first, second = specs
        return allowed, [
            Decision(allowed, reply[2] / MICRO, reply[3] / MICRO, reply[4] / MICRO, first.capacity, "redis"),
            Decision(allowed, reply[5] / MICRO, reply[6] / MICRO, reply[7] / MICRO, second.capacity, "redis"),
        ]
    return allowed, [
        Decision(allowed, reply[i] / MICRO, reply[i + 1] / MICRO, reply[i + 2] / MICRO, spec.capacity, "redis")
        for i, spec in zip(range(2, 2 + 3 * len(specs), 3), specs, strict=True)
    ]


def _no_retry(asyncio_client: bool) -> Any:
    """A Retry policy that never resends (the asyncio clients need their own Retry class)."""
    if asyncio_client:
        return redis.asyncio.retry.Retry(NoBackoff(), 0)
    return redis.retry.Retry(NoBackoff(), 0)


def _check_no_retries(client: Any) -> None:
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


class SyncRedisBucket:
    """Blocking check-and-consume on Redis, per call or many per round trip (benchmarks, scripts)."""

    def __init__(self, client: Any, backoff: Backoff | None = None):
        _check_no_retries(client)
        self.client = client
        self.backoff = backoff or Backoff()
        self.script_loads = 0  # how many times this bucket sent SCRIPT LOAD

    @classmethod
    def from_url(cls, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, cluster: bool = False) -> SyncRedisBucket:
        """A bucket on a new client for `url` (`cluster=True` for a Redis Cluster seed node)."""
        return cls(make_sync_client(url, timeout_s, cluster))

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()

    def load_script(self) -> None:
        """SCRIPT LOAD (on every primary of a cluster); done lazily on the first NOSCRIPT anyway."""
        try:
            self.client.script_load(SCRIPT)
        except _CONNECTION_ERRORS as error:
            self.backoff.failure()
            raise RedisUnavailable(f"redis unreachable: {error}") from error
        except RedisError as error:
            raise RedisUnavailable(f"redis refused SCRIPT LOAD: {error}") from error
        self.script_loads += 1

    def check(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> tuple[bool, list[Decision]]:
        """Consume `cost` tokens from every bucket of `keys` if all hold it; one Decision per key."""
        return to_decisions(self._call(encode_check(keys, specs, cost)), specs)

    def check_raw(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> ScriptResult:
        """Like check(), but the script's integer answer, server time included (tests, tools)."""
        return decode_reply(self._call(encode_check(keys, specs, cost)))

    def check_many(self, requests: Sequence[CheckRequest | tuple[Any, Any, float]]) -> list[tuple[bool, list[Decision]]]:
        """Check many requests in one pipelined round trip, each atomically, in order.

        Every request is validated before anything is sent. If Redis fails any of them this
        raises RedisUnavailable for the whole batch (the others may have been charged).
        """
        return [to_decisions(reply, request[1]) for reply, request in zip(self._call_many(requests), requests, strict=True)]

    def check_many_raw(self, requests: Sequence[CheckRequest | tuple[Any, Any, float]]) -> list[ScriptResult]:
        """Like check_many(), but the scripts' integer answers."""
        return [decode_reply(reply) for reply in self._call_many(requests)]

    def _call(self, command: list[Any]) -> Any:
        if self.backoff.blocked():
            raise RedisUnavailable(f"redis backing off for {self.backoff.remaining_s:.3f} s after a failure")
        try:
            try:
                reply = self.client.execute_command(*command)
            except NoScriptError:
                self.load_script()
                reply = self.client.execute_command(*command)  # NOSCRIPT: it did not run, safe to send
        except _CONNECTION_ERRORS as error:
            self.backoff.failure()
            raise RedisUnavailable(f"redis unreachable: {error}") from error
        except RedisError as error:
            raise RedisUnavailable(f"redis refused the check: {error}") from error
        self.backoff.success()
        return reply

    def _call_many(self, requests: Sequence[CheckRequest | tuple[Any, Any, float]]) -> list[Any]:
        commands = [encode_check(*request) for request in requests]  # all validated before anything is sent
        if not commands:
            return []
        if self.backoff.blocked():
            raise RedisUnavailable(f"redis backing off for {self.backoff.remaining_s:.3f} s after a failure")
        try:
            replies = self._pipeline(commands)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                self.load_script()
                for i, reply in zip(missing, self._pipeline([commands[i] for i in missing]), strict=True):
                    replies[i] = reply
        except _CONNECTION_ERRORS as error:
            self.backoff.failure()
            raise RedisUnavailable(f"redis unreachable: {error}") from error
        except RedisError as error:
            raise RedisUnavailable(f"redis refused the checks: {error}") from error
        for reply in replies:
            if isinstance(reply, Exception):
                raise RedisUnavailable(f"redis refused a check: {reply}") from reply
        self.backoff.success()
        return replies

    def _pipeline(self, commands: list[list[Any]]) -> list[Any]:
        """One round trip; error replies come back as exception objects in place."""
        if not isinstance(self.client, redis.Redis):  # a cluster client routes each command to its node
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(pipe.execute(raise_on_error=False))
        # Single Redis: pack with hiredis and read the replies straight off one pooled connection
        # (redis-py's pipeline spends more per command than the script costs the server).
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([b"".join(map(_pack, commands))], check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except ResponseError as error:
                    replies.append(error)
        except BaseException:
            connection.disconnect()  # replies may be left unread: never reuse it as is
            raise
        finally:
            pool.release(connection)
        return replies


class _Pending(NamedTuple):
    command: list[Any]
    future: asyncio.Future[Any]


class RedisBucket:
    """Asyncio check-and-consume on Redis that coalesces the checks of one event-loop turn.

    `await check(keys, specs, cost)` returns `(allowed, [Decision per key])` or raises
    `RedisUnavailable` within `timeout_s` (measured from when the check was asked), or
    `BucketError` at once for bad input. At most `max_in_flight` pipelines are outstanding;
    checks arriving meanwhile gather into the next one (a bigger batch, fewer syscalls).
    """

    def __init__(
        self,
        client: Any,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_in_flight: int = 2,
        backoff: Backoff | None = None,
    ):
        if not (timeout_s > 0) or max_in_flight < 1:
            raise ValueError("timeout_s must be positive and max_in_flight at least 1")
        _check_no_retries(client)
        self.client = client
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.backoff = backoff or Backoff()
        self.script_loads = 0  # SCRIPT LOADs sent (once per NOSCRIPT episode, not per check)
        self.round_trips = 0  # pipelines sent to Redis
        self._pending: list[_Pending] = []
        self._pending_deadline = 0.0
        self._flush_scheduled = False
        self._in_flight = 0
        self._script_epoch = 0  # bumped by every SCRIPT LOAD
        self._loading: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        single = isinstance(client, redis.asyncio.Redis)
        self._connections: list[Any] | None = [] if single else None  # idle own connections (single Redis)
        self._all_connections: list[Any] = []

    @classmethod
    def from_url(
        cls, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, cluster: bool = False, **options: Any
    ) -> RedisBucket:
        """A bucket on a new asyncio client for `url` (`cluster=True` for a Redis Cluster seed node)."""
        return cls(make_async_client(url, timeout_s, cluster), timeout_s=timeout_s, **options)

    async def warm_up(self, timeout_s: float = 1.0) -> None:
        """Load the script and open the connections now, so the first checks need no connect.

        Call it at start-up (a cold connect alone can exceed a 5 ms check timeout). Raises
        RedisUnavailable when Redis cannot be reached within `timeout_s`; checks then fail
        over as usual and connect later.
        """
        try:
            async with asyncio.timeout(timeout_s):
                await self.client.script_load(SCRIPT)
                self.script_loads += 1
                self._script_epoch += 1
                if self._connections is not None:
                    while len(self._all_connections) < self.max_in_flight:
                        connection = self._new_connection()
                        self._connections.append(connection)  # kept even if connect fails: reconnects on use
                        await connection.connect()
                elif hasattr(self.client, "initialize"):
                    await self.client.initialize()  # cluster: discover the slots of every node
        except (*_CONNECTION_ERRORS, RedisError) as error:
            raise RedisUnavailable(f"redis not reachable at warm-up: {error!r}") from error

    async def aclose(self) -> None:
        """Wait for outstanding pipelines, then close the client's connections."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for connection in self._all_connections:
            await connection.disconnect()
        await self.client.aclose()

    async def check(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> tuple[bool, list[Decision]]:
        """Consume `cost` tokens from every bucket of `keys` if all hold it; one Decision per key."""
        reply = await self._submit(encode_check(keys, specs, cost))
        return to_decisions(reply, specs)

    async def check_raw(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> ScriptResult:
        """Like check(), but the script's integer answer, server time included (tests, tools)."""
        return decode_reply(await self._submit(encode_check(keys, specs, cost)))

    def _submit(self, command: list[Any]) -> asyncio.Future[Any]:
        if self.backoff.blocked():
            raise RedisUnavailable(f"redis backing off for {self.backoff.remaining_s:.3f} s after a failure")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            self._pending_deadline = loop.time() + self.timeout_s
        self._pending.append(_Pending(command, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """End of the turn: send what gathered, unless enough pipelines are already out."""
        self._flush_scheduled = False
        if not self._pending or self._in_flight >= self.max_in_flight:
            return
        batch, deadline = self._pending, self._pending_deadline
        self._pending = []
        if self.backoff.blocked():  # a pipeline failed while these waited: they were never sent
            _fail(batch, "redis backing off after a failure")
            return
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(batch, deadline))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Pending], deadline: float) -> None:
        try:
            if asyncio.get_running_loop().time() >= deadline:  # a busy loop, not Redis: no back-off
                _fail(batch, f"checks waited longer than {self.timeout_s:g} s before they could be sent")
                return
            async with asyncio.timeout_at(deadline):
                replies = await self._execute([item.command for item in batch])
        except _CONNECTION_ERRORS as error:
            self.backoff.failure()
            _fail(batch, f"redis unreachable or slower than {self.timeout_s:g} s: {error!r}")
        except (RedisError, RedisUnavailable) as error:
            _fail(batch, f"redis refused the checks: {error}")
        except BaseException as error:  # cancelled: the callers must not hang
            _fail(batch, f"check abandoned: {error!r}")
            raise
        else:
            self.backoff.success()
            for item, reply in zip(batch, replies, strict=True):
                if item.future.done():
                    continue
                if isinstance(reply, Exception):
                    item.future.set_exception(RedisUnavailable(f"redis refused the check: {reply}"))
                else:
                    item.future.set_result(reply)
        finally:
            self._in_flight -= 1
            if self._pending and not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def _execute(self, commands: list[list[Any]]) -> list[Any]:
        """Send the batch; on NOSCRIPT load the script once and resend only those (they did not run)."""
        epoch = self._script_epoch
        replies = await self._pipeline(commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await self._reload(epoch)
            for i, reply in zip(missing, await self._pipeline([commands[i] for i in missing]), strict=True):
                replies[i] = reply
        return replies

    async def _reload(self, seen_epoch: int) -> None:
        """Load the script unless another pipeline did since `seen_epoch`; concurrent callers share one load."""
        if self._script_epoch != seen_epoch:
            return
        if self._loading is not None:
            await asyncio.shield(self._loading)
            return
        self._loading = loading = asyncio.get_running_loop().create_future()
        try:
            await self.client.script_load(SCRIPT)
            self.script_loads += 1
            self._script_epoch += 1
            loading.set_result(None)
        except BaseException as error:
            loading.set_exception(RedisUnavailable(f"SCRIPT LOAD failed: {error!r}"))
            loading.exception()  # marked retrieved: waiters (if any) still get it
            raise
        finally:
            self._loading = None

    async def _pipeline(self, commands: list[list[Any]]) -> list[Any]:
        """One round trip; error replies come back as exception objects in place."""
        self.round_trips += 1
        if self._connections is None:  # a cluster client routes each command to its slot's node
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))
        # Single Redis: our own connections, one per pipeline in flight. redis-py's pool and
        # pipeline add per-batch locks, health checks and bookkeeping that cost more than the
        # round trip itself at the batch sizes of one event-loop turn.
        connection = self._connections.pop() if self._connections else self._new_connection()
        try:
            await connection.send_packed_command(b"".join(map(_pack, commands)), check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as error:
                    replies.append(error)
        except BaseException:
            await connection.disconnect(nowait=True)  # replies may be left unread: never reuse it as is
            raise
        finally:
            self._connections.append(connection)
        return replies

    def _new_connection(self) -> Any:
        """A connection like the client's, without a per-read timeout (the batch deadline bounds it)."""
        kwargs = {**self.client.connection_pool.connection_kwargs, "socket_timeout": None}
        connection = self.client.connection_pool.connection_class(**kwargs)
        self._all_connections.append(connection)
        return connection


def _pack(command: list[Any]) -> bytes:
    """RESP bytes of one command (hiredis' packer: C, no per-argument Python)."""
    return bytes(hiredis.pack_command(tuple(command)))


def _fail(batch: list[_Pending], message: str) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(RedisUnavailable(message))

