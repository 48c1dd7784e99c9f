"""Local mode's arithmetic (exact next states of a node's leases) and lease.lua against a real redis-server:
grants debit the very bucket strict mode checks, returns are capped at the capacity, nothing is spent twice."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio
from prometheus_client import CollectorRegistry

from benchmarks.sync_redis_bucket import SyncRedisBucket
from limiter.bucket import MICRO, BucketSpec
from limiter.check_encoding import check_template
from limiter.config import LocalModeConfig
from limiter.lease_sync import LeaseSync, sync_args
from limiter.leases import ALLOW, ASK, FORGET_AFTER_SYNCS, REFUSE, LeaseTable, SyncItem
from limiter.metrics import LimiterMetrics
from ratepilot.servers import RedisServer

CLIENT, TIER = "rp:{t}:c:alice", "rp:{t}:tier"
KEYS = [CLIENT, TIER]
SPECS = [BucketSpec(10.0, 20.0), BucketSpec(100.0, 1000.0)]  # client 10/s burst 20, tier 100/s burst 1000


def buckets(cost: float = 1.0) -> list:  # type: ignore[type-arg]
    return check_template(SPECS, cost)[1]


def test_a_cold_bucket_asks_redis_and_the_sync_asks_twice_the_need() -> None:
    table = LeaseTable()
    assert table.decide(KEYS, buckets()) == (ASK, [0, 0])
    assert table.decide(KEYS, buckets(3.0)) == (ASK, [0, 0])
    # sent to Redis: both buckets were asked 4 tokens
    plan = table.plan()
    assert plan == [SyncItem(CLIENT, 10.0, 20 * MICRO, 0, 8 * MICRO), SyncItem(TIER, 100.0, 1000 * MICRO, 0, 8 * MICRO)]
    table.granted(plan, [8 * MICRO, 8 * MICRO])
    assert table.decide(KEYS, buckets(3.0)) == (ALLOW, [5 * MICRO, 5 * MICRO])
    assert table.decide(KEYS, buckets(5.0)) == (ALLOW, [0, 0])
    assert table.decide(KEYS, buckets()) == (ASK, [0, 0])  # short, but its grant was full: not drained
    plan = table.plan()
    assert plan == [SyncItem(CLIENT, 10.0, 20 * MICRO, 0, 18 * MICRO), SyncItem(TIER, 100.0, 1000 * MICRO, 0, 18 * MICRO)]


def test_the_two_bucket_path_decides_as_the_general_one() -> None:
    """decide()'s straight-line path for [client, tier] gives the outcomes, tokens and plans of the
    loop over any number of buckets, through asks, drains, refusals and syncs."""
    import random

    rng = random.Random(7)
    fast, general = LeaseTable(), LeaseTable()
    for _ in range(40):
        for _ in range(rng.randrange(1, 12)):
            cost = buckets(rng.choice([1.0, 2.0, 5.0]))
            assert fast.decide(KEYS, cost) == general._decide_any(KEYS, cost)
        plan = fast.plan()
        assert plan == general.plan()
        grants = [rng.randrange(0, item.want_ut + 1) if item.want_ut else 0 for item in plan]
        fast.granted(plan, grants)
        general.granted(plan, grants)


def test_a_short_grant_drains_and_refuses_in_process_until_the_next_sync() -> None:
    table = LeaseTable()
    table.decide(KEYS, buckets(5.0))
    plan = table.plan()
    assert [item.want_ut for item in plan] == [10 * MICRO, 10 * MICRO]
    table.granted(plan, [4 * MICRO, 10 * MICRO])  # the client bucket had 4 of the 10 asked: drained
    for _ in range(3):
        assert table.decide(KEYS, buckets(5.0)) == (REFUSE, [4 * MICRO, 10 * MICRO])
    # refused in process: only the drained client bucket was asked (the tier lease stays as it is)
    plan = table.plan()
    assert plan == [SyncItem(CLIENT, 10.0, 20 * MICRO, 0, 16 * MICRO)]
    table.unreachable()  # a failed sync: a drained lease no longer refuses, it asks (then the local guard)
    assert table.decide(KEYS, buckets(5.0))[0] == ASK


def test_targets_are_capped_at_the_capacity_and_excess_is_given_back() -> None:
    table = LeaseTable()
    for _ in range(30):
        table.decide(KEYS, buckets())  # 30 tokens asked of a burst-20 client bucket
    plan = table.plan()
    assert plan == [SyncItem(CLIENT, 10.0, 20 * MICRO, 0, 20 * MICRO), SyncItem(TIER, 100.0, 1000 * MICRO, 0, 60 * MICRO)]
    table.granted(plan, [20 * MICRO, 60 * MICRO])
    table.decide(KEYS, buckets(2.0))  # the need fell to 2 tokens: target 4, the rest goes back
    plan = table.plan()
    assert plan == [SyncItem(CLIENT, 10.0, 20 * MICRO, 14 * MICRO, 0), SyncItem(TIER, 100.0, 1000 * MICRO, 54 * MICRO, 0)]
    assert table.held_ut(CLIENT) == 4 * MICRO  # given back at plan time: never spendable again


def test_idle_leases_are_kept_then_returned_whole_and_forgotten() -> None:
    table = LeaseTable()
    table.decide(KEYS, buckets())
    plan = table.plan()
    table.granted(plan, [2 * MICRO, 2 * MICRO])
    for _ in range(FORGET_AFTER_SYNCS - 1):
        assert table.plan() == []  # idle: keeps its 2 tokens
    assert table.held_ut(CLIENT) == 2 * MICRO
    assert table.plan() == [SyncItem(CLIENT, 10.0, 20 * MICRO, 2 * MICRO, 0), SyncItem(TIER, 100.0, 1000 * MICRO, 2 * MICRO, 0)]
    assert len(table) == 0
    assert table.decide(KEYS, buckets())[0] == ASK  # cold again


def test_respec_follows_new_rates_and_trims_what_is_held() -> None:
    table = LeaseTable()
    for _ in range(10):
        table.decide(KEYS, buckets())
    plan = table.plan()
    table.granted(plan, [20 * MICRO, 20 * MICRO])
    table.respec("rp:{t}:c:", 5.0, 8 * MICRO)
    assert table.leases[CLIENT].rate == 5.0 and table.held_ut(CLIENT) == 8 * MICRO
    assert table.leases[TIER].rate == 100.0 and table.held_ut(TIER) == 20 * MICRO


def test_sync_args_flatten_per_key() -> None:
    items = [SyncItem("a", 1.5, 10, 2, 3), SyncItem("b", 2.0, 20, 0, 4)]
    assert sync_args(items) == (["a", "b"], [1.5, 10, 2, 3, 2.0, 20, 0, 4])


# -- lease.lua on a real redis-server ---------------------------------------------------------------


def _lease(client: redis.Redis, items: list[SyncItem]) -> list[int]:
    from limiter.lease_sync import SCRIPT

    keys, args = sync_args(items)
    reply = client.eval(SCRIPT, len(keys), *keys, *args)
    return [int(x) for x in reply[1::2]]


def test_grants_debit_the_bucket_strict_mode_checks(redis_client: redis.Redis) -> None:
    assert _lease(redis_client, [SyncItem(CLIENT, 0.001, 20 * MICRO, 0, 15 * MICRO)]) == [15 * MICRO]
    strict = SyncRedisBucket(redis_client)
    # 5 tokens left for strict checks (the refill in between is far below one token)
    allowed = [strict.check([CLIENT], [BucketSpec(0.001, 20.0)], 1.0)[0] for _ in range(6)]
    assert allowed == [True] * 5 + [False]
    # a grant never exceeds what the bucket holds
    assert _lease(redis_client, [SyncItem(CLIENT, 0.001, 20 * MICRO, 0, 5 * MICRO)])[0] < MICRO


def test_returns_are_capped_at_the_capacity(redis_client: redis.Redis) -> None:
    spec_item = SyncItem(TIER, 0.001, 10 * MICRO, 0, 4 * MICRO)
    assert _lease(redis_client, [spec_item]) == [4 * MICRO]
    # give back 9 (more than was taken): the bucket is full again, not 15 over
    assert _lease(redis_client, [SyncItem(TIER, 0.001, 10 * MICRO, 9 * MICRO, 0)]) == [0]
    assert redis_client.get(TIER) is None  # full: deleted, as token_bucket.lua does
    assert _lease(redis_client, [SyncItem(TIER, 0.001, 10 * MICRO, 0, 100 * MICRO)]) == [10 * MICRO]


def test_the_reply_gives_what_each_bucket_has_left(redis_client: redis.Redis) -> None:
    from limiter.lease_sync import SCRIPT

    keys, args = sync_args([SyncItem(CLIENT, 0.001, 20 * MICRO, 0, 15 * MICRO), SyncItem(TIER, 0.001, 10 * MICRO, 0, 4 * MICRO)])
    now_us, *rest = (int(x) for x in redis_client.eval(SCRIPT, len(keys), *keys, *args))
    assert now_us > 0 and rest == [15 * MICRO, 5 * MICRO, 4 * MICRO, 6 * MICRO]


def test_a_failed_sync_grants_and_returns_nothing(redis_server: RedisServer) -> None:
    table = LeaseTable()
    for _ in range(4):
        table.decide(KEYS, buckets())
    registry = CollectorRegistry()
    metrics = LimiterMetrics(registry)
    synced: list[tuple[list[SyncItem], list[int]]] = []

    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        sync = LeaseSync(table, lambda: LocalModeConfig(), metrics, registry, on_synced=lambda i, t: synced.append((list(i), list(t))))
        sync.connect(client)
        assert await sync.sync_once()
        assert table.held_ut(CLIENT) == 8 * MICRO
        for _ in range(2):
            assert table.decide(KEYS, buckets())[0] == ALLOW  # 6 left of each
        redis_server.stop()
        # the plan gives back 2 of each (target: twice the 2 asked); the call fails: they are gone
        assert not await sync.sync_once()
        await client.aclose()

    asyncio.run(scenario())
    assert registry.get_sample_value("ratepilot_redis_errors_total", {"kind": "lease_sync"}) == 1
    assert registry.get_sample_value("ratepilot_lease_syncs_total", {"outcome": "ok"}) == 1
    assert registry.get_sample_value("ratepilot_lease_syncs_total", {"outcome": "failed"}) == 1
    assert [tokens for _, tokens in synced] == [[12 * MICRO, 992 * MICRO]]  # the one sync that got through
    assert table.held_ut(CLIENT) == table.held_ut(TIER) == 4 * MICRO
    # served from what it holds, then asks (which falls back to the local guard while Redis is away)
    assert [table.decide(KEYS, buckets())[0] for _ in range(5)] == [ALLOW] * 4 + [ASK]


@pytest.mark.parametrize("nodes", [1, 3])
def test_nodes_never_spend_more_than_the_bucket_granted(redis_client: redis.Redis, nodes: int) -> None:
    """N lease tables hammering one client bucket through many syncs admit exactly what Redis granted,
    never more than the burst plus the refill (the strict bound)."""
    tables = [LeaseTable() for _ in range(nodes)]
    specs = [BucketSpec(0.001, 20.0), BucketSpec(0.001, 1000.0)]
    cost = check_template(specs, 1.0)[1]
    strict = SyncRedisBucket(redis_client)
    admitted = 0
    for _ in range(6):
        for table in tables:
            for _ in range(10):
                outcome, _ = table.decide(KEYS, cost)
                if outcome == ALLOW:
                    admitted += 1
                elif outcome == ASK:
                    admitted += strict.check(KEYS, specs, 1.0)[0]
        for table in tables:
            plan = table.plan()
            table.granted(plan, _lease(redis_client, plan) if plan else [])
    held = sum(table.held_ut(CLIENT) for table in tables) // MICRO
    assert admitted + held == 20  # every token of the burst, once; the refill is below one token
