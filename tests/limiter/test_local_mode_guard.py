"""The guard's hooks for many edge nodes, on a real redis-server: the fail-open share follows the live-node
count (a fixed fraction still wins), a local tier decides from its leases in process and asks Redis when it
holds nothing, rates from the controller reach the leases on the same poll, strict tiers never lease."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from limiter.bucket import MICRO
from limiter.config import ConfigError, parse_config
from limiter.guard import Guard, Verdict
from limiter.lease_sync import LeaseSync
from limiter.local_bucket import LocalBucket
from limiter.metrics import LimiterMetrics
from limiter.redis_bucket import RedisBucket
from ratepilot.servers import RedisServer

CONFIG = """
redis: {url: REDIS_URL, timeout_ms: 1000}
default_tier: strict
tiers:
  strict:
    client:    {rate: 0.001, burst: 9}
    aggregate: {rate: 0.001, burst: 90}
    key_prefixes: [s_]
  local:
    client:    {rate: 0.001, burst: 9}
    aggregate: {rate: 0.001, burst: 90}
    mode: local
    key_prefixes: [l_]
costs:
  default: 1
  routes:
    - {method: POST, path: /v1/infer, cost: 2}
"""


def _guard(url: str, extra: str = "") -> tuple[Guard, CollectorRegistry]:
    registry = CollectorRegistry()
    guard = Guard(parse_config(CONFIG.replace("REDIS_URL", url) + extra, {}), None, LocalBucket(), LimiterMetrics(registry))
    return guard, registry


def test_the_fail_open_share_follows_the_live_nodes() -> None:
    guard, _ = _guard("redis://127.0.0.1:1/0")
    tier = guard.tiers["strict"]
    assert [(s.rate, s.capacity) for s in tier.local_specs] == [(0.001, 9), (0.001, 90)]  # alone: everything
    guard.set_live_nodes(3)
    assert [(s.rate, s.capacity) for s in tier.local_specs] == [(0.001 / 3, 3), (0.001 / 3, 30)]
    guard.set_live_nodes(6)  # a burst never drops below the largest request cost (2)
    assert [(s.rate, s.capacity) for s in tier.local_specs] == [(0.001 / 6, 2), (0.001 / 6, 15)]
    # the share survives a config reload and a rate change
    guard.apply_config(guard.config)
    assert tier.local_fraction == 1 / 6
    guard.apply_rates({"strict": replace(tier.rates, rate=0.002)})
    assert tier.local_specs[1].rate == pytest.approx(0.002 / 6)


def test_a_fixed_fraction_wins_over_the_live_nodes() -> None:
    guard, _ = _guard("redis://127.0.0.1:1/0", "local_guard: {fraction: 0.5}\n")
    guard.set_live_nodes(4)
    assert [(s.rate, s.capacity) for s in guard.tiers["local"].local_specs] == [(0.0005, 4.5), (0.0005, 45)]


def test_local_mode_is_refused_on_a_cluster() -> None:
    with pytest.raises(ConfigError, match="mode local needs a single Redis"):
        parse_config(CONFIG.replace("REDIS_URL", "redis://127.0.0.1:1/0").replace("timeout_ms: 1000", "timeout_ms: 1000, cluster: true"), {})


def test_a_local_tier_decides_from_its_leases_and_asks_redis_without_one(redis_server: RedisServer) -> None:
    guard, registry = _guard(redis_server.url)
    import redis.asyncio

    async def scenario() -> tuple[list[Verdict], list[Verdict], Verdict]:
        bucket = RedisBucket.from_url(redis_server.url, timeout_s=1.0)
        guard.redis_bucket = bucket
        client = redis.asyncio.Redis.from_url(redis_server.url)
        sync = LeaseSync(guard.nodes.leases, lambda: guard.config.local_mode, LimiterMetrics(CollectorRegistry()), CollectorRegistry())
        sync.connect(client)
        try:
            asked = [await guard.decide("l_alice", "GET", "/v1/items") for _ in range(2)]  # no lease yet: Redis
            assert await sync.sync_once()  # leases twice the 2 asked: 4 of the 7 left
            local = []
            for _ in range(4):
                pending = guard.start(b"l_alice", "GET", "/v1/items")
                assert isinstance(pending, Verdict)  # decided in process: no future, no round trip
                local.append(pending)
            fifth = guard.start(b"l_alice", "GET", "/v1/items")
            assert isinstance(fifth, asyncio.Future)  # its leases are spent: Redis decides
            local.append(await fifth)
            strict = await guard.decide("s_bob", "GET", "/v1/items")
            return asked, local, strict
        finally:
            await bucket.aclose()
            await client.aclose()

    asked, local, strict = asyncio.run(scenario())
    assert [(v.allowed, v.source) for v in asked] == [(True, "redis")] * 2
    assert [(v.allowed, v.source) for v in local] == [(True, "lease")] * 4 + [(True, "redis")]  # 5th: short, asks
    # RateLimit r: what this node holds (t: until that lease would be a full bucket, at 0.001 token/s)
    assert local[0].ratelimit_field() == b'"client";r=3;t=6000, "tier";r=3;t=87000'
    assert (strict.allowed, strict.source) == (True, "redis")
    assert not any(key.startswith("rp:{strict}") for key in guard.nodes.leases.leases)
    assert registry.get_sample_value("ratepilot_decisions_total", {"tier": "local", "outcome": "allowed", "source": "lease"}) == 4


def test_a_drained_lease_refuses_in_process_with_a_429_verdict(redis_server: RedisServer) -> None:
    guard, registry = _guard(redis_server.url)
    keys = [guard.tiers["local"].client_prefix + "l_carol", guard.tiers["local"].tier_key]
    for key in keys:
        guard.nodes.leases.decide([key], [_Bucket()])  # the leases exist...
    plan = guard.nodes.leases.plan()
    guard.nodes.leases.granted(plan, [0] * len(plan))  # ...and Redis had nothing left: drained
    verdict = guard.start(b"l_carol", "GET", "/v1/items")
    assert isinstance(verdict, Verdict)
    assert (verdict.allowed, verdict.source, verdict.limited_by) == (False, "lease", "client")
    assert registry.get_sample_value("ratepilot_decisions_total", {"tier": "local", "outcome": "throttled", "source": "lease"}) == 1


class _Bucket:
    rate, capacity_ut, cost_ut = 0.001, 9 * MICRO, MICRO


def test_controller_rates_reach_the_leases_on_the_same_poll() -> None:
    guard, _ = _guard("redis://127.0.0.1:1/0")
    tier = guard.tiers["local"]
    key = tier.client_prefix + "dave"
    guard.nodes.leases.decide([key, tier.tier_key], [_Bucket(), _Bucket()])
    guard.apply_rates({"local": replace(tier.rates, rate=0.5, burst=50, client_rate=0.25)})
    assert (guard.nodes.leases.leases[key].rate, guard.nodes.leases.leases[tier.tier_key].rate) == (0.25, 0.5)
    assert guard.nodes.leases.leases[tier.tier_key].capacity_ut == 50 * MICRO


def test_a_sync_sets_the_local_tier_gauges_from_the_redis_bucket() -> None:
    from limiter.leases import SyncItem

    guard, _ = _guard("redis://127.0.0.1:1/0")
    local, strict = guard.tiers["local"], guard.tiers["strict"]
    items = [SyncItem(local.tier_key, 0.001, 90 * MICRO, 0, 1), SyncItem(local.client_prefix + "x", 0.001, 9 * MICRO, 0, 1),
             SyncItem(strict.tier_key, 0.001, 90 * MICRO, 0, 1)]  # fmt: skip
    guard.leases_synced(items, [45 * MICRO, 1 * MICRO, 3 * MICRO])
    assert local.remaining_now() == pytest.approx(45, abs=0.01)
    assert local.utilization_now() == pytest.approx(50, abs=0.1)
    assert strict.remaining_now() == pytest.approx(90)  # a strict tier's gauges come from its own decisions
