"""Redis dead, hung and back: fail_open keeps a local guard, fail_closed refuses, the edge recovers by itself."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import pytest

from ratepilot.servers import RedisServer
from tests.limiter_service.conftest import BASE_CONFIG, RunningEdge, wait_until

EdgeFactory = Callable[..., RunningEdge]


def _count(edge: RunningEdge, outcome: str, source: str, tier: str) -> float:
    text = edge.get("/metrics").text
    found = re.search(rf'^ratepilot_decisions_total\{{outcome="{outcome}",source="{source}",tier="{tier}"\}} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


def test_fail_open_with_dead_redis_still_limits(edge_factory: EdgeFactory, redis_server: RedisServer) -> None:
    edge = edge_factory(redis_server.url)
    assert edge.get("/v1/items", key="pro_warm").status_code == 200  # connected and working
    redis_server.stop()
    statuses = [edge.get("/v1/items", key="free_a").status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]  # the local guard enforces the same client burst: not unlimited
    assert _count(edge, "allowed", "local", "free") == 5
    assert _count(edge, "throttled", "local", "free") == 1
    assert "ratepilot_redis_errors_total" in edge.get("/metrics").text


def test_fail_closed_refuses_when_redis_is_dead(edge_factory: EdgeFactory, redis_server: RedisServer) -> None:
    edge = edge_factory(redis_server.url)
    assert edge.get("/v1/items", key="closed_a").status_code == 200
    redis_server.stop()
    response = edge.get("/v1/items", key="closed_a")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["limited_by"] == "redis_unavailable"
    assert _count(edge, "throttled", "fail_closed", "closed") >= 1


def test_hung_redis_requests_are_still_answered(edge_factory: EdgeFactory, redis_server: RedisServer) -> None:
    edge = edge_factory(redis_server.url, BASE_CONFIG.replace("timeout_ms: 1000", "timeout_ms: 100"))
    assert edge.get("/v1/items", key="pro_a").status_code == 200
    redis_server.pause()
    try:
        # the client's 1 s timeout is the bound: a decision that waited on the hung Redis would blow it
        with httpx.Client(base_url=edge.url, timeout=1.0) as client:
            statuses = [client.get("/v1/items", headers={"x-api-key": "pro_a"}).status_code for _ in range(10)]
            closed = client.get("/v1/items", headers={"x-api-key": "closed_a"})
    finally:
        redis_server.resume()
    assert statuses == [200] * 10  # pro: fail_open, burst 12 in the local guard
    assert closed.status_code == 429 and closed.json()["limited_by"] == "redis_unavailable"


def test_recovers_after_redis_restart(edge_factory: EdgeFactory, redis_server: RedisServer) -> None:
    edge = edge_factory(redis_server.url)
    assert edge.get("/rating", key="pro_a").json()["source"] == "redis"
    redis_server.stop()
    assert edge.get("/rating", key="pro_a").json()["source"] == "local"
    redis_server.start()  # same port, empty: the script must be loaded again
    assert wait_until(lambda: edge.get("/rating", key="pro_b").json()["source"] == "redis", 10.0, every_s=0.2)
    assert edge.get("/v1/items", key="closed_a").status_code == 200  # fail_closed tiers serve again


@pytest.mark.parametrize("tier_key", ["free_a", "closed_a"])
def test_redis_down_at_start_up_never_crashes(edge_factory: EdgeFactory, redis_server: RedisServer, tier_key: str) -> None:
    url = redis_server.url
    redis_server.stop()
    edge = edge_factory(url)
    response = edge.get("/v1/items", key=tier_key)
    assert response.status_code == (200 if tier_key == "free_a" else 429)
    assert edge.get("/health").status_code == 200
