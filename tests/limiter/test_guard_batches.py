"""The guard's request path through real batches on a real redis-server: verdicts settled as the reply is read."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import limiter.guard
import limiter.pending_checks
import limiter.redis_bucket
from limiter.bucket import BucketSpec
from limiter.check_encoding import encode_check
from limiter.config import parse_config
from limiter.edge import Edge, EdgeOptions
from limiter.guard import Guard
from limiter.local_bucket import LocalBucket
from limiter.metrics import LimiterMetrics
from limiter.redis_bucket import RedisBucket
from limiter.throttled_log import ThrottledLog
from limiter.verdict import Verdict
from ratepilot.servers import RedisServer
from tests.limiter.support import BASE_CONFIG


def _guard(url: str, **bucket_options: Any) -> tuple[Guard, RedisBucket]:
    config = parse_config(BASE_CONFIG.replace("REDIS_URL", url), {})
    guard = Guard(config, None, LocalBucket(), LimiterMetrics(CollectorRegistry()))
    bucket = RedisBucket.from_url(url, timeout_s=1.0, **bucket_options)
    guard.redis_bucket = bucket
    return guard, bucket


def test_a_cancelled_request_does_not_disturb_the_others_of_its_batch(redis_server: RedisServer) -> None:
    """A request whose future is cancelled (client gone) while its check is out: the rest of the same
    script still get their Redis verdicts, and the bucket keeps working."""

    async def scenario() -> tuple[list[Verdict], bool, Verdict]:
        guard, bucket = _guard(redis_server.url, chunk=1000)  # all three in one script
        await bucket.warm_up()
        try:
            pending = [guard.start(f"free_{i}".encode(), "GET", "/v1/items") for i in range(3)]
            assert all(isinstance(p, asyncio.Future) for p in pending)
            pending[1].cancel()  # type: ignore[union-attr]
            # bounded: a reply loop that broke on the cancelled future would leave the others unsettled
            others = [await asyncio.wait_for(pending[0], 5), await asyncio.wait_for(pending[2], 5)]  # type: ignore[arg-type]
            after = await guard.decide("free_3", "GET", "/v1/items")
            return others, pending[1].cancelled(), after  # type: ignore[union-attr]
        finally:
            await bucket.aclose()

    others, cancelled, after = asyncio.run(scenario())
    assert cancelled
    assert [(v.allowed, v.source) for v in others] == [(True, "redis"), (True, "redis")]
    assert (after.allowed, after.source) == (True, "redis")


def test_answered_batches_take_the_inlined_reply_path(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """When every check of a script is answered, the reply is split in the reply loop itself (split_reply
    is only for replies with an error in them); the verdicts are the Redis ones."""

    def refuse(*_: Any) -> None:
        raise AssertionError("split_reply used for a reply whose checks were all answered")

    monkeypatch.setattr(limiter.redis_bucket, "split_reply", refuse)

    async def scenario() -> list[Verdict]:
        guard, bucket = _guard(redis_server.url, chunk=4)
        await bucket.warm_up()
        try:
            checks = asyncio.gather(*(guard.decide(f"free_{i % 3}", "GET", "/v1/items") for i in range(10)))
            return await asyncio.wait_for(checks, 10)
        finally:
            await bucket.aclose()

    verdicts = asyncio.run(scenario())
    assert [v.source for v in verdicts] == ["redis"] * 10
    assert [v.allowed for v in verdicts] == [True] * 8 + [False] * 2  # the free tier's aggregate burst is 8


def test_the_edge_sends_checks_in_the_configured_chunks(redis_server: RedisServer) -> None:
    """`redis.chunk` reaches the edge's Redis bucket."""
    config = parse_config(BASE_CONFIG.replace("REDIS_URL", redis_server.url).replace("timeout_ms: 1000", "timeout_ms: 1000\n  chunk: 3"), {})
    assert config.redis.chunk == 3
    edge = Edge(config, EdgeOptions(backend="echo", admin=False))

    async def scenario() -> int:
        await edge.start()
        try:
            bucket = edge.guard.redis_bucket
            assert isinstance(bucket, RedisBucket)
            return bucket.chunk
        finally:
            await edge.stop()

    assert asyncio.run(scenario()) == 3


