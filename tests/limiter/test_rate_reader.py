"""Resolving the rate table (pure) and reading it from a real Redis, with the server clock."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis
import redis.asyncio

from limiter.config import LimiterConfig, parse_config
from limiter.rate_reader import RateReader, TierRates, resolve_all, resolve_tier
from limiter.rate_table import RATES_KEY, RateEntry
from ratepilot.servers import RedisServer
from tests.limiter.support import BASE_CONFIG

NOW = 1_800_000_000.0


@pytest.fixture
def config() -> LimiterConfig:
    """The test config with faster static rates (free tier 10/s, clients 2/s)."""
    text = BASE_CONFIG.replace("REDIS_URL", "redis://127.0.0.1:1/0")
    text = text.replace("client:    {rate: 0.001, burst: 5}", "client:    {rate: 2, burst: 5}", 1)
    text = text.replace("aggregate: {rate: 0.001, burst: 8}", "aggregate: {rate: 10, burst: 8}", 1)
    return parse_config(text, {})


def entry(rate: float, burst: float = 20, expires_in: float = 30, source: str = "controller") -> str:
    """A rate-table entry written NOW."""
    return RateEntry(rate, burst, 3, source, NOW - 2, NOW + expires_in).to_json()


def test_missing_entry_means_static(config: LimiterConfig) -> None:
    rates, warning = resolve_tier("free", None, NOW, config)
    assert warning is None
    assert rates == TierRates(10, 8, 2, 5, "static")


def test_valid_entry_sets_tier_rate_and_scales_clients_down(config: LimiterConfig) -> None:
    rates, warning = resolve_tier("free", entry(5.0), NOW, config)
    assert warning is None
    assert (rates.rate, rates.burst, rates.source, rates.version) == (5.0, 20, "controller", 3)
    assert rates.client_rate == pytest.approx(1.0)  # 2/s * 5/10
    assert rates.client_burst == 5
    assert rates.age_s == pytest.approx(2.0)


def test_client_rate_is_capped_at_client_scale_max(config: LimiterConfig) -> None:
    rates, _ = resolve_tier("free", entry(40.0, source="override"), NOW, config)
    assert rates.client_rate == 2.0  # scale 4 capped at 1
    assert rates.source == "override"
    raised = config.model_copy(update={"rate_table": config.rate_table.model_copy(update={"client_scale_max": 2.0})})
    rates, _ = resolve_tier("free", entry(40.0), NOW, raised)
    assert rates.client_rate == 4.0


def test_burst_never_below_the_largest_cost(config: LimiterConfig) -> None:
    rates, _ = resolve_tier("free", entry(5.0, burst=1.0), NOW, config)
    assert rates.burst == config.costs.max_cost() == 3


def test_expired_entry_falls_back_to_static(config: LimiterConfig) -> None:
    rates, warning = resolve_tier("free", entry(5.0, expires_in=-0.001), NOW, config)
    assert warning is None
    assert rates == TierRates(10, 8, 2, 5, "fallback")


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe",
        "[]",
        json.dumps({"rate": 0, "burst": 1, "version": 1, "source": "controller", "expires_at": NOW + 9}),
        json.dumps({"rate": -1, "burst": 1, "version": 1, "source": "controller", "expires_at": NOW + 9}),
        json.dumps({"rate": 1e300, "burst": 1, "version": 1, "source": "controller", "expires_at": NOW + 9}),
        json.dumps({"rate": "7", "burst": 1, "version": 1, "source": "controller", "expires_at": NOW + 9}),
        json.dumps({"rate": 7, "burst": 1, "version": 1, "source": "me", "expires_at": NOW + 9}),
        json.dumps({"rate": 7, "burst": 1, "version": 1, "source": "controller"}),
    ],
)
def test_garbage_is_ignored_with_a_warning(config: LimiterConfig, raw: str | bytes) -> None:
    rates, warning = resolve_tier("free", raw, NOW, config)
    assert rates == TierRates(10, 8, 2, 5, "fallback")
    assert warning is not None and "free" in warning


def test_unknown_tiers_in_the_table_are_ignored(config: LimiterConfig) -> None:
    rates, warnings = resolve_all({b"gold": entry(5.0), b"pro": entry(6.0)}, NOW, config)
    assert set(rates) == set(config.tiers)
    assert rates["pro"].rate == 6.0 and rates["free"].source == "static"
    assert warnings == {}


def _write(client: redis.Redis, tier: str, rate: float, ttl_s: float) -> None:
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    client.hset(RATES_KEY, tier, RateEntry(rate, 50, 1, "controller", now, now + ttl_s).to_json())


def test_reader_against_real_redis_and_outage(config: LimiterConfig, redis_server: RedisServer) -> None:
    sync = redis.Redis.from_url(redis_server.url)
    _write(sync, "free", 4.0, ttl_s=60)
    _write(sync, "pro", 9.0, ttl_s=0.3)
    published: list[dict[str, TierRates]] = []

    async def scenario() -> list[dict[str, TierRates]]:
        client = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        reader = RateReader(client, lambda: config, published.append)
        first = await reader.poll_once()
        redis_server.stop()
        await asyncio.sleep(0.4)  # the pro entry expires meanwhile (server clock ~ ours here)
        during = await reader.poll_once()
        await client.aclose()
        return [first, during]

    first, during = asyncio.run(scenario())
    assert (first["free"].rate, first["free"].source) == (4.0, "controller")
    assert (first["pro"].rate, first["pro"].source) == (9.0, "controller")
    # Redis gone: the unexpired entry is kept, the expired one falls back to static
    assert (during["free"].rate, during["free"].source) == (4.0, "controller")
    assert (during["pro"].rate, during["pro"].source) == (config.tiers["pro"].aggregate.rate, "fallback")
    assert published == [first, during]
    sync.close()


def test_reader_uses_the_server_clock(config: LimiterConfig, redis_client: redis.Redis) -> None:
    # an entry that is still valid on the server clock but would look expired on a clock 1 h ahead
    seconds, _ = redis_client.time()
    redis_client.hset(RATES_KEY, "free", RateEntry(4.0, 50, 1, "controller", seconds, seconds + 30).to_json())
    where = redis_client.connection_pool.connection_kwargs

    async def scenario() -> dict[str, TierRates]:
        client = redis.asyncio.Redis(host=where["host"], port=where["port"])
        reader = RateReader(client, lambda: config, lambda rates: None, clock=lambda: time.monotonic() + 3600)
        try:
            return await reader.poll_once()
        finally:
            await client.aclose()

    assert asyncio.run(scenario())["free"].source == "controller"
