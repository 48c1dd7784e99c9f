"""LocalBucket (no servers): exact decisions on an injected clock, bounded memory; Backoff windows."""

from __future__ import annotations

import asyncio

import pytest

from limiter.backoff import Backoff
from limiter.bucket import MICRO, BucketError, BucketSpec
from limiter.local_bucket import LocalBucket


class FakeClock:
    """A clock the test moves by hand (µs)."""

    def __init__(self, now_us: int = 1_000_000_000) -> None:
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us


def test_refill_and_retry_after_are_exact() -> None:
    clock = FakeClock()
    bucket = LocalBucket(clock_us=clock)
    spec = BucketSpec(rate=2.0, capacity=3)
    assert [bucket.check(["a"], [spec], 1)[0] for _ in range(4)] == [True, True, True, False]
    allowed, (decision,) = bucket.check(["a"], [spec], 1)
    assert not allowed and decision.retry_after_s == 0.5 and decision.reset_after_s == 1.5
    assert decision.remaining == 0 and decision.limit == 3 and decision.source == "local"
    clock.now_us += 499_999
    assert not bucket.check(["a"], [spec], 1)[0]
    clock.now_us += 1
    allowed, (decision,) = bucket.check(["a"], [spec], 1)
    assert allowed and decision.remaining == 0


def test_clock_going_back_refills_nothing() -> None:
    clock = FakeClock()
    bucket = LocalBucket(clock_us=clock)
    spec = BucketSpec(rate=1000.0, capacity=2)
    bucket.check(["a"], [spec], 2)
    clock.now_us -= 10_000_000
    allowed, (decision,) = bucket.check(["a"], [spec], 1)
    assert not allowed and decision.remaining == 0


def test_all_or_nothing_charges_no_bucket_on_refusal() -> None:
    clock = FakeClock()
    bucket = LocalBucket(clock_us=clock)
    client, tier = BucketSpec(1e-3, 5), BucketSpec(1e-3, 2)
    outcomes = [bucket.check(["c", "tier"], [client, tier], 1)[0] for _ in range(3)]
    assert outcomes == [True, True, False]
    _, (client_decision, tier_decision) = bucket.check(["c", "tier"], [client, tier], 1)
    assert round(client_decision.remaining * MICRO) == 3 * MICRO


def test_full_buckets_are_dropped_and_memory_is_bounded() -> None:
    clock = FakeClock()
    bucket = LocalBucket(clock_us=clock, max_buckets=100)
    spec = BucketSpec(rate=10.0, capacity=1)
    for i in range(50):
        bucket.check([f"k{i}"], [spec], 1)
    assert len(bucket) == 50
    clock.now_us += 200_000  # every bucket has refilled
    for i in range(60):
        bucket.check([f"n{i}"], [spec], 1)
    assert len(bucket) <= 100 and bucket.evicted_active == 0  # the refilled ones went first
    for i in range(300):
        bucket.check([f"m{i}"], [spec], 1)
    assert len(bucket) <= 100 and bucket.evicted_active > 0
    assert not bucket.check(["m299"], [spec], 1)[0]  # the most recently used bucket survived


def test_bad_input_raises_and_changes_nothing() -> None:
    bucket = LocalBucket(clock_us=FakeClock())
    spec = BucketSpec(1.0, 2)
    with pytest.raises(BucketError, match="exceeds the bucket capacity"):
        bucket.check(["a"], [spec], 3)
    with pytest.raises(BucketError, match="one spec per key"):
        bucket.check(["a", "b"], [spec], 1)
    assert len(bucket) == 0
    with pytest.raises(ValueError):
        LocalBucket(max_buckets=0)


def test_async_tasks_share_one_bucket_without_over_admission() -> None:
    bucket = LocalBucket(clock_us=FakeClock())
    spec = BucketSpec(1e-3, 25)

    async def scenario() -> int:
        async def one() -> bool:
            await asyncio.sleep(0)
            return bucket.check(["a"], [spec], 1)[0]

        return sum(await asyncio.gather(*(one() for _ in range(100))))

    assert asyncio.run(scenario()) == 25


def test_backoff_grows_caps_and_resets() -> None:
    now = [0.0]
    backoff = Backoff(initial_s=0.1, max_s=0.4, jitter=0.0, clock=lambda: now[0])
    assert not backoff.blocked()
    windows = []
    for _ in range(5):
        backoff.failure()
        windows.append(round(backoff.remaining_s, 6))
    assert windows == [0.1, 0.2, 0.4, 0.4, 0.4]
    now[0] += 0.39
    assert backoff.blocked()
    now[0] += 0.02
    assert not backoff.blocked()
    backoff.success()
    backoff.failure()
    assert round(backoff.remaining_s, 6) == 0.1
    with pytest.raises(ValueError):
        Backoff(initial_s=1.0, max_s=0.5)
