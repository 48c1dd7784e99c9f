"""The Lua script decides exactly as the in-process reference, on one Redis and on a cluster."""

from __future__ import annotations

import asyncio
import math
import time

import hiredis
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.sync_redis_bucket import SyncRedisBucket
from limiter.bucket import MICRO, BucketError, BucketSpec, check_and_consume, validate_cost
from limiter.check_encoding import (
    SCRIPT_SHA,
    CheckRequest,
    batch_command,
    decisions_from_tokens,
    encode_check,
    pack_batch,
)
from limiter.errors import RedisUnavailable
from limiter.local_bucket import LocalBucket
from limiter.redis_bucket import RedisBucket

from .conftest import Backend

specs_strategy = st.lists(
    st.builds(
        BucketSpec,
        rate=st.floats(min_value=0.01, max_value=2e6, allow_nan=False, allow_infinity=False),
        capacity=st.floats(min_value=0.001, max_value=5e4, allow_nan=False, allow_infinity=False),
    ),
    min_size=1,
    max_size=3,
)
# each step: the cost as a fraction of the smallest capacity
# and a pause before it (mostly none: the server clock moves ~0.1 ms between calls anyway)
steps_strategy = st.lists(
    st.tuples(st.floats(min_value=1e-6, max_value=1.0), st.sampled_from([0.0, 0.0, 0.0, 0.001, 0.004])),
    min_size=1,
    max_size=25,
)


@pytest.fixture(scope="module")
def module_bucket(module_backend: Backend) -> SyncRedisBucket:
    """One SyncRedisBucket for all hypothesis examples of a backend."""
    return module_backend.sync_bucket()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=specs_strategy, steps=steps_strategy)
def test_script_matches_reference_and_local_bucket(
    module_backend: Backend, module_bucket: SyncRedisBucket, specs: list[BucketSpec], steps: list[tuple[float, float]]
) -> None:
    """Same (time, cost) sequence: the script, check_and_consume and LocalBucket agree bit for bit.

    Redis decides on its own clock; the reference and LocalBucket are fed the server time the
    script reports, so any difference is a difference in arithmetic.
    """
    bucket = module_bucket
    tag = module_backend.tag()
    keys = [f"rp:{{{tag}}}:c:{i}" for i in range(len(specs))]
    server_now = [0]
    local = LocalBucket(clock_us=lambda: server_now[0])
    states: list[tuple[int, int] | None] = [None] * len(specs)
    smallest = min(spec.capacity for spec in specs)
    for fraction, pause_s in steps:
        time.sleep(pause_s)
        cost = max(smallest * fraction, 1e-6)
        if any(math.floor(cost * MICRO) > spec.capacity_ut for spec in specs):
            cost = smallest
        reply = bucket.check_raw(keys, specs, cost)
        costs_ut = [validate_cost(cost, spec) for spec in specs]
        allowed, new_states, results = check_and_consume(states, specs, costs_ut, reply.now_us)
        states = list(new_states)
        assert (reply.allowed, reply.buckets) == (allowed, results)
        server_now[0] = reply.now_us
        local_allowed, local_decisions = local.check(keys, specs, cost)
        # the request path's Decisions (retry / reset computed from the tokens) match LocalBucket's
        tokens = [bucket_result[0] for bucket_result in reply.buckets]
        redis_decisions = decisions_from_tokens(reply.allowed, tokens, encode_check(keys, specs, cost).buckets)
        assert local_allowed == reply.allowed
        assert [d._replace(source="redis") for d in local_decisions] == redis_decisions


@settings(max_examples=60, deadline=None)
@given(
    checks=st.lists(
        st.tuples(specs_strategy, st.floats(min_value=1e-6, max_value=1.0), st.text(min_size=0, max_size=8)),
        min_size=1,
        max_size=4,
    )
)
def test_packed_batch_is_the_resp_of_the_batch_command(checks: list[tuple[list[BucketSpec], float, str]]) -> None:
    """The hand-built RESP of the edge's hot path equals hiredis' packing of the same EVALSHA."""
    encoded = [
        encode_check([f"rp:{{t}}:c:{client}{i}" for i in range(len(specs))], specs, fraction * min(s.capacity for s in specs))
        for specs, fraction, client in checks
    ]
    assert pack_batch(encoded) == bytes(hiredis.pack_command(tuple(batch_command(encoded))))


