"""The candidate in shadow beside the champion, on a real Redis and Prometheus (and a real uvicorn for the API).

A scripted pair: the champion holds every rate, the candidate would raise `free` by 20 % and cut
`pro` by 5 %; `idle` has no traffic, so the stale hold fires there every tick (an incident). The
stream carries both actions, only the champion's rates reach the table, and GET /shadow gives the
exact ratios.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from controller.policies import LoadedPolicy
from controller.rate_store import DECISIONS_KEY
from controller.runtime import Controller
from controller.settings import SettingsError
from controller.shadow_report import compare
from limiter.rate_table import RATES_KEY, parse_entry
from policy.base import Policy
from policy.observation import Observation
from policy.rl import DEFAULT_MODEL_PATH
from ratepilot.servers import PrometheusServer, RedisServer
from tests.controller.api_server import ApiServer
from tests.controller.policies import NaNPolicy, Raising
from tests.controller.support import TOKEN, make_settings, query, wait_for

TIERS = {
    "free": {"static_rate": 100, "min_rate": 10, "max_rate": 1000},
    "pro": {"static_rate": 400, "min_rate": 40, "max_rate": 4000},
    "hot": {"static_rate": 100, "min_rate": 10, "max_rate": 1000},
    "idle": {"static_rate": 50, "min_rate": 5, "max_rate": 500},
}
TICKS = 3


class Scale(Policy):
    """Each tier's rate in force times a fixed factor (1 holds)."""

    name = "scale"

    def __init__(self, factors: list[float]):
        self.factors = np.array(factors, dtype=np.float64)

    def act(self, observation: Observation) -> np.ndarray:
        """Next rates."""
        return observation.rate * self.factors


def controller_with(redis_url: str, prometheus_url: str, candidate: Policy | None, **changes: Any) -> Controller:
    settings = make_settings(redis_url, prometheus_url, tiers=TIERS, **changes)
    given = None if candidate is None else LoadedPolicy(candidate, candidate.name, "scripted")
    controller = Controller(settings, LoadedPolicy(Scale([1.0] * 4), "champion"), candidate=given)
    assert controller.lease.try_acquire_or_renew()
    return controller


@pytest.fixture
def pair(redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer) -> Iterator[Controller]:
    # the loop tests inject latency into `hot` on the shared exporter: wait until Prometheus's window has
    # forgotten it, so that the only incidents are idle's stale holds
    expr = '1000 * histogram_quantile(0.99, sum by (tier, le) (rate(ratepilot_backend_request_seconds_bucket{tier="hot"}[3s])))'
    wait_for(lambda: all(float(s["value"][1]) < 100 for s in query(prometheus.url, expr)), timeout_s=30)
    controller = controller_with(redis_server_session.url, prometheus.url, Scale([1.2, 0.95, 1.0, 3.0]))
    yield controller
    controller.stop()


def stream(client: redis.Redis) -> list[dict[str, Any]]:
    """Every decision in the stream, oldest first, with its tier."""
    return [{"tier": f[b"tier"].decode(), **json.loads(f[b"decision"])} for _, f in client.xrange(DECISIONS_KEY)]


def errors(controller: Controller, stage: str) -> float:
    return controller.metrics.registry.get_sample_value("ratepilot_controller_errors_total", {"stage": stage}) or 0.0


def test_stream_carries_both_actions_and_only_the_champion_is_written(pair: Controller, redis_client: redis.Redis) -> None:
    for _ in range(TICKS):
        assert pair.loop.tick().result == "written"
    table = {k.decode(): parse_entry(v).rate for k, v in redis_client.hgetall(RATES_KEY).items()}
    assert table == {"free": 100.0, "pro": 400.0, "hot": 100.0, "idle": 50.0}  # the champion's hold, never the candidate's
    decisions = stream(redis_client)
    assert len(decisions) == TICKS * len(TIERS)
    last = {d["tier"]: d for d in decisions[-len(TIERS):]}
    assert last["free"]["rate"] == 100.0 and last["free"]["candidate"]["rate"] == pytest.approx(120.0, rel=1e-12)
    assert last["free"]["candidate"]["proposed"] == pytest.approx(120.0, rel=1e-12)
    assert last["free"]["candidate"]["action"] > 0 and last["free"]["action"] == 0.0
    assert last["pro"]["candidate"]["rate"] == pytest.approx(380.0, rel=1e-12) and last["pro"]["candidate"]["rule"] == "none"
    # idle has no metrics: the same safety engine holds both, whatever the candidate asked for
    assert last["idle"]["rule"] == "stale_hold" and last["idle"]["candidate"]["rule"] == "stale_hold"
    assert last["idle"]["candidate"]["proposed"] == pytest.approx(150.0) and last["idle"]["candidate"]["rate"] == 50.0
    assert {d["candidate"]["policy"] for d in decisions} == {"scale"} and {d["candidate"]["model"] for d in decisions} == {"scripted"}
    assert pair.metrics.registry.get_sample_value("ratepilot_controller_candidate_loaded") == 1.0


