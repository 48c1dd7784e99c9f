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
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from importlib import resources
from math import ceil
from operator import itemgetter
from typing import Any, NamedTuple, TypeVar

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
from limiter.redis_connection import PipelinedConnection, pack_command

log = logging.getLogger("ratepilot.redis_bucket")

__all__ = [
    "SCRIPT",
    "SCRIPT_SHA",
    "CheckRequest",
    "EncodedCheck",
    "RedisBucket",
    "Resolver",
    "ScriptResult",
    "decisions_from_tokens",
    "encode_check",
    "result_decisions",
    "SyncRedisBucket",
    "check_template",
    "keys_resp",
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
    argv_resp: bytes  # RESP bytes of argv (the same for every check of these specs and cost)
    keys_resp: bytes  # RESP bytes of the keys


# The key-independent part of an EncodedCheck: argv, buckets, argv_resp (see check_template).
CheckTemplate = tuple[list[bytes], list[_BucketArgs], bytes]


# What a check's reply decodes to before Decisions are built: (allowed, tokens µt per key, server µs).
RawOutcome = tuple[bool, list[int], int]

MAX_BATCH = 256  # checks per EVALSHA: bounds how long one script blocks the server
_ARGS_CACHE_LIMIT = 10_000
_args_cache: dict[tuple[float, float, float], _BucketArgs] = {}
_KEY_COUNTS = [str(n).encode() for n in range(17)]
_encoded_cache: dict[tuple[Any, ...], tuple[list[bytes], list[_BucketArgs], bytes]] = {}
_Item = TypeVar("_Item")
_new_tuple = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (hot path)
_KEYS, _ARGV = itemgetter(0), itemgetter(1)  # EncodedCheck.keys, .argv, for map() over a batch
_ARGV_RESP, _KEYS_RESP = itemgetter(3), itemgetter(4)  # EncodedCheck.argv_resp, .keys_resp
_heads: dict[tuple[int, int], bytes] = {}  # (keys, ARGV items) of a batch -> its RESP head up to the key count
_CHECK = itemgetter(0)  # a _Pending's check


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


def check_template(specs: Sequence[BucketSpec], cost: float) -> CheckTemplate:
    """The key-independent encoding of a check of `cost` on buckets `specs`; raises BucketError (cached)."""
    count = len(specs)
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
    return cached


def keys_resp(keys: Sequence[str]) -> bytes:
    """RESP bytes of a check's keys (callers on the request path cache them per client)."""
    return _resp([key.encode() for key in keys])


def encode_check(keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> EncodedCheck:
    """One validated check; raises BucketError on bad input (nothing is sent)."""
    count = len(keys)
    if not count or count != len(specs):
        raise BucketError(f"a check needs one spec per key and at least one key, got {count} keys, {len(specs)} specs")
    return _new_tuple(EncodedCheck, (keys, *check_template(specs, cost), keys_resp(keys)))  # type: ignore[no-any-return]


def batch_command(checks: Sequence[EncodedCheck]) -> list[Any]:
    """The one EVALSHA that decides `checks` one after the other."""
    if len(checks) == 1:
        check = checks[0]
        return ["EVALSHA", SCRIPT_SHA, len(check.keys), *check.keys, *check.argv]
    keys = [key for check in checks for key in check.keys]
    return ["EVALSHA", SCRIPT_SHA, len(keys), *keys, *(arg for check in checks for arg in check.argv)]


def pack_batch(checks: Sequence[EncodedCheck]) -> bytes:
    """RESP bytes of `batch_command(checks)`, joined from each check's cached key and ARGV bytes."""
    return _pack_batch(checks)[0]


def _pack_batch(checks: Sequence[EncodedCheck]) -> tuple[bytes, int]:
    """pack_batch(), and the length of the script's reply when every check is answered (now, then per
    check its verdict and one number per key)."""
    key_count = sum(map(len, map(_KEYS, checks)))
    arg_count = sum(map(len, map(_ARGV, checks)))
    head = _heads.get((key_count, arg_count))
    if head is None:  # a batch's shape repeats: its head is formatted once
        count = b"%d" % key_count
        head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$%d\r\n%s\r\n" % (3 + key_count + arg_count, _SHA_BYTES, len(count), count)
        if len(_heads) >= _ARGS_CACHE_LIMIT:
            _heads.clear()
        _heads[key_count, arg_count] = head
    return b"".join((head, *map(_KEYS_RESP, checks), *map(_ARGV_RESP, checks))), 1 + len(checks) + key_count


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
        outcome = split_reply(self._call(check), [check])[0]
        if isinstance(outcome, RedisUnavailable):
            raise outcome
        return outcome

    def _call(self, check: EncodedCheck) -> Any:
        if self.backoff.blocked():
            raise RedisUnavailable(f"redis backing off for {self.backoff.remaining_s:.3f} s after a failure")
        try:
            if isinstance(self.client, redis.Redis):  # the lean path: about half the client time of execute_command
                reply = self._pipeline([[check]])[0]
                if isinstance(reply, NoScriptError):
                    self.load_script()
                    reply = self._pipeline([[check]])[0]  # NOSCRIPT: it did not run, safe to send
                if isinstance(reply, Exception):
                    raise reply
            else:
                try:
                    reply = self.client.execute_command(*batch_command([check]))
                except NoScriptError:
                    self.load_script()
                    reply = self.client.execute_command(*batch_command([check]))  # NOSCRIPT: it did not run, safe to send
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
        try:
            replies = self._pipeline(groups)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                self.load_script()
                for i, reply in zip(missing, self._pipeline([groups[i] for i in missing]), strict=True):
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

    def _pipeline(self, groups: list[list[EncodedCheck]]) -> list[Any]:
        """One round trip, one EVALSHA per group; error replies come back as exception objects in place."""
        if not isinstance(self.client, redis.Redis):  # a cluster client routes each command to its node
            pipe = self.client.pipeline(transaction=False)
            for group in groups:
                pipe.execute_command(*batch_command(group))
            return list(pipe.execute(raise_on_error=False))
        # Single Redis: join the checks' cached RESP bytes and read the replies straight off the
        # bucket's own connection (redis-py's pipeline, and its pool's get/release, cost more per
        # call than the script costs the server).
        with self._lock:
            connection = self._connection
            if connection is None:
                pool = self.client.connection_pool
                connection = self._connection = pool.connection_class(**pool.connection_kwargs)
            try:
                connection.send_packed_command([b"".join([_pack_batch(group)[0] for group in groups])], check_health=False)
                replies: list[Any] = []
                for _ in groups:
                    try:
                        replies.append(connection.read_response())
                    except ResponseError as error:
                        replies.append(error)
            except BaseException:
                connection.disconnect()  # replies may be left unread: never reuse it as is (reconnects on use)
                raise
        return replies



# What a caller of submit_to() gets per check instead of a future result: (future, its context,
# the outcome or the RedisUnavailable the check met). It settles the future itself and must not raise.
Resolver = Callable[[asyncio.Future[Any], Any, "RawOutcome | RedisUnavailable"], None]


# A queued check: (check, future, resolver, context). A plain tuple (one per request: half the cost
# of a NamedTuple's); resolver None means the future gets the outcome (result) or the error (exception).
_Pending = tuple[EncodedCheck, "asyncio.Future[Any]", "Resolver | None", Any]


def _settle(item: _Pending, outcome: RawOutcome | RedisUnavailable) -> None:
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
        _resolver_failed(item, error)


class ThrottledLog:
    """Logs an error at most once per `interval_s`, with how often it happened since the last line
    (a failure on the request path would otherwise write one line per request)."""

    def __init__(self, message: str, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.message = message
        self.interval_s = interval_s
        self.clock = clock
        self.unlogged = 0  # occurrences since the last line
        self.logged_at = -math.inf

    def error(self, error: Exception) -> bool:
        """Count one occurrence; log it (True) unless a line was written within the interval."""
        self.unlogged += 1
        now = self.clock()
        if now - self.logged_at < self.interval_s:
            return False
        log.error("%s (%d times since the last line): %r", self.message, self.unlogged, error, exc_info=error)
        self.unlogged, self.logged_at = 0, now
        return True


_resolver_errors = ThrottledLog("settling a check failed")


def _resolver_failed(item: _Pending, error: Exception) -> None:
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


class _Abandoned(ConnectionError):
    """The bucket dropped the connection itself (a batch timed out, or the bucket closed)."""


class _Batch:
    """Checks sent in one write on the bucket's connection: one EVALSHA per group, replies in order."""

    __slots__ = (
        "bucket", "connection", "groups", "sizes", "answered", "epoch", "resent", "deadline", "noscript", "lost", "timed_out",
    )  # fmt: skip

    def __init__(
        self, bucket: RedisBucket, connection: PipelinedConnection, groups: list[list[_Pending]], sizes: list[int], resent: bool
    ):
        self.bucket = bucket
        self.connection = connection
        self.groups = groups
        self.sizes = sizes  # per group, the reply length when every check is answered: 1 + per check 1 + keys
        self.answered = 0  # groups whose reply (or failure) came
        self.epoch = bucket._script_epoch
        self.resent = resent  # already resent once after NOSCRIPT
        self.deadline = 0.0  # loop time after which the batch has timed out (the bucket's watchdog checks it)
        self.noscript: list[_Pending] = []
        self.lost: Exception | None = None
        self.timed_out = False

    def on_reply(self, reply: Any) -> None:
        """The reply of the next group: results to the futures, or the error each check met."""
        group = self.groups[self.answered]
        self.answered += 1
        if type(reply) is list:
            if len(reply) == self.sizes[self.answered - 1]:  # every check answered: split_reply() inlined
                now_us = reply[0]
                at = 1
                for item in group:
                    check, future, resolve, context = item
                    end = at + 1 + len(check[0])  # check.keys
                    outcome = (reply[at] == 1, reply[at + 1 : end], now_us)
                    at = end
                    if resolve is not None and not future.done():
                        try:  # _settle() inlined for the guard's checks: 4k of ~183k instructions per request
                            resolve(future, context, outcome)
                        except Exception as error:  # (a try costs nothing until it catches, Python >= 3.11)
                            _resolver_failed(item, error)
                    else:
                        _settle(item, outcome)
            else:  # some check met an error (its answer is one element), or a malformed reply
                for item, answer in zip(group, split_reply(reply, list(map(_CHECK, group))), strict=True):
                    _settle(item, answer)
        elif isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            self.noscript.extend(group)  # they did not run: safe to resend
        elif isinstance(reply, ConnectionError):
            self.lost = reply
            _fail(group, f"redis unreachable: {reply}")
        else:  # an error reply for the whole script (OOM, BUSY...): Redis answered, these checks failed
            _fail(group, f"redis refused the checks: {reply!r:.200}")
        if self.answered == len(self.groups):
            self.bucket._finished(self)

    def on_timeout(self) -> None:
        """Deadline passed: fail what is unanswered and drop the connection (late replies must never be read)."""
        self.timed_out = True
        bucket = self.bucket
        _fail([item for group in self.groups[self.answered :] for item in group], f"redis slower than {bucket.timeout_s:g} s")
        bucket.backoff.failure()
        self.connection.abort(_Abandoned("a batch timed out"))


class RedisBucket:
    """Asyncio check-and-consume on Redis that coalesces the checks of one event-loop turn.

    `await check(keys, specs, cost)` returns `(allowed, [Decision per key])` or raises
    `RedisUnavailable`, or `BucketError` at once for bad input. At most `max_in_flight` round trips
    are outstanding; checks arriving meanwhile gather into the next one (a bigger batch, fewer
    syscalls). On a single Redis a turn's checks go out as soon as `chunk` of them have gathered
    (while a round trip is free), the rest at the end of the turn (decision): on a saturated edge
    Redis then decides the first requests of a turn while the edge is still parsing the next ones.
    With one batch per turn the edge sat idle for a whole round trip each cycle, every request of
    the closed loop parked in Redis (12 % idle, HTTP 0.62× bare; with chunks of 8, 0.70×, the edge
    never idle). The checks of one round trip go out as ONE EVALSHA that decides
    them one after the other, over the bucket's own pipelined connection (`PipelinedConnection`:
    a Protocol, no task per round trip); on a cluster each check is its own EVALSHA in a redis-py
    cluster pipeline. A bucket belongs to the event loop that first uses it.

    The timeout is meant for Redis, not for our own event loop (decision): a batch's deadline is
    `timeout_s` after it is sent, plus an allowance for loop lag equal to how long its checks
    waited to be sent (about one loop turn; the reply is read about one turn later too). Without
    it, a saturated edge (turns of several ms) timed out nearly every check against a healthy
    Redis and decided them on the local guard. Checks that waited longer than `max_lag_s` are
    failed unsent. A hung Redis is still noticed after `timeout_s` on an idle loop; the connection
    of a timed-out batch is dropped (its late replies are never read), so checks behind it fail at
    once and the next probe after the back-off reconnects.
    """

    def __init__(
        self,
        client: Any,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_in_flight: int = 4,
        chunk: int = 8,
        backoff: Backoff | None = None,
        max_lag_s: float = 0.05,
    ):
        if not (timeout_s > 0 and max_lag_s > 0) or max_in_flight < 1 or chunk < 1:
            raise ValueError("timeout_s and max_lag_s must be positive, max_in_flight and chunk at least 1")
        _check_no_retries(client)
        self.client = client
        self.timeout_s = timeout_s
        self.max_lag_s = max_lag_s
        self.max_in_flight = max_in_flight
        self.backoff = backoff or Backoff()
        self.script_loads = 0  # SCRIPT LOADs sent (on connect, and once per NOSCRIPT episode)
        self.round_trips = 0  # pipelines sent to Redis, connection attempts of the request path included
        self._pending: list[_Pending] = []
        self._pending_since = 0.0  # loop time the oldest pending check was asked
        self._flush_scheduled = False
        self._in_flight = 0
        self._script_epoch = 0  # bumped by every SCRIPT LOAD
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._out: list[_Batch] = []  # batches sent on the connection and not yet finished, in send order
        self._watchdog: asyncio.TimerHandle | None = None  # fires at the earliest deadline of `_out`
        self._watchdog_at = 0.0
        # Single Redis: our own pipelined connection, opened with the client's connection settings.
        self._options: dict[str, Any] | None = None
        if isinstance(client, redis.asyncio.Redis):
            pool = client.connection_pool
            self._options = {**pool.connection_kwargs, "connection_class": pool.connection_class}
        # checks that go out before the turn ends; off on a cluster, whose pipelines of one turn
        # may run in any order across nodes and connections
        self.chunk = chunk if self._options is not None else 1 << 62
        self._connection: PipelinedConnection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._loading: asyncio.Future[None] | None = None  # cluster: a SCRIPT LOAD under way

    @classmethod
    def from_url(
        cls, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, cluster: bool = False, **options: Any
    ) -> RedisBucket:
        """A bucket on a new asyncio client for `url` (`cluster=True` for a Redis Cluster seed node)."""
        return cls(make_async_client(url, timeout_s, cluster), timeout_s=timeout_s, **options)

    async def warm_up(self, timeout_s: float = 1.0) -> None:
        """Load the script and open the connection now, so the first checks need no connect.

        Call it at start-up (a cold connect alone can exceed a 5 ms check timeout). Raises
        RedisUnavailable when Redis cannot be reached within `timeout_s`; checks then fail
        over as usual and connect later.
        """
        try:
            if self._options is not None:
                await self._open(timeout_s)
                return
            async with asyncio.timeout(timeout_s):
                await self.client.script_load(SCRIPT)
                self.script_loads += 1
                self._script_epoch += 1
                if hasattr(self.client, "initialize"):
                    await self.client.initialize()  # cluster: discover the slots of every node
        except (*_CONNECTION_ERRORS, RedisError, hiredis.ReplyError) as error:
            raise RedisUnavailable(f"redis not reachable at warm-up: {error!r}") from error

    async def aclose(self) -> None:
        """Wait (a bounded time) for outstanding round trips, then close the connections."""
        deadline = time.monotonic() + self.timeout_s + self.max_lag_s + 0.1
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._connection is not None:
            self._connection.abort(_Abandoned("bucket closed"))
            self._connection = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending, self._pending = self._pending, []
        _fail(pending, "bucket closed")
        self._loop = None
        await self.client.aclose()

    async def check(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> tuple[bool, list[Decision]]:
        """Consume `cost` tokens from every bucket of `keys` if all hold it; one Decision per key."""
        check = encode_check(keys, specs, cost)
        allowed, tokens, _ = await self.submit(check)
        return allowed, decisions_from_tokens(allowed, tokens, check.buckets)

    async def check_raw(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> ScriptResult:
        """Like check(), but the integer answer, server time included (tests, tools)."""
        check = encode_check(keys, specs, cost)
        return _script_result(await self.submit(check), check.buckets)

    def submit(self, check: EncodedCheck) -> asyncio.Future[RawOutcome]:
        """Queue an encoded check for this turn's round trip; the future gets (allowed, tokens µt per key, server µs).

        Raises RedisUnavailable at once while backing off; the future fails with RedisUnavailable.
        """
        loop = self._loop
        if loop is None:  # asyncio.get_running_loop() costs a getpid() system call on Python 3.11
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[RawOutcome] = loop.create_future()
        self.submit_to(check, future, None, None)
        return future

    def submit_to(self, check: EncodedCheck, future: asyncio.Future[Any], resolve: Resolver | None, context: Any) -> None:
        """Like submit(), but the outcome (or the RedisUnavailable met) goes to `resolve(future, context, outcome)`,
        which settles `future` itself (the guard builds its verdict there: no coroutine resumes per check).

        Raises RedisUnavailable at once while backing off (nothing is queued).
        """
        backoff = self.backoff
        if backoff.blocked_until and backoff.blocked():
            raise RedisUnavailable(f"redis backing off for {backoff.remaining_s:.3f} s after a failure")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        pending = self._pending
        if not pending:
            self._pending_since = loop.time()
        pending.append((check, future, resolve, context))
        if len(pending) >= self.chunk and self._in_flight < self.max_in_flight:
            self._send_pending()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _schedule_flush(self) -> None:
        if self._pending and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """End of the turn: send what gathered, unless enough round trips are already out."""
        self._flush_scheduled = False
        self._send_pending()

    def _send_pending(self) -> None:
        """Send the pending checks now (one round trip), unless enough round trips are already out."""
        if not self._pending or self._in_flight >= self.max_in_flight:
            return
        loop = self._loop
        assert loop is not None
        connection = self._connection
        if self._options is not None and (connection is None or connection.closed):
            if self._connecting is None and not self.backoff.blocked():
                self.round_trips += 1  # a connection attempt is a probe too
                self._connecting = self._spawn(self._connect())
            elif self._connecting is None:
                batch, self._pending = self._pending, []
                _fail(batch, "redis backing off after a failure")
            return  # the connect flushes (or fails) what is pending when it is done
        batch, since = self._pending, self._pending_since
        self._pending = []
        if self.backoff.blocked():  # a round trip failed while these waited: they were never sent
            _fail(batch, "redis backing off after a failure")
            return
        now = loop.time()
        waited = now - since
        if waited > self.max_lag_s:  # a busy loop, not Redis: no back-off
            _fail(batch, f"checks waited {waited:.3f} s (more than {self.max_lag_s:g} s) before they could be sent")
            return
        if connection is None:  # cluster: redis-py's cluster pipeline routes each check to its node
            self._in_flight += 1
            self._spawn(self._run_cluster(batch, now + self.timeout_s + waited))
            return
        self._send(connection, batch, now + self.timeout_s + waited, resent=False)

    def _send(self, connection: PipelinedConnection, items: list[_Pending], deadline: float, resent: bool) -> None:
        """One write: up to MAX_BATCH checks per EVALSHA, under the watchdog's deadline."""
        if len(items) <= MAX_BATCH:  # one EVALSHA: the common case
            data, size = _pack_batch(list(map(_CHECK, items)))
            groups, sizes = [items], [size]
        else:
            groups = _groups(items, batched=True)
            packed, sized = zip(*[_pack_batch(list(map(_CHECK, group))) for group in groups], strict=True)
            data, sizes = b"".join(packed), list(sized)
        batch = _Batch(self, connection, groups, sizes, resent)
        self._in_flight += 1
        self.round_trips += 1
        batch.deadline = deadline
        self._out.append(batch)
        if self._watchdog is None or deadline < self._watchdog_at:
            self._arm_watchdog(deadline)
        try:
            connection.send(data, [batch.on_reply] * len(groups))
        except ConnectionError as error:  # closed between the check and the write
            for _ in groups:
                batch.on_reply(error)

    def _arm_watchdog(self, when: float) -> None:
        # One timer for all batches out (decision): a call_at and a cancel per batch cost about a
        # tenth of the request path's Python; the watchdog fires about once per timeout instead.
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog_at = when
        self._watchdog = self._loop.call_at(when, self._check_deadlines)  # type: ignore[union-attr]

    def _check_deadlines(self) -> None:
        """Watchdog: time out the batches past their deadline, then wait for the next deadline."""
        self._watchdog = None
        now = self._loop.time()  # type: ignore[union-attr]
        for batch in list(self._out):
            if batch.deadline <= now and batch in self._out:  # an earlier timeout may have finished it
                batch.on_timeout()
        if self._out:
            self._arm_watchdog(min(batch.deadline for batch in self._out))

    def _finished(self, batch: _Batch) -> None:
        """Every group of `batch` answered (or failed): settle the back-off, resend NOSCRIPT checks, flush."""
        self._out.remove(batch)
        self._in_flight -= 1
        if batch.lost is not None:
            if not isinstance(batch.lost, _Abandoned):  # our own abort was counted where it happened
                self.backoff.failure()
        elif not batch.timed_out and (self.backoff.blocked_until or self.backoff.failures):
            self.backoff.success()
        if batch.noscript:
            self._resend(batch)
        self._schedule_flush()

    def _resend(self, batch: _Batch) -> None:
        """NOSCRIPT: load the script (once per episode) and resend those checks after it on the same connection."""
        items = batch.noscript
        connection = self._connection
        if batch.resent or connection is None or connection.closed:
            _fail(items, "redis lost the script again right after loading it" if batch.resent else "redis connection lost")
            return
        if batch.epoch == self._script_epoch:  # no load sent since this batch went out
            self._script_epoch += 1
            self.script_loads += 1
            connection.send(_SCRIPT_LOAD, [_log_load_failure])
        self._send(connection, items, self._loop.time() + self.timeout_s, resent=True)  # type: ignore[union-attr]

    async def _open(self, timeout_s: float) -> None:
        """Connect and load the script (a fresh server may not have it) within `timeout_s`."""
        assert self._options is not None
        async with asyncio.timeout(timeout_s):
            connection = await PipelinedConnection.open(self._options, timeout_s)
            try:
                await connection.request("SCRIPT", "LOAD", SCRIPT)
            except BaseException:
                connection.abort(_Abandoned("script load failed"))
                raise
        self.script_loads += 1
        self._script_epoch += 1
        if self._connection is not None:
            self._connection.abort(_Abandoned("replaced"))
        self._connection = connection
        if self._loop is None:
            self._loop = asyncio.get_running_loop()

    async def _connect(self) -> None:
        """The request path's (re)connect: on failure back off and fail what waited for it."""
        try:
            await self._open(self.timeout_s)
        except (*_CONNECTION_ERRORS, hiredis.ReplyError) as error:
            self.backoff.failure()
            pending, self._pending = self._pending, []
            _fail(pending, f"redis unreachable: {error!r}")
        finally:
            self._connecting = None
            self._schedule_flush()

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task = self._loop.create_task(coroutine)  # type: ignore[union-attr]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- Redis Cluster: redis-py's cluster pipeline, one EVALSHA per check ---------------------------

    async def _run_cluster(self, batch: list[_Pending], deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                replies = await self._execute_cluster(list(map(_CHECK, batch)))
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
                outcome = (
                    RedisUnavailable(f"redis refused the check: {reply}")
                    if isinstance(reply, Exception)
                    else split_reply(reply, [item[0]])[0]
                )
                _settle(item, outcome)
        finally:
            self._in_flight -= 1
            self._schedule_flush()

    async def _execute_cluster(self, checks: list[EncodedCheck]) -> list[Any]:
        """One EVALSHA per check; on NOSCRIPT load the script once and resend only those (they did not run)."""
        epoch = self._script_epoch
        replies = await self._cluster_pipeline(checks)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await self._reload_cluster(epoch)
            for i, reply in zip(missing, await self._cluster_pipeline([checks[i] for i in missing]), strict=True):
                replies[i] = reply
        return replies

    async def _reload_cluster(self, seen_epoch: int) -> None:
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

    async def _cluster_pipeline(self, checks: list[EncodedCheck]) -> list[Any]:
        """One round trip; error replies come back as exception objects in place."""
        self.round_trips += 1
        pipe = self.client.pipeline(transaction=False)
        for check in checks:
            pipe.execute_command(*batch_command([check]))
        return list(await pipe.execute(raise_on_error=False))


_SCRIPT_LOAD = pack_command("SCRIPT", "LOAD", SCRIPT)


def _log_load_failure(reply: Any) -> None:
    if isinstance(reply, Exception):
        log.warning("SCRIPT LOAD after NOSCRIPT failed: %r", reply)


def _groups(checks: list[_Item], batched: bool) -> list[list[_Item]]:
    """Checks per EVALSHA: up to MAX_BATCH in one on a single Redis, one each on a cluster (keys of
    different checks may live on different nodes)."""
    if not batched:
        return [[check] for check in checks]
    return [checks[i : i + MAX_BATCH] for i in range(0, len(checks), MAX_BATCH)]


def _fail(batch: list[_Pending], message: str) -> None:
    for item in batch:
        _settle(item, RedisUnavailable(message))