def test_all_or_nothing_across_client_and_tier(backend: Backend) -> None:
    """A request passes only when every bucket holds its cost; a refusal charges no bucket."""
    bucket = backend.sync_bucket()
    tag = backend.tag()
    tier = f"rp:{{{tag}}}:tier"
    slow = 1e-3  # tokens/s: no refill worth a token during the test
    client_spec, tier_spec = BucketSpec(slow, 5), BucketSpec(slow, 3)
    outcomes = [bucket.check([f"rp:{{{tag}}}:c:a", tier], [client_spec, tier_spec], 1)[0] for _ in range(4)]
    assert outcomes == [True, True, True, False]  # the tier bucket (3) ran out first
    allowed, decisions = bucket.check([f"rp:{{{tag}}}:c:a", tier], [client_spec, tier_spec], 1)
    assert not allowed
    assert math.floor(decisions[0].remaining) == 2  # the client bucket was not charged for refusals
    assert decisions[0].retry_after_s == 0.0 and decisions[1].retry_after_s > 0


def test_clock_going_back_refills_nothing(backend: Backend) -> None:
    """A stored timestamp ahead of the server clock (a failed-over server, say) refills nothing."""
    bucket = backend.sync_bucket()
    key = f"rp:{{{backend.tag()}}}:c:a"
    spec = BucketSpec(1000.0, 10)
    future_us = backend.server_time_us(key) + 60_000_000
    backend.admin.set(key, f"{2 * MICRO}:{future_us}")
    reply = bucket.check_raw([key], [spec], 1)
    assert reply.allowed and reply.buckets[0][0] == 1 * MICRO  # 2 - 1, no refill for negative elapsed
    allowed, states, results = check_and_consume([(2 * MICRO, future_us)], [spec], [MICRO], reply.now_us)
    assert (allowed, results) == (reply.allowed, reply.buckets)


def test_state_key_expires_once_full_and_full_bucket_is_deleted(backend: Backend) -> None:
    """The key lives about as long as the bucket needs to refill, and no key is kept for a full bucket."""
    bucket = backend.sync_bucket()
    tag = backend.tag()
    client_key, tier_key = f"rp:{{{tag}}}:c:a", f"rp:{{{tag}}}:tier"
    spec = BucketSpec(2.0, 10)  # 1 token costs 0.5 s of refill
    reply = bucket.check_raw([client_key], [spec], 1)
    full_at_ms = (reply.now_us + reply.buckets[0][2]) / 1000  # server clock
    expires_at_ms = backend.admin.pexpiretime(client_key)
    assert full_at_ms <= expires_at_ms <= full_at_ms + 1000 / spec.rate + 2
    # refused because the tier is empty: the client bucket was full and stays without a key
    backend.admin.set(tier_key, f"0:{backend.server_time_us(tier_key)}")
    other = f"rp:{{{tag}}}:c:b"
    reply = bucket.check_raw([other, tier_key], [spec, BucketSpec(1e-3, 10)], 1)
    assert not reply.allowed and reply.buckets[0][2] == 0
    assert backend.admin.exists(other) == 0


def test_cost_above_capacity_is_refused_before_any_call(backend: Backend) -> None:
    """BucketError from every API, and nothing reaches Redis (the client is closed: a call would fail)."""
    sync_bucket = SyncRedisBucket.from_url("redis://127.0.0.1:1/0", cluster=False)  # nobody listens there
    spec = BucketSpec(10, 5)
    with pytest.raises(BucketError, match="exceeds the bucket capacity"):
        sync_bucket.check(["rp:{t}:c:a"], [spec], 6)
    with pytest.raises(BucketError, match="exceeds the bucket capacity"):
        sync_bucket.check_many([CheckRequest(["rp:{t}:c:a"], [spec], 1), CheckRequest(["rp:{t}:c:b"], [spec], 5.5)])
    for bad_cost in (0, -1, float("nan"), float("inf")):
        with pytest.raises(BucketError):
            sync_bucket.check(["rp:{t}:c:a"], [spec], bad_cost)
    with pytest.raises(BucketError, match="one spec per key"):
        sync_bucket.check(["rp:{t}:c:a", "rp:{t}:tier"], [spec], 1)
    assert sync_bucket.backoff.failures == 0  # no call was attempted

    async def async_refusal() -> None:
        bucket = backend.async_bucket()
        with pytest.raises(BucketError, match="exceeds the bucket capacity"):
            await bucket.check(["rp:{t}:c:a"], [spec], 6)
        assert bucket.round_trips == 0
        await bucket.aclose()

    asyncio.run(async_refusal())