def test_api_comparison_is_exact_for_the_scripted_pair(pair: Controller, redis_server_session: RedisServer) -> None:
    for _ in range(TICKS):
        assert pair.loop.tick().result == "written"
    with ApiServer(pair) as api:
        body = httpx.get(f"{api.url}/shadow", timeout=10).json()
        free = httpx.get(f"{api.url}/shadow", params={"tier": "free"}, timeout=10).json()
        for bad in ("nan", "inf", "0", "-1", "true", "1e309"):
            assert httpx.get(f"{api.url}/shadow", params={"threshold": bad}, timeout=10).status_code == 422, bad
        assert httpx.get(f"{api.url}/shadow", params={"limit": 0}, timeout=10).status_code == 422
    ratios = [1.2, 0.95, 1.0, 1.0]
    assert body["candidate"]["name"] == "scale" and body["candidate_error"] is None
    assert body["ticks"] == TICKS and body["decisions"] == TICKS * 4 and body["differ"] == TICKS
    assert body["differ_share"] == 0.25  # only free moves by more than |ln r| = 0.1 (pro: |ln 0.95| = 0.051)
    assert body["mean_ratio"] == pytest.approx(sum(ratios) / 4, rel=1e-12)
    assert body["min_ratio"] == pytest.approx(0.95, rel=1e-12) and body["max_ratio"] == pytest.approx(1.2, rel=1e-12)
    assert body["mean_abs_log_ratio"] == pytest.approx((math.log(1.2) - math.log(0.95)) / 4, rel=1e-9)
    assert body["tiers"]["free"]["differ_share"] == 1.0 and body["tiers"]["pro"]["differ_share"] == 0.0
    incidents = body["incidents"]
    assert incidents["kinds"] == {"stale": TICKS} and incidents["decisions"] == TICKS and incidents["differ"] == 0
    assert {i["tier"] for i in incidents["latest"]} == {"idle"} and all(i["ratio"] == 1.0 for i in incidents["latest"])
    assert free["decisions"] == TICKS and free["mean_ratio"] == pytest.approx(1.2, rel=1e-12)


def test_shadow_route_follows_the_read_token_rule(redis_client: redis.Redis, redis_server_session: RedisServer,
                                                  prometheus: PrometheusServer) -> None:  # fmt: skip
    controller = controller_with(redis_server_session.url, prometheus.url, Scale([1.0] * 4), admin__protect_reads=True)
    try:
        with ApiServer(controller) as api:
            assert httpx.get(f"{api.url}/shadow", timeout=10).status_code == 401
            auth = {"Authorization": f"Bearer {TOKEN}"}
            ok = httpx.get(f"{api.url}/shadow", headers=auth, timeout=10)
            assert ok.status_code == 200 and ok.json()["decisions"] == 0 and ok.json()["differ_share"] is None
    finally:
        controller.stop()


@pytest.mark.parametrize(("candidate", "rule", "error"), [(Raising(), "policy_error", "RuntimeError"), (NaNPolicy(), "non_finite", "NaN")])
def test_a_failing_candidate_is_contained_like_the_champion(
    candidate: Policy, rule: str, error: str, redis_client: redis.Redis, redis_server_session: RedisServer,
    prometheus: PrometheusServer,
) -> None:  # fmt: skip
    controller = controller_with(redis_server_session.url, prometheus.url, candidate)
    try:
        report = controller.loop.tick()
        assert report.result == "written" and "policy" not in report.errors
        assert errors(controller, "candidate") == 1.0 and error in (controller.shadow.last_error or "")
        for decision in stream(redis_client):
            assert rule in decision["candidate"]["rules"]
            assert decision["candidate"]["rate"] == decision["rate"] == decision["rate_in_force"]  # kept the rate in force
    finally:
        controller.stop()


