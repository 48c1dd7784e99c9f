"""How a check is written for Redis and how the script's reply is read back: pure, no I/O.

A check is one atomic run of `limiter/lua/token_bucket.lua` over the bucket keys of one request
(one Redis Cluster hash tag). `encode_check` validates it (`BucketError` before anything is sent)
and keeps its RESP bytes; `pack_batch` joins the checks of one round trip into ONE EVALSHA that
decides them one after the other; `split_reply` cuts that EVALSHA's reply back into one outcome per
check; `decisions_from_tokens` turns an outcome into a `Decision` per key.

The script's argument layout: ARGV = key count, then per key its rate (tokens/s), capacity (µt)
and cost (µt); the reply is the server time (µs), then per check its verdict (1 allowed) and the
tokens left (µt) per key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from math import ceil
from operator import itemgetter
from typing import Any, NamedTuple

from limiter.bucket import MICRO, BucketError, BucketSpec, Decision, decision_from, validate_cost, wait_us
from limiter.errors import RedisUnavailable

__all__ = [
    "MAX_BATCH",
    "SCRIPT",
    "SCRIPT_SHA",
    "BucketArgs",
    "CheckRequest",
    "CheckTemplate",
    "EncodedCheck",
    "RawOutcome",
    "ScriptResult",
    "batch_command",
    "check_template",
    "decisions_from_tokens",
    "encode_check",
    "keys_resp",
    "pack_batch",
    "packed_batch",
    "result_decisions",
    "script_result",
    "split_reply",
]

SCRIPT: str = resources.files("limiter.lua").joinpath("token_bucket.lua").read_text()
SCRIPT_SHA: str = hashlib.sha1(SCRIPT.encode()).hexdigest()
_SHA_BYTES = SCRIPT_SHA.encode()

MAX_BATCH = 256  # checks per EVALSHA: bounds how long one script blocks the server


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


class BucketArgs(NamedTuple):
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
    buckets: list[BucketArgs]
    argv_resp: bytes  # RESP bytes of argv (the same for every check of these specs and cost)
    keys_resp: bytes  # RESP bytes of the keys


# The key-independent part of an EncodedCheck: argv, buckets, argv_resp (see check_template).
CheckTemplate = tuple[list[bytes], list[BucketArgs], bytes]

# What a check's reply decodes to before Decisions are built: (allowed, tokens µt per key, server µs).
RawOutcome = tuple[bool, list[int], int]

_CACHE_LIMIT = 10_000  # entries per cache below; a limiter sees few distinct specs and costs
_args_cache: dict[tuple[float, float, float], BucketArgs] = {}
_encoded_cache: dict[tuple[Any, ...], CheckTemplate] = {}
_heads: dict[tuple[int, int], bytes] = {}  # (keys, ARGV items) of a batch -> its RESP head up to the key count
_KEY_COUNTS = [str(n).encode() for n in range(17)]
_new_tuple = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (hot path)
# EncodedCheck fields for map() over a batch (hot path: no lambda call per check)
_KEYS, _ARGV = itemgetter(0), itemgetter(1)
_ARGV_RESP, _KEYS_RESP = itemgetter(3), itemgetter(4)


def _resp(args: Sequence[bytes]) -> bytes:
    """RESP bulk strings of `args` (as hiredis.pack_command writes them)."""
    return b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args)


def _bucket_args(spec: BucketSpec, cost: float) -> BucketArgs:
    """ARGV of one bucket: rate (repr round-trips to the same double in Lua), capacity µt, cost µt.

    Cached per (spec, cost): a limiter sees few distinct ones, and validation runs once each.
    """
    cache_key = (spec.rate, spec.capacity, cost)  # a plain tuple hashes faster than the dataclass
    cached = _args_cache.get(cache_key)
    if cached is None:
        cost_ut = validate_cost(cost, spec)  # raises BucketError: nothing cached, nothing sent
        if len(_args_cache) >= _CACHE_LIMIT:
            _args_cache.clear()
        capacity_ut = spec.capacity_ut
        argv = (repr(spec.rate).encode(), str(capacity_ut).encode(), str(cost_ut).encode())
        cached = BucketArgs(argv, spec.rate, capacity_ut, cost_ut, spec.capacity)
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
        if len(_encoded_cache) >= _CACHE_LIMIT:
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
    """The one EVALSHA that decides `checks` one after the other, as redis-py's execute_command takes it."""
    if len(checks) == 1:
        check = checks[0]
        return ["EVALSHA", SCRIPT_SHA, len(check.keys), *check.keys, *check.argv]
    keys = [key for check in checks for key in check.keys]
    return ["EVALSHA", SCRIPT_SHA, len(keys), *keys, *(arg for check in checks for arg in check.argv)]


def pack_batch(checks: Sequence[EncodedCheck]) -> bytes:
    """RESP bytes of `batch_command(checks)`, joined from each check's cached key and ARGV bytes."""
    return packed_batch(checks)[0]


def packed_batch(checks: Sequence[EncodedCheck]) -> tuple[bytes, int]:
    """pack_batch(), and the length of the script's reply when every check is answered (now, then per
    check its verdict and one number per key)."""
    key_count = sum(map(len, map(_KEYS, checks)))
    arg_count = sum(map(len, map(_ARGV, checks)))
    head = _heads.get((key_count, arg_count))
    if head is None:  # a batch's shape repeats: its head is formatted once
        count = b"%d" % key_count
        head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$%d\r\n%s\r\n" % (3 + key_count + arg_count, _SHA_BYTES, len(count), count)
        if len(_heads) >= _CACHE_LIMIT:
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


def decisions_from_tokens(allowed: bool, tokens: list[int], buckets: list[BucketArgs]) -> list[Decision]:
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


def script_result(outcome: RawOutcome, buckets: list[BucketArgs]) -> ScriptResult:
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