def test_batch_equals_calls_in_order(backend: Backend) -> None:
    """check_many gives the decisions one call per check would, in order, in one round trip."""
    bucket = backend.sync_bucket()
    tags = [backend.tag() for _ in range(3)]  # different slots in the cluster
    spec = BucketSpec(1e-3, 4)
    requests = [CheckRequest([f"rp:{{{tags[i % 3]}}}:c:a"], [spec], 1) for i in range(18)]
    outcomes = [allowed for allowed, _ in bucket.check_many(requests)]
    assert outcomes == [True] * 12 + [False] * 6  # 4 per key, then refused
    assert bucket.check_many([]) == []


def test_async_checks_of_one_turn_share_one_round_trip(backend: Backend) -> None:
    """Checks gathered in one event-loop turn go out as one pipeline (chunking off); each is still atomic."""

    async def scenario() -> tuple[list[bool], int, int]:
        bucket = backend.async_bucket(chunk=1000)
        key = f"rp:{{{backend.tag()}}}:c:a"
        results = await asyncio.gather(*(bucket.check([key], [BucketSpec(1e-3, 10)], 1) for _ in range(40)))
        trips = bucket.round_trips - bucket.script_loads  # a NOSCRIPT resend is one extra trip
        loads = bucket.script_loads
        await bucket.aclose()
        return [allowed for allowed, _ in results], trips, loads

    outcomes, trips, loads = asyncio.run(scenario())
    assert outcomes == [True] * 10 + [False] * 30
    assert trips == 1 and loads <= 1


def test_a_turn_goes_out_in_chunks_and_decides_in_order(backend: Backend) -> None:
    """Single Redis: every `chunk` checks of a turn go out at once while a round trip is free, the rest
    at the end of the turn; the checks still decide in the order they were asked. A cluster sends one
    pipeline per turn."""

    async def scenario() -> tuple[list[bool], int]:
        bucket = backend.async_bucket(chunk=8, max_in_flight=3)
        await bucket.warm_up()
        key = f"rp:{{{backend.tag()}}}:c:a"
        before = bucket.round_trips
        results = await asyncio.gather(*(bucket.check([key], [BucketSpec(1e-3, 20)], 1) for _ in range(40)))
        trips = bucket.round_trips - before
        await bucket.aclose()
        return [allowed for allowed, _ in results], trips

    outcomes, trips = asyncio.run(scenario())
    assert outcomes == [True] * 20 + [False] * 20
    # 3 chunks of 8 while round trips are free, the other 16 at the end of the turn
    assert trips == (1 if backend.cluster else 4)


def test_async_queues_behind_in_flight_pipelines(backend: Backend) -> None:
    """With max_in_flight=1, checks asked while a pipeline is out gather into the next one."""

    async def scenario() -> tuple[int, int]:
        bucket = backend.async_bucket(max_in_flight=1)
        await bucket.check([f"rp:{{{backend.tag()}}}:c:warm"], [BucketSpec(1, 1)], 1)  # script loaded
        tag = backend.tag()
        before = bucket.round_trips

        async def one(i: int) -> bool:
            await asyncio.sleep(0)  # spread the asks over a few turns
            for _ in range(i % 3):
                await asyncio.sleep(0)
            allowed, _ = await bucket.check([f"rp:{{{tag}}}:c:{i}"], [BucketSpec(1, 1)], 1)
            return allowed

        outcomes = await asyncio.gather(*(one(i) for i in range(30)))
        trips = bucket.round_trips - before
        await bucket.aclose()
        return sum(outcomes), trips

    admitted, trips = asyncio.run(scenario())
    assert admitted == 30 and 1 <= trips <= 3