def test_a_candidate_that_fails_to_load_never_stops_the_champion(
    redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a policy file")
    controller = controller_with(redis_server_session.url, prometheus.url, None,
                                 candidate__enabled=True, candidate__model=str(broken))  # fmt: skip
    try:
        assert controller.shadow.refresh() is None
        assert errors(controller, "candidate_load") == 1.0 and "broken.npz" in (controller.shadow.last_error or "")
        assert controller.loop.tick().result == "written"
        assert all("candidate" not in d for d in stream(redis_client))
        assert controller.metrics.registry.get_sample_value("ratepilot_controller_candidate_loaded") == 0.0

        # the file is fixed: the next refresh loads it and the candidate decides from the next tick
        broken.write_bytes(DEFAULT_MODEL_PATH.read_bytes())
        loaded = controller.shadow.refresh()
        assert loaded is not None and loaded.model == str(broken) and controller.shadow.last_error is None
        assert controller.loop.tick().result == "written"
        latest = stream(redis_client)[-len(TIERS):]
        assert {d["candidate"]["model"] for d in latest} == {str(broken)} and {d["candidate"]["policy"] for d in latest} == {"rl"}
        assert compare(latest)["decisions"] == len(TIERS)
    finally:
        controller.stop()


def test_a_running_controller_loads_the_candidate_off_the_tick_and_reports_it(
    redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer
) -> None:
    settings = make_settings(redis_server_session.url, prometheus.url, tiers=TIERS, candidate__enabled=True,
                             candidate__model=str(DEFAULT_MODEL_PATH))  # fmt: skip
    controller = Controller(settings, LoadedPolicy(Scale([1.0] * 4), "champion"))
    controller.start()
    try:
        wait_for(lambda: any("candidate" in d for d in stream(redis_client)), timeout_s=30)
        with ApiServer(controller) as api:
            status = httpx.get(f"{api.url}/status", timeout=10).json()
            shadow = httpx.get(f"{api.url}/shadow", timeout=10).json()
        assert status["candidate"]["name"] == "rl" and status["candidate"]["model"] == str(DEFAULT_MODEL_PATH)
        assert status["candidate_error"] is None and shadow["decisions"] >= len(TIERS)
        assert set(shadow["models"]) == {str(DEFAULT_MODEL_PATH)}
    finally:
        controller.stop()
    table = {k.decode(): parse_entry(v).rate for k, v in redis_client.hgetall(RATES_KEY).items()}
    assert table == {"free": 100.0, "pro": 400.0, "hot": 100.0, "idle": 50.0}  # the champion's hold only


def test_candidate_settings_are_off_by_default_and_refuse_the_champion(redis_server_session: RedisServer) -> None:
    settings = make_settings(redis_server_session.url, "http://127.0.0.1:9")
    assert settings.candidate.enabled is False and settings.candidate.model == "models:/ratepilot-policy@candidate"
    for model in (None, "models:/ratepilot-policy@champion"):
        with pytest.raises(SettingsError, match="candidate.*not the champion"):
            make_settings(redis_server_session.url, "http://127.0.0.1:9", candidate__enabled=True, candidate__model=model)
    for bad in (0, -1, float("nan"), float("inf"), 1e9):
        with pytest.raises(SettingsError, match="refresh_s"):
            make_settings(redis_server_session.url, "http://127.0.0.1:9", candidate__refresh_s=bad)
    with pytest.raises(SettingsError, match="candidate"):
        make_settings(redis_server_session.url, "http://127.0.0.1:9", candidate__unknown=1)


def test_controller_once_records_the_candidate_and_survives_a_broken_one(
    redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer, tmp_path: Path
) -> None:
    from controller.service import main
    from tests.controller.support import write_config

    def once(model: Path) -> dict[str, Any]:
        settings = make_settings(redis_server_session.url, prometheus.url, tiers=TIERS, policy__name="aimd",
                                 candidate__enabled=True, candidate__model=str(model))  # fmt: skip
        config = write_config(tmp_path / "controller.yaml", settings)
        assert main(["--config", str(config), "--once", "--json", str(tmp_path / "tick.json"), "--log-level", "ERROR"]) == 0
        return json.loads((tmp_path / "tick.json").read_text())  # type: ignore[no-any-return]

    report = once(DEFAULT_MODEL_PATH)
    assert {tier["candidate"]["model"] for tier in report["tiers"].values()} == {str(DEFAULT_MODEL_PATH)}
    report = once(tmp_path / "missing.npz")  # the champion's tick is still good: exit 0, no candidate recorded
    assert report["result"] == "written" and all("candidate" not in tier for tier in report["tiers"].values())
