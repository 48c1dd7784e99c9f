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
import threading
from collections.abc import Sequence
from importlib import resources
from math import ceil
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
from limiter.bucket import MICRO, BucketError, BucketSpec, Decision, decision_from, validate_cost, wait_us
from limiter.errors import RedisUnavailable

__all__ = [
    "SCRIPT",
    "SCRIPT_SHA",
    "CheckRequest",
    "EncodedCheck",
    "RedisBucket",
    "ScriptResult",
    "decisions_from_tokens",
    "encode_check",
    "result_decisions",
    "SyncRedisBucket",
    "make_async_client",
    "make_sync_client",
]

SCRIPT: str = resources.files("limiter.lua").joinpath("token_bucket.lua").read_text()
SCRIPT_SHA: str = hashlib.sha1(SCRIPT.encode()).hexdigest()
_SHA_BYTES = SCRIPT_SHA.encode()
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


class _BucketArgs(NamedTuple):
    """One bucket of a check: its ARGV bytes and the numbers the reply is decoded with."""

    argv: tuple[bytes, bytes, bytes]
    rate: float
    capacity_ut: int
    cost_ut: int
    capacity: float


class EncodedCheck(NamedTuple):
    """A validated check, ready to go into a (batch) EVALSHA."""

    keys: Sequence[str]
    argv: list[bytes]  # key count, then rate, capacity µt, cost µt per key
    buckets: list[_BucketArgs]
    argv_resp: bytes = b""  # RESP bytes of argv (the same for every check of these specs and cost)


# What a check's reply decodes to before Decisions are built: (allowed, tokens µt per key, server µs).
RawOutcome = tuple[bool, list[int], int]

MAX_BATCH = 256  # checks per EVALSHA: bounds how long one script blocks the server
_ARGS_CACHE_LIMIT = 10_000
_args_cache: dict[tuple[float, float, float], _BucketArgs] = {}
_KEY_COUNTS = [str(n).encode() for n in range(17)]
_encoded_cache: dict[tuple[Any, ...], tuple[list[bytes], list[_BucketArgs], bytes]] = {}
_new_tuple = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (hot path)


def _resp(args: Sequence[bytes]) -> bytes:
    """RESP bulk strings of `args` (as hiredis.pack_command writes them)."""
    return b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args)


def _bucket_args(spec: BucketSpec, cost: float) -> _BucketArgs:
    """ARGV of one bucket: rate (repr round-trips to the same double in Lua), capacity µt, cost µt.

    Cached per (spec, cost): a limiter sees few distinct ones, and validation runs once each.
    """
    cache_key = (spec.rate, spec.capacity, cost)  # a plain tuple hashes faster than the dataclass
    cached = _args_cache.get(cache_key)
    if cached is None:
        cost_ut = validate_cost(cost, spec)  # raises BucketError: nothing cached, nothing sent
        if len(_args_cache) >= _ARGS_CACHE_LIMIT:
            _args_cache.clear()
        capacity_ut = spec.capacity_ut
        argv = (repr(spec.rate).encode(), str(capacity_ut).encode(), str(cost_ut).encode())
        cached = _BucketArgs(argv, spec.rate, capacity_ut, cost_ut, spec.capacity)
        _args_cache[cache_key] = cached
    return cached