def test_client_that_retries_is_refused() -> None:
    """A client configured to resend failed commands could charge a bucket twice: refused."""
    with pytest.raises(ValueError, match="retries failed commands"):
        SyncRedisBucket(redis.Redis(port=1))
    with pytest.raises(ValueError, match="retries failed commands"):
        RedisBucket(redis.asyncio.Redis(port=1))


def test_script_sha_is_what_redis_computes(backend: Backend) -> None:
    """The locally computed SHA1 is the one SCRIPT LOAD returns (EVALSHA needs no round trip first)."""
    from limiter.check_encoding import SCRIPT

    assert backend.admin.script_load(SCRIPT) == SCRIPT_SHA


def test_warm_up_loads_the_script_and_connects(backend: Backend) -> None:
    """After warm_up() the first check needs neither SCRIPT LOAD nor a resend; a dead Redis raises RedisUnavailable."""

    async def scenario() -> tuple[int, int, bool]:
        bucket = backend.async_bucket()
        await bucket.warm_up()
        loads_after_warm_up = bucket.script_loads
        allowed, _ = await bucket.check([f"rp:{{{backend.tag()}}}:c:a"], [BucketSpec(1, 1)], 1)
        trips = bucket.round_trips
        await bucket.aclose()
        return loads_after_warm_up, trips, allowed

    loads, trips, allowed = asyncio.run(scenario())
    assert loads == 1 and trips == 1 and allowed

    async def dead() -> None:
        bucket = RedisBucket.from_url("redis://127.0.0.1:1/0", timeout_s=0.2)
        with pytest.raises(RedisUnavailable):
            await bucket.warm_up(timeout_s=0.5)
        await bucket.aclose()

    asyncio.run(dead())


def test_state_left_as_a_hash_by_the_previous_script_is_read_and_replaced(backend: Backend) -> None:
    """Bucket state in the old hash form (fields t, ts) decides like the string form, then becomes one."""
    bucket = backend.sync_bucket()
    key = f"rp:{{{backend.tag()}}}:c:legacy"
    spec = BucketSpec(1e-3, 10)  # no refill worth a token during the test
    now_us = backend.server_time_us(key)
    backend.admin.hset(key, mapping={"t": 3 * MICRO, "ts": now_us})
    reply = bucket.check_raw([key], [spec], 1)
    allowed, _, results = check_and_consume([(3 * MICRO, now_us)], [spec], [MICRO], reply.now_us)
    assert (reply.allowed, reply.buckets) == (allowed, results)
    assert backend.admin.type(key) == b"string"
    assert backend.admin.get(key) == f"{results[0][0]}:{reply.now_us}".encode()


def test_checks_of_one_turn_decide_as_separate_calls_in_order(backend: Backend) -> None:
    """Checks coalesced into one round trip decide exactly as the reference run one after the other."""
    tag = backend.tag()
    tier = f"rp:{{{tag}}}:tier"
    client_spec, tier_spec = BucketSpec(1e-3, 4), BucketSpec(1e-3, 9)
    clients = [f"rp:{{{tag}}}:c:{i % 3}" for i in range(12)]
    costs = [1.0, 2.0, 0.5, 3.0] * 3

    async def scenario() -> list:
        bucket = backend.async_bucket(chunk=1000)  # all twelve in one script
        try:
            await bucket.warm_up()
            trips = bucket.round_trips
            replies = await asyncio.gather(
                *(bucket.check_raw([c, tier], [client_spec, tier_spec], cost) for c, cost in zip(clients, costs, strict=True))
            )
            return [replies, bucket.round_trips - trips]
        finally:
            await bucket.aclose()

    replies, round_trips = asyncio.run(scenario())
    assert round_trips == 1
    states: dict[str, tuple[int, int] | None] = {}
    for client, cost, reply in zip(clients, costs, replies, strict=True):
        specs = [client_spec, tier_spec]
        costs_ut = [validate_cost(cost, spec) for spec in specs]
        allowed, new_states, results = check_and_consume(
            [states.get(client), states.get(tier)], specs, costs_ut, reply.now_us
        )
        states[client], states[tier] = new_states
        assert (reply.allowed, reply.buckets) == (allowed, results)
    assert [r.allowed for r in replies].count(True) >= 3  # the scenario exercises both outcomes
    assert not all(r.allowed for r in replies)