def test_new_rates_reach_the_next_check_of_a_cached_route(redis_server: RedisServer) -> None:
    """A client's encoded check and the RateLimit field parts are cached; new rates from the rate table
    drop them, so the very next request is checked and described with the new burst."""
    from limiter.rate_reader import TierRates

    async def scenario() -> tuple[Verdict, Verdict, Verdict]:
        guard, bucket = _guard(redis_server.url)
        await bucket.warm_up()
        try:
            before = await guard.decide("free_rates", "GET", "/v1/items")
            again = await guard.decide("free_rates", "GET", "/v1/items")  # cached route and field parts
            guard.apply_rates({"free": TierRates(rate=0.001, burst=40, client_rate=0.001, client_burst=30, source="controller")})
            after = await guard.decide("free_rates", "GET", "/v1/items")
            return before, again, after
        finally:
            await bucket.aclose()

    before, again, after = asyncio.run(scenario())
    assert [v.source for v in (before, again, after)] == ["redis"] * 3
    assert before.ratelimit_field().startswith(b'"client";r=4;') and again.ratelimit_field().startswith(b'"client";r=3;')
    # the bucket's state carries over (3 tokens left, minus this request), the capacity is the new one
    assert after.decisions[0].limit == 30 and after.ratelimit_field().startswith(b'"client";r=2;')
    assert after.ratelimit_field() == after.ratelimit_field_from_decisions()
    assert after.policy_header.startswith(b'"client";q=30;')


def test_a_resolver_that_raises_does_not_leave_the_rest_of_its_batch_hanging(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A resolver that raises on a check's outcome (a bug, a reply it cannot read): that request gets the
    resolver's failure answer, the others of the same script still get their Redis outcomes, the bucket
    keeps deciding, and the failures of one interval make one log line."""
    monkeypatch.setattr(
        limiter.pending_checks, "_resolver_errors", ThrottledLog("settling a check failed", logger=limiter.pending_checks.log)
    )
    def resolve(future: asyncio.Future[Any], context: str, outcome: Any) -> None:
        if context == "boom" and type(outcome) is tuple:
            raise ValueError("cannot read this outcome")
        future.set_result(("redis", outcome[0]) if type(outcome) is tuple else ("failed", type(outcome).__name__))

    async def scenario() -> tuple[list[Any], Any]:
        bucket = RedisBucket.from_url(redis_server.url, timeout_s=1.0, chunk=1000)  # all three in one script
        await bucket.warm_up()
        loop = asyncio.get_running_loop()
        try:
            check = encode_check(["{t}:resolver"], [BucketSpec(rate=10.0, capacity=10.0)], 1.0)
            futures = [loop.create_future() for _ in range(4)]
            for future, context in zip(futures, ["ok", "boom", "ok", "boom"], strict=True):
                bucket.submit_to(check, future, resolve, context)
            # bounded: a reply loop stopped by the exception would leave the third request unsettled
            settled = [await asyncio.wait_for(future, 5) for future in futures]
            after: asyncio.Future[Any] = loop.create_future()
            bucket.submit_to(check, after, resolve, "ok")
            return settled, await asyncio.wait_for(after, 5)
        finally:
            await bucket.aclose()

    settled, after = asyncio.run(scenario())
    failed = ("failed", "RedisUnavailable")
    assert settled == [("redis", True), failed, ("redis", True), failed]
    assert after == ("redis", True)
    lines = [r for r in caplog.records if r.name == "ratepilot.redis_bucket" and "settling a check failed" in r.getMessage()]
    assert len(lines) == 1 and "cannot read this outcome" in lines[0].getMessage()


def test_throttled_log_writes_one_line_per_interval_with_the_count() -> None:
    """Pure logic on a fake clock: a line for the first error, none within the interval, then one that
    counts every error since the last line."""
    now = [100.0]
    errors = ThrottledLog("boom", interval_s=10.0, clock=lambda: now[0])
    assert errors.error(ValueError("1")) is True
    assert [errors.error(ValueError(str(i))) for i in range(3)] == [False] * 3
    now[0] += 10.0
    assert errors.unlogged == 3
    assert errors.error(ValueError("5")) is True and errors.unlogged == 0


def test_a_guard_whose_verdict_fails_falls_back_instead_of_hanging(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard's own resolver raising on a Redis outcome: the request is decided by the tier's failure
    policy (the local guard for fail_open) instead of waiting forever."""

    async def scenario() -> list[Verdict]:
        guard, bucket = _guard(redis_server.url, chunk=1000)
        await bucket.warm_up()
        try:
            monkeypatch.setattr(limiter.guard, "bisect_left", lambda *_: 1 / 0)  # breaks the Redis-outcome path only
            checks = asyncio.gather(*(guard.decide(f"free_{i}", "GET", "/v1/items") for i in range(3)))
            return await asyncio.wait_for(checks, 5)
        finally:
            await bucket.aclose()

    verdicts = asyncio.run(scenario())
    assert [(v.allowed, v.source) for v in verdicts] == [(True, "local")] * 3
