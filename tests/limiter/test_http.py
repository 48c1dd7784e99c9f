"""The middleware through a real uvicorn and a real redis-server: headers, 429s, tiers, costs, reloads, metrics."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from limiter.rate_table import RATES_KEY, RateEntry
from ratepilot.servers import RedisServer
from tests.limiter.support import RATELIMIT, SLOW, RunningEdge, wait_until

POLICY = re.compile(r'^"client";q=(\d+);w=(\d+), "tier";q=(\d+);w=(\d+)$')

EdgeFactory = Callable[..., RunningEdge]


@pytest.fixture
def edge(edge_factory: EdgeFactory, redis_server_session: RedisServer, redis_client: redis.Redis) -> RunningEdge:
    """An edge on the (flushed) session Redis with the base test config."""
    return edge_factory(redis_server_session.url)


def test_allowed_responses_carry_ratelimit_headers(edge: RunningEdge) -> None:
    response = edge.get("/v1/items", key="free_a")
    assert response.status_code == 200
    policy = POLICY.match(response.headers["ratelimit-policy"])
    assert policy is not None
    assert (int(policy[1]), int(policy[3])) == (5, 8)  # client burst 5, tier burst 8
    current = RATELIMIT.match(response.headers["ratelimit"])
    assert current is not None
    assert (int(current[1]), int(current[3])) == (4, 7)
    assert "retry-after" not in response.headers


def test_429_body_and_headers(edge: RunningEdge, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(5):
        assert edge.get("/v1/items", key="free_a").status_code == 200
    with caplog.at_level(logging.INFO, logger="ratepilot.throttle"):
        response = edge.client.get("/v1/items", headers={"x-api-key": "free_a", "x-request-id": "req-42"})
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/json"
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1 / SLOW * 0.99  # a whole token at 0.001 tokens/s takes ~1000 s
    assert POLICY.match(response.headers["ratelimit-policy"])
    current = RATELIMIT.match(response.headers["ratelimit"])
    assert current is not None and int(current[1]) == 0
    body = response.json()
    assert body["error"] == "rate_limited"
    assert body["limited_by"] == "client"
    assert body["tier"] == "free"
    assert body["tokens_needed"] == 1
    assert body["request_id"] == "req-42"
    assert body["retry_after_s"] > 0
    records = [r for r in caplog.records if r.name == "ratepilot.throttle"]
    assert len(records) == 1
    fields = records[0].fields  # type: ignore[attr-defined]
    assert fields["request_id"] == "req-42"
    assert fields["tier"] == "free" and fields["tokens_needed"] == 1 and fields["remaining"] == 0
    assert fields["tenant"] != "free_a" and len(fields["tenant"]) == 12  # a fingerprint, never the key


def test_client_and_tier_buckets_both_enforced(edge: RunningEdge) -> None:
    # free: each client 5, the whole tier 8. Client a is stopped by its own bucket...
    statuses_a = [edge.get("/v1/items", key="free_a").status_code for _ in range(6)]
    assert statuses_a == [200] * 5 + [429]
    # ...client b by the tier: only 3 tier tokens were left
    statuses_b = [edge.get("/v1/items", key="free_b").status_code for _ in range(4)]
    assert statuses_b == [200] * 3 + [429]
    refused = edge.get("/v1/items", key="free_c")
    assert refused.status_code == 429 and refused.json()["limited_by"] == "tier"
    # another tier is untouched
    assert edge.get("/v1/items", key="pro_a").status_code == 200


def test_anonymous_clients_share_one_bucket_and_exact_keys_map(edge: RunningEdge) -> None:
    assert [edge.get("/v1/items").status_code for _ in range(6)] == [200] * 5 + [429]
    rating = edge.get("/rating", key="vip-key").json()
    assert rating["tier"] == "pro"


def test_weighted_costs(edge: RunningEdge) -> None:
    # pro client burst 12: four inferences at 3 tokens, then nothing is left for either route
    assert [edge.post("/v1/infer", key="pro_a").status_code for _ in range(4)] == [200] * 4
    refused = edge.post("/v1/infer", key="pro_a")
    assert refused.status_code == 429 and refused.json()["tokens_needed"] == 3
    assert edge.get("/v1/items", key="pro_a").status_code == 429
    # a cheap request still fits where an expensive one does not
    for _ in range(3):
        assert edge.get("/v1/items", key="pro_b").status_code == 200
    remaining = edge.get("/rating", key="pro_b").json()["buckets"]["client"]["remaining"]
    assert remaining == pytest.approx(8, abs=0.1)


def test_health_and_metrics_are_not_limited(edge: RunningEdge) -> None:
    for _ in range(20):
        assert edge.get("/health").status_code == 200
    assert edge.get("/metrics").status_code == 200


def test_metrics_use_the_documented_names(edge: RunningEdge) -> None:
    for _ in range(6):
        edge.get("/v1/items", key="free_a")
    text = edge.get("/metrics").text
    for name in [
        'ratepilot_decisions_total{outcome="allowed",source="redis",tier="free"} 5.0',
        'ratepilot_decisions_total{outcome="throttled",source="redis",tier="free"} 1.0',
        'ratepilot_decision_tokens_total{outcome="allowed",tier="free"} 5.0',
        "ratepilot_check_seconds_count 6.0",
        'ratepilot_tokens_remaining{tier="free"}',
        'token_bucket_utilization{tier="free"}',
        'ratepilot_refill_rate{tier="free"} 0.001',
        'ratepilot_rate_source{source="static",tier="free"} 1.0',
        "ratepilot_redis_errors_total",
        "ratepilot_backend_capacity_rps",
        "ratepilot_backend_cpu_utilization",
    ]:
        assert name in text, name
    utilization = re.search(r'^token_bucket_utilization\{tier="free"\} (\S+)$', text, re.M)
    assert utilization is not None and float(utilization[1]) == pytest.approx(100 * 5 / 8, abs=0.5)


def _write_rate(client: redis.Redis, tier: str, rate: float, burst: float, ttl_s: float, source: str = "controller") -> None:
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    entry = RateEntry(rate, burst, 7, source, now, now + ttl_s)
    client.hset(RATES_KEY, tier, entry.to_json())


def test_controller_rate_is_picked_up_within_the_poll_interval(edge: RunningEdge, redis_client: redis.Redis) -> None:
    _write_rate(redis_client, "pro", 50.0, 300.0, ttl_s=60)
    # poll_s is 0.2 in the test config; allow generous slack for a loaded machine
    assert wait_until(lambda: edge.get("/rating", key="pro_x").json()["rate_source"] == "controller", 5.0)
    rating = edge.get("/rating", key="pro_x").json()
    assert rating["buckets"]["tier"]["refill_rate"] == 50.0
    assert rating["buckets"]["tier"]["limit"] == 300.0
    # the client rate follows the tier rate, capped at the configured client rate (scale <= 1)
    assert rating["buckets"]["client"]["refill_rate"] == pytest.approx(SLOW)
    policy = POLICY.match(edge.get("/v1/items", key="pro_x").headers["ratelimit-policy"])
    assert policy is not None and int(policy[3]) == 300
    assert 'ratepilot_rate_source{source="controller",tier="pro"} 1.0' in edge.get("/metrics").text


def test_expired_rate_entry_falls_back_to_static(edge: RunningEdge, redis_client: redis.Redis) -> None:
    _write_rate(redis_client, "pro", 50.0, 300.0, ttl_s=-1)
    assert wait_until(lambda: edge.edge.reader is not None and edge.edge.reader.polls >= 2, 5.0)
    rating = edge.get("/rating", key="pro_x").json()
    assert rating["rate_source"] == "fallback"
    assert rating["buckets"]["tier"]["refill_rate"] == SLOW
    assert rating["buckets"]["tier"]["limit"] == 100


@pytest.mark.parametrize(
    "garbage",
    [
        "not json",
        json.dumps({"rate": 0, "burst": 10, "version": 1, "source": "controller", "expires_at": 4e9}),
        json.dumps({"rate": -5, "burst": 10, "version": 1, "source": "controller", "expires_at": 4e9}),
        '{"rate": NaN, "burst": 10, "version": 1, "source": "controller", "expires_at": 4e9}',
        json.dumps({"rate": 1e12, "burst": 10, "version": 1, "source": "controller", "expires_at": 4e9}),
    ],
)
def test_garbage_in_the_rate_table_is_ignored(
    edge: RunningEdge, redis_client: redis.Redis, garbage: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ratepilot.rates"):
        redis_client.hset(RATES_KEY, "pro", garbage)
        assert wait_until(lambda: "ignoring rate-table entry" in caplog.text, 5.0)
        assert wait_until(lambda: edge.get("/rating", key="pro_x").json()["rate_source"] == "fallback", 5.0)
    rating = edge.get("/rating", key="pro_x").json()
    assert rating["buckets"]["tier"]["refill_rate"] == SLOW
    assert rating["buckets"]["tier"]["limit"] == 100


def test_invalid_config_reload_is_refused_and_the_old_kept(
    edge: RunningEdge, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = edge.edge.options.config_path
    assert path is not None
    with caplog.at_level(logging.ERROR, logger="ratepilot.config"):
        path.write_text(path.read_text().replace("default_tier: free", "default_tier: missing"))
        assert wait_until(lambda: "reload refused" in caplog.text, 5.0)
    assert [edge.get("/v1/items", key="free_a").status_code for _ in range(6)] == [200] * 5 + [429]

    path.write_text(path.read_text().replace("default_tier: missing", "default_tier: free").replace(
        "client:    {rate: 0.001, burst: 5}", "client:    {rate: 0.001, burst: 7}", 1))  # fmt: skip
    assert wait_until(lambda: edge.edge.guard.config.tiers["free"].client.burst == 7, 5.0)
    assert edge.get("/v1/items", key="free_z").headers["ratelimit-policy"].startswith('"client";q=7;')