slow_specs = st.builds(
    BucketSpec,
    rate=st.floats(min_value=1e-4, max_value=1e-2, allow_nan=False, allow_infinity=False),
    capacity=st.floats(min_value=1.0, max_value=5e4, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    # slow refills (a key lives >= ~1 s), so no key expires before the test has read it back
    spec_pairs=st.lists(st.lists(slow_specs, min_size=2, max_size=2), min_size=1, max_size=2),
    steps=st.lists(
        st.tuples(st.integers(0, 2), st.floats(min_value=0.01, max_value=1.0), st.integers(0, 1)), min_size=1, max_size=30
    ),
)
def test_one_script_writes_back_the_state_of_calls_in_order(
    module_backend: Backend,
    module_bucket: SyncRedisBucket,
    spec_pairs: list[list[BucketSpec]],
    steps: list[tuple[int, float, int]],
) -> None:
    """A batch (one script on a single Redis) that touches keys again and again, even with rates changed
    between its checks, answers as the reference run call by call, and leaves every key as the last of
    those calls would: the state string, no key for a full bucket, an expiry once it is full again."""
    tag = module_backend.tag()
    tier = f"rp:{{{tag}}}:tier"
    clients = [f"rp:{{{tag}}}:c:{i}" for i in range(3)]
    requests = []
    for client, fraction, pair in steps:
        specs = spec_pairs[pair % len(spec_pairs)][:2]
        smallest = min(spec.capacity for pair_specs in spec_pairs for spec in pair_specs[:2])
        requests.append(CheckRequest([clients[client], tier], specs, smallest * fraction))
    replies = module_bucket.check_many_raw(requests)
    states: dict[str, tuple[int, int] | None] = {}
    resets: dict[str, int] = {}
    for request, reply in zip(requests, replies, strict=True):
        costs_ut = [validate_cost(request.cost, spec) for spec in request.specs]
        allowed, new_states, results = check_and_consume(
            [states.get(request.keys[0]), states.get(tier)], list(request.specs), costs_ut, reply.now_us
        )
        assert (reply.allowed, reply.buckets) == (allowed, results)
        for key, state, result in zip(request.keys, new_states, results, strict=True):
            # a bucket full again has no key: the next check reads it as full at its own capacity
            states[key], resets[key] = (state if result[2] else None), result[2]
    admin = module_backend.admin
    for key, state in states.items():
        stored = admin.get(key)
        if state is None:
            assert stored is None
            continue
        assert stored == f"{state[0]}:{state[1]}".encode()
        assert (state[1] + resets[key]) / 1000 <= admin.pexpiretime(key)


def test_a_check_meeting_a_redis_error_fails_alone(backend: Backend) -> None:
    """A key of the wrong type fails its own check; the other checks of the same round trip are decided."""
    tag = backend.tag()
    bad = f"rp:{{{tag}}}:c:bad"
    backend.admin.rpush(bad, "not a bucket")
    spec = BucketSpec(10.0, 10)

    async def scenario() -> tuple[object, ...]:
        bucket = backend.async_bucket()
        try:
            await bucket.warm_up()
            return await asyncio.gather(
                bucket.check([f"rp:{{{tag}}}:c:a"], [spec], 1),
                bucket.check([bad], [spec], 1),
                bucket.check([f"rp:{{{tag}}}:c:b"], [spec], 1),
                return_exceptions=True,
            )
        finally:
            await bucket.aclose()

    first, failed, last = asyncio.run(scenario())
    assert isinstance(failed, RedisUnavailable) and "WRONGTYPE" in str(failed)
    assert first[0] and last[0]  # type: ignore[index]
    assert backend.admin.lrange(bad, 0, -1) == [b"not a bucket"]
