"""The admin REST API through a real uvicorn: auth, validation, overrides audit, reload, mode, metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from controller.overrides import AUDIT_KEY
from controller.policies import LoadedPolicy
from controller.rate_store import MODE_KEY, OVERRIDES_KEY
from controller.runtime import Controller
from limiter.rate_table import RATES_KEY
from policy import rl
from ratepilot.servers import PrometheusServer, RedisServer
from tests.controller.api_server import ApiServer
from tests.controller.policies import LatencyFollower
from tests.controller.support import TOKEN, make_settings

AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIERS = {"free": {"static_rate": 100, "min_rate": 10, "max_rate": 1000}, "pro": {"static_rate": 400, "min_rate": 40, "max_rate": 4000}}
GOOD = {"min_rate": 20, "max_rate": 200, "who": "alice", "reason": "incident 7"}


def make_controller(redis_url: str, prometheus_url: str, **changes: object) -> Controller:
    settings = make_settings(redis_url, prometheus_url, tiers=TIERS, **changes)
    controller = Controller(settings, LoadedPolicy(LatencyFollower(), "latency_follower"))
    controller.lease.try_acquire_or_renew()
    return controller


@pytest.fixture
def api(redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer) -> Iterator[tuple[httpx.Client, Controller]]:
    controller = make_controller(redis_server_session.url, prometheus.url)
    with ApiServer(controller) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        yield client, controller
    controller.stop()


def nothing_stored(client: redis.Redis) -> bool:
    return client.hlen(OVERRIDES_KEY) == 0 and client.xlen(AUDIT_KEY) == 0 and client.get(MODE_KEY) is None


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": f"Basic {TOKEN}"}])
def test_writes_without_the_right_token_get_401_and_change_nothing(api, redis_client: redis.Redis, headers: dict) -> None:
    client, _ = api
    responses = [
        client.put("/overrides/free", json=GOOD, headers=headers),
        client.put("/overrides/free", json={"min_rate": 9, "max_rate": 1}, headers=headers),  # bad body: still 401 first
        client.delete("/overrides/free", params={"who": "a", "reason": "b"}, headers=headers),
        client.post("/mode", json={"mode": "shadow"}, headers=headers),
        client.post("/policy/reload", headers=headers),
    ]
    assert [r.status_code for r in responses] == [401] * 5
    assert all(r.headers["www-authenticate"] == "Bearer" for r in responses)
    assert nothing_stored(redis_client)


def test_override_min_above_max_is_422_naming_the_problem(api, redis_client: redis.Redis) -> None:
    client, _ = api
    response = client.put("/overrides/free", json={**GOOD, "min_rate": 500, "max_rate": 50}, headers=AUTH)
    assert response.status_code == 422 and "min_rate (500) must not exceed max_rate (50)" in response.text
    missing = client.put("/overrides/free", json={"min_rate": 5}, headers=AUTH)
    assert missing.status_code == 422 and {e["loc"][-1] for e in missing.json()["detail"]} == {"who", "reason"}
    negative = client.put("/overrides/free", json={**GOOD, "min_rate": -1}, headers=AUTH)
    assert negative.status_code == 422 and negative.json()["detail"][0]["loc"] == ["body", "min_rate"]
    assert client.put("/overrides/nosuchtier", json=GOOD, headers=AUTH).status_code == 404
    assert client.put("/overrides/bad tier!", json=GOOD, headers=AUTH).status_code in (404, 422)
    assert nothing_stored(redis_client)


def test_override_lifecycle_is_kept_in_redis_audited_and_applied(api, redis_client: redis.Redis) -> None:
    client, controller = api
    put = client.put("/overrides/free", json={**GOOD, "pinned_rate": 55, "ttl_s": 600}, headers=AUTH)
    assert put.status_code == 200
    body = put.json()
    assert body["pinned_rate"] == 55 and body["who"] == "alice" and body["expires_at"] > body["updated_at"]
    assert client.get("/overrides/free").json() == body
    assert client.get("/overrides").json() == {"free": body}
    report = controller.loop.tick()
    assert report.tiers["free"]["rate"] == 55.0 and report.tiers["free"]["source"] == "override"
    deleted = client.delete("/overrides/free", params={"who": "bob", "reason": "resolved"}, headers=AUTH)
    assert deleted.status_code == 200
    assert client.get("/overrides/free").status_code == 404
    assert client.delete("/overrides/free", params={"who": "bob", "reason": "again"}, headers=AUTH).status_code == 404
    audit = client.get("/overrides/free/audit").json()
    assert [(a["action"], a["who"], a["reason"]) for a in audit] == [("delete", "bob", "resolved"), ("put", "alice", "incident 7")]
    assert all(float(a["at"]) > 0 for a in audit)


def test_status_decisions_health_metrics_and_docs(api) -> None:
    client, controller = api
    controller.loop.tick()
    status = client.get("/status").json()
    assert status["leader"] is True and status["mode"] == "active" and status["policy"]["name"] == "latency_follower"
    assert status["last_tick"]["result"] == "written"
    assert set(status["tiers"]) == {"free", "pro"} and status["tiers"]["free"]["rule"] == "none"
    assert "p99_latency_ms" in status["tiers"]["free"]["observation"]
    decisions = client.get("/decisions", params={"tier": "pro", "limit": 1}).json()
    assert len(decisions) == 1 and decisions[0]["tier"] == "pro" and decisions[0]["replica"] == "test-replica"
    assert client.get("/decisions", params={"limit": 0}).status_code == 422
    assert client.get("/health").json()["status"] == "ok"
    metrics = client.get("/metrics").text
    for name in ("ratepilot_controller_ticks_total", "ratepilot_controller_tick_seconds_bucket", "ratepilot_controller_rate",
                 "ratepilot_controller_errors_total", "ratepilot_controller_is_leader",
                 "ratepilot_controller_last_tick_timestamp_seconds"):  # fmt: skip
        assert name in metrics
    assert 'ratepilot_controller_rate{tier="free"} 120.0' in metrics
    assert client.get("/docs").status_code == 200
    assert "/overrides/{tier}" in client.get("/openapi.json").json()["paths"]


def test_mode_switch_goes_through_redis_to_the_next_tick(api, redis_client: redis.Redis) -> None:
    client, controller = api
    assert client.post("/mode", json={"mode": "sideways"}, headers=AUTH).status_code == 422
    assert client.post("/mode", json={"mode": "shadow"}, headers=AUTH).json() == {"mode": "shadow"}
    assert controller.loop.tick().result == "shadow" and redis_client.hlen(RATES_KEY) == 0
    assert client.get("/status").json()["mode"] == "shadow"


def test_policy_reload_refuses_a_corrupt_model_and_keeps_the_one_in_force(api, tmp_path: Path) -> None:
    client, controller = api
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"\x00" * 64)
    before = controller.policies.current
    response = client.post("/policy/reload", json={"name": "rl", "model": str(corrupt)}, headers=AUTH)
    assert response.status_code == 422 and "the one in force stays" in response.text and "not a policy file" in response.text
    assert controller.policies.current is before and controller.loop.tick().result == "written"
    assert controller.metrics.registry.get_sample_value("ratepilot_controller_errors_total", {"stage": "model_load"}) == 1
    good = tmp_path / "good.npz"
    rl.save(rl.RLPolicy(rl.PolicyNetwork.zeros()), good)
    loaded = client.post("/policy/reload", json={"name": "rl", "model": str(good)}, headers=AUTH)
    assert loaded.status_code == 200 and loaded.json()["name"] == "rl" and loaded.json()["model"] == str(good)
    report = controller.loop.tick()  # zero weights: action 0, the rate stays
    assert report.tiers["free"]["proposed"] == pytest.approx(report.tiers["free"]["rate_in_force"])
    assert client.get("/status").json()["policy"]["name"] == "rl"


def test_reads_can_be_protected(redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer) -> None:
    controller = make_controller(redis_server_session.url, prometheus.url, admin__protect_reads=True)
    try:
        with ApiServer(controller) as server, httpx.Client(base_url=server.url) as client:
            assert client.get("/status").status_code == 401
            assert client.get("/decisions").status_code == 401
            assert client.get("/status", headers=AUTH).status_code == 200
            assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    finally:
        controller.stop()


def test_without_a_configured_token_writes_are_refused(redis_client: redis.Redis, redis_server_session: RedisServer,
                                                       prometheus: PrometheusServer) -> None:  # fmt: skip
    controller = make_controller(redis_server_session.url, prometheus.url, admin__token=None)
    try:
        with ApiServer(controller) as server, httpx.Client(base_url=server.url) as client:
            response = client.put("/overrides/free", json=GOOD, headers=AUTH)
            assert response.status_code == 401 and "no admin token is configured" in response.text
    finally:
        controller.stop()
    assert nothing_stored(redis_client)


def test_redis_down_answers_503_not_500(redis_server: RedisServer, prometheus: PrometheusServer) -> None:
    controller = make_controller(redis_server.url, prometheus.url, redis__timeout_s=0.5)
    try:
        with ApiServer(controller) as server, httpx.Client(base_url=server.url) as client:
            redis_server.stop()
            assert client.put("/overrides/free", json=GOOD, headers=AUTH).status_code == 503
            assert client.get("/decisions").status_code == 503
            assert client.get("/status").status_code == 200  # status still answers, with the error
    finally:
        controller.stop()