def encode_check(keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> EncodedCheck:
    """One validated check; raises BucketError on bad input (nothing is sent)."""
    count = len(keys)
    if not count or count != len(specs):
        raise BucketError(f"a check needs one spec per key and at least one key, got {count} keys, {len(specs)} specs")
    if count == 2:  # client + tier bucket, the edge's case: a flat tuple key hashes fastest
        first, second = specs
        cache_key: tuple[Any, ...] = (cost, first.rate, first.capacity, second.rate, second.capacity)
    else:
        cache_key = (cost, *[(spec.rate, spec.capacity) for spec in specs])
    cached = _encoded_cache.get(cache_key)
    if cached is None:
        buckets = [_bucket_args(spec, cost) for spec in specs]  # raises BucketError: nothing cached
        argv = [_KEY_COUNTS[count] if count < len(_KEY_COUNTS) else str(count).encode()]
        for bucket in buckets:
            argv += bucket.argv
        if len(_encoded_cache) >= _ARGS_CACHE_LIMIT:
            _encoded_cache.clear()
        cached = _encoded_cache[cache_key] = (argv, buckets, _resp(argv))
    return _new_tuple(EncodedCheck, (keys, *cached))  # type: ignore[no-any-return]


def batch_command(checks: Sequence[EncodedCheck]) -> list[Any]:
    """The one EVALSHA that decides `checks` one after the other."""
    if len(checks) == 1:
        check = checks[0]
        return ["EVALSHA", SCRIPT_SHA, len(check.keys), *check.keys, *check.argv]
    keys = [key for check in checks for key in check.keys]
    return ["EVALSHA", SCRIPT_SHA, len(keys), *keys, *(arg for check in checks for arg in check.argv)]


def pack_batch(checks: Sequence[EncodedCheck]) -> bytes:
    """RESP bytes of `batch_command(checks)`, built from each check's cached ARGV bytes."""
    keys = [key.encode() for check in checks for key in check.keys]
    arg_count = sum(len(check.argv) for check in checks)
    head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (3 + len(keys) + arg_count, _SHA_BYTES)
    return b"".join((head, _resp((b"%d" % len(keys),)), _resp(keys), *[check.argv_resp for check in checks]))


def split_reply(reply: Any, checks: Sequence[EncodedCheck]) -> list[RawOutcome | RedisUnavailable]:
    """Per check (allowed, tokens µt per key, server µs), or the error that check met."""
    if not isinstance(reply, list) or not reply:
        return [RedisUnavailable(f"unexpected script reply: {reply!r:.200}")] * len(checks)
    now_us = reply[0]
    outcomes: list[RawOutcome | RedisUnavailable] = []
    at = 1
    for check in checks:
        head = reply[at] if at < len(reply) else None
        if not isinstance(head, int):
            outcomes.append(RedisUnavailable(f"redis refused the check: {head!r:.200}"))
            at += 1
            continue
        count = len(check.keys)
        tokens = reply[at + 1 : at + 1 + count]
        if len(tokens) != count:
            outcomes.append(RedisUnavailable(f"unexpected script reply for {count} keys: {reply!r:.200}"))
        else:
            outcomes.append((head == 1, tokens, now_us))
        at += 1 + count
    return outcomes


def decisions_from_tokens(allowed: bool, tokens: list[int], buckets: list[_BucketArgs]) -> list[Decision]:
    """One Decision per key; retry and reset are limiter.bucket.wait_us of the tokens, inlined (hot path)."""
    decisions = []
    for tokens_ut, bucket in zip(tokens, buckets, strict=True):
        rate = bucket.rate
        missing_ut = bucket.capacity_ut - tokens_ut
        reset_s = (ceil(missing_ut / rate) if missing_ut > 0 else 0) / MICRO
        if allowed:
            retry_s = 0.0
        else:
            missing_ut = bucket.cost_ut - tokens_ut
            retry_s = (ceil(missing_ut / rate) if missing_ut > 0 else 0) / MICRO
        decisions.append(_new_tuple(Decision, (allowed, tokens_ut / MICRO, retry_s, reset_s, bucket.capacity, "redis")))
    return decisions


def _script_result(outcome: RawOutcome, buckets: list[_BucketArgs]) -> ScriptResult:
    """The integer answer of one check, retry and reset computed with limiter.bucket.wait_us."""
    allowed, tokens, now_us = outcome
    return ScriptResult(
        allowed,
        now_us,
        [
            (t, 0 if allowed else wait_us(b.cost_ut - t, b.rate), wait_us(b.capacity_ut - t, b.rate))
            for t, b in zip(tokens, buckets, strict=True)
        ],
    )


def result_decisions(result: ScriptResult, specs: Sequence[BucketSpec], source: str = "redis") -> tuple[bool, list[Decision]]:
    """(allowed, one Decision per key) from a ScriptResult."""
    return result.allowed, [
        decision_from(result.allowed, bucket, spec, source) for bucket, spec in zip(result.buckets, specs, strict=True)
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
        self._connection: Any = None  # own connection (single Redis), made on first use
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, cluster: bool = False) -> SyncRedisBucket:
        """A bucket on a new client for `url` (`cluster=True` for a Redis Cluster seed node)."""
        return cls(make_sync_client(url, timeout_s, cluster))

    def close(self) -> None:
        """Close the bucket's and the client's connections."""
        with self._lock:
            if self._connection is not None:
                self._connection.disconnect()
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
        check = encode_check(keys, specs, cost)
        allowed, tokens, _ = self._one(check)
        return allowed, decisions_from_tokens(allowed, tokens, check.buckets)

    def check_raw(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> ScriptResult:
        """Like check(), but the integer answer, server time included (tests, tools)."""
        check = encode_check(keys, specs, cost)
        return _script_result(self._one(check), check.buckets)

    def check_many(self, requests: Sequence[CheckRequest | tuple[Any, Any, float]]) -> list[tuple[bool, list[Decision]]]:
        """Check many requests in one round trip, each atomically, in order.

        Every request is validated before anything is sent. If Redis fails any of them this
        raises RedisUnavailable for the whole batch (the others may have been charged).
        """
        checks = [encode_check(*request) for request in requests]  # all validated before anything is sent
        return [
            (allowed, decisions_from_tokens(allowed, tokens, check.buckets))
            for (allowed, tokens, _), check in zip(self._call_many(checks), checks, strict=True)
        ]

    def check_many_raw(self, requests: Sequence[CheckRequest | tuple[Any, Any, float]]) -> list[ScriptResult]:
        """Like check_many(), but the integer answers."""
        checks = [encode_check(*request) for request in requests]
        return [_script_result(outcome, check.buckets) for outcome, check in zip(self._call_many(checks), checks, strict=True)]

    def _one(self, check: EncodedCheck) -> RawOutcome:
        outcome = split_reply(self._call(batch_command([check])), [check])[0]
        if isinstance(outcome, RedisUnavailable):
            raise outcome
        return outcome

    def _call(self, command: list[Any]) -> Any:
        if self.backoff.blocked():
            raise RedisUnavailable(f"redis backing off for {self.backoff.remaining_s:.3f} s after a failure")
        try:
            if isinstance(self.client, redis.Redis):  # the lean path: about half the client time of execute_command
                reply = self._pipeline([command])[0]
                if isinstance(reply, NoScriptError):
                    self.load_script()
                    reply = self._pipeline([command])[0]  # NOSCRIPT: it did not run, safe to send
                if isinstance(reply, Exception):
                    raise reply
            else:
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

    def _call_many(self, checks: list[EncodedCheck]) -> list[RawOutcome]:
        if not checks:
            return []
        if self.backoff.blocked():
            raise RedisUnavailable(f"redis backing off for {self.backoff.remaining_s:.3f} s after a failure")
        groups = _groups(checks, batched=isinstance(self.client, redis.Redis))
        commands = [batch_command(group) for group in groups]
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
        outcomes: list[RawOutcome] = []
        for reply, group in zip(replies, groups, strict=True):
            if isinstance(reply, Exception):
                raise RedisUnavailable(f"redis refused a check: {reply}") from reply
            for outcome in split_reply(reply, group):
                if isinstance(outcome, RedisUnavailable):
                    raise outcome
                outcomes.append(outcome)
        self.backoff.success()
        return outcomes

    def _pipeline(self, commands: list[list[Any]]) -> list[Any]:
        """One round trip; error replies come back as exception objects in place."""
        if not isinstance(self.client, redis.Redis):  # a cluster client routes each command to its node
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(pipe.execute(raise_on_error=False))
        # Single Redis: pack with hiredis and read the replies straight off the bucket's own
        # connection (redis-py's pipeline, and its pool's get/release, cost more per call than the
        # script costs the server).
        with self._lock:
            connection = self._connection
            if connection is None:
                pool = self.client.connection_pool
                connection = self._connection = pool.connection_class(**pool.connection_kwargs)
            try:
                connection.send_packed_command([b"".join(map(_pack, commands))], check_health=False)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(connection.read_response())
                    except ResponseError as error:
                        replies.append(error)
            except BaseException:
                connection.disconnect()  # replies may be left unread: never reuse it as is (reconnects on use)
                raise
        return replies


class _Pending(NamedTuple):
    check: EncodedCheck
    future: asyncio.Future[RawOutcome]


class RedisBucket:
    """Asyncio check-and-consume on Redis that coalesces the checks of one event-loop turn.

    `await check(keys, specs, cost)` returns `(allowed, [Decision per key])` or raises
    `RedisUnavailable`, or `BucketError` at once for bad input. At most `max_in_flight` round trips
    are outstanding; checks arriving meanwhile gather into the next one (a bigger batch, fewer
    syscalls). On a single Redis the checks of one round trip go out as ONE EVALSHA that decides
    them one after the other.

    The timeout is meant for Redis, not for our own event loop (decision): a batch's deadline is
    `timeout_s` after it is sent, plus an allowance for loop lag equal to how long its checks
    waited to be sent (about one loop turn; the reply is read about one turn later too). Without
    it, a saturated edge (turns of several ms) timed out nearly every check against a healthy
    Redis and decided them on the local guard. Checks that waited longer than `max_lag_s` are
    failed unsent. A hung Redis is still noticed after `timeout_s` on an idle loop, and checks
    queued behind a timed-out round trip fail at once (back-off).
    """

    def __init__(
        self,
        client: Any,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_in_flight: int = 2,
        backoff: Backoff | None = None,
        max_lag_s: float = 0.05,
    ):
        if not (timeout_s > 0 and max_lag_s > 0) or max_in_flight < 1:
            raise ValueError("timeout_s and max_lag_s must be positive and max_in_flight at least 1")
        _check_no_retries(client)
        self.client = client
        self.timeout_s = timeout_s
        self.max_lag_s = max_lag_s
        self.max_in_flight = max_in_flight
        self.backoff = backoff or Backoff()
        self.script_loads = 0  # SCRIPT LOADs sent (once per NOSCRIPT episode, not per check)
        self.round_trips = 0  # pipelines sent to Redis
        self._pending: list[_Pending] = []
        self._pending_since = 0.0  # loop time the oldest pending check was asked
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
        check = encode_check(keys, specs, cost)
        allowed, tokens, _ = await self._submit(check)
        return allowed, decisions_from_tokens(allowed, tokens, check.buckets)

    async def check_raw(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> ScriptResult:
        """Like check(), but the integer answer, server time included (tests, tools)."""
        check = encode_check(keys, specs, cost)
        return _script_result(await self._submit(check), check.buckets)

    def _submit(self, check: EncodedCheck) -> asyncio.Future[RawOutcome]:
        if self.backoff.blocked():
            raise RedisUnavailable(f"redis backing off for {self.backoff.remaining_s:.3f} s after a failure")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            self._pending_since = loop.time()
        self._pending.append(_new_tuple(_Pending, (check, future)))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """End of the turn: send what gathered, unless enough pipelines are already out."""
        self._flush_scheduled = False
        if not self._pending or self._in_flight >= self.max_in_flight:
            return
        batch, since = self._pending, self._pending_since
        self._pending = []
        if self.backoff.blocked():  # a pipeline failed while these waited: they were never sent
            _fail(batch, "redis backing off after a failure")
            return
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(batch, since))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Pending], since: float) -> None:
        try:
            now = asyncio.get_running_loop().time()
            waited = now - since
            if waited > self.max_lag_s:  # a busy loop, not Redis: no back-off
                _fail(batch, f"checks waited {waited:.3f} s (more than {self.max_lag_s:g} s) before they could be sent")
                return
            deadline = now + self.timeout_s + waited
            async with asyncio.timeout_at(deadline):
                groups = _groups([item.check for item in batch], batched=self._connections is not None)
                replies = await self._execute(groups)
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
            items = iter(batch)
            for reply, group in zip(replies, groups, strict=True):
                outcomes = (
                    [RedisUnavailable(f"redis refused the check: {reply}")] * len(group)
                    if isinstance(reply, Exception)
                    else split_reply(reply, group)
                )
                for outcome in outcomes:
                    future = next(items).future
                    if future.done():
                        continue
                    if isinstance(outcome, RedisUnavailable):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._in_flight -= 1
            if self._pending and not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def _execute(self, groups: list[list[EncodedCheck]]) -> list[Any]:
        """Send one EVALSHA per group; on NOSCRIPT load the script once and resend only those (they did not run)."""
        epoch = self._script_epoch
        replies = await self._pipeline(groups)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await self._reload(epoch)
            for i, reply in zip(missing, await self._pipeline([groups[i] for i in missing]), strict=True):
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

    async def _pipeline(self, groups: list[list[EncodedCheck]]) -> list[Any]:
        """One round trip, one EVALSHA per group; error replies come back as exception objects in place."""
        self.round_trips += 1
        if self._connections is None:  # a cluster client routes each command to its slot's node
            pipe = self.client.pipeline(transaction=False)
            for group in groups:
                pipe.execute_command(*batch_command(group))
            return list(await pipe.execute(raise_on_error=False))
        # Single Redis: our own connections, one per pipeline in flight. redis-py's pool and
        # pipeline add per-batch locks, health checks and bookkeeping that cost more than the
        # round trip itself at the batch sizes of one event-loop turn.
        packed = b"".join(map(pack_batch, groups))
        connection = self._connections.pop() if self._connections else self._new_connection()
        try:
            await connection.send_packed_command(packed, check_health=False)
            replies: list[Any] = []
            for _ in groups:
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


def _groups(checks: list[EncodedCheck], batched: bool) -> list[list[EncodedCheck]]:
    """Checks per EVALSHA: up to MAX_BATCH in one on a single Redis, one each on a cluster (keys of
    different checks may live on different nodes)."""
    if not batched:
        return [[check] for check in checks]
    return [checks[i : i + MAX_BATCH] for i in range(0, len(checks), MAX_BATCH)]


def _pack(command: list[Any]) -> bytes:
    """RESP bytes of one command (hiredis' packer: C, no per-argument Python)."""
    return bytes(hiredis.pack_command(tuple(command)))


def _fail(batch: list[_Pending], message: str) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(RedisUnavailable(message))

