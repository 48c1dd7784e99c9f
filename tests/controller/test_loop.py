"""Ticks against a real Prometheus and a real redis-server: direction of change, limiter pick-up and faults.

In every fault the tick completes, the rates stay within the caps and the reason is in the logs and
in ratepilot_controller_errors_total{stage}.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml

from benchmarks.synthetic_exporter import SyntheticExporter
from controller.overrides import OverrideRequest
from controller.policies import LoadedPolicy, PolicyHolder, PolicyLoadError
from controller.rate_store import DECISIONS_KEY, MODE_KEY
from controller.runtime import Controller
from controller.settings import PolicySettings
from limiter.config import parse_config
from limiter.rate_reader import resolve_all
from limiter.rate_table import RATES_KEY, parse_entry
from policy.base import Policy
from policy.observation import OBS_FIELDS, Observation
from ratepilot.servers import PrometheusServer, RedisServer, free_port
from tests.controller.policies import LatencyFollower, NaNPolicy, Raising
from tests.controller.support import make_settings, query, wait_for

TIERS = {
    "free": {"static_rate": 100, "min_rate": 10, "max_rate": 1000},
    "pro": {"static_rate": 400, "min_rate": 40, "max_rate": 4000},
    "hot": {"static_rate": 100, "min_rate": 10, "max_rate": 1000},
    "idle": {"static_rate": 50, "min_rate": 5, "max_rate": 500},
}


def controller_for(redis_url: str, prometheus_url: str, policy: Policy | None = None, **changes: Any) -> Controller:
    changes.setdefault("tiers", TIERS)
    settings = make_settings(redis_url, prometheus_url, **changes)
    return Controller(settings, LoadedPolicy(policy or LatencyFollower(), "test"))


@pytest.fixture
def ctl(redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer) -> Iterator[Controller]:
    controller = controller_for(redis_server_session.url, prometheus.url)
    assert controller.lease.try_acquire_or_renew()
    yield controller
    controller.stop()


def table(client: redis.Redis) -> dict[str, Any]:
    return {k.decode(): parse_entry(v) for k, v in client.hgetall(RATES_KEY).items()}


def errors(controller: Controller, stage: str) -> float:
    return controller.metrics.registry.get_sample_value("ratepilot_controller_errors_total", {"stage": stage}) or 0.0


def within_caps(controller: Controller, client: redis.Redis) -> None:
    for tier, entry in table(client).items():
        caps = controller.settings.tiers[tier]
        assert caps.min_rate <= entry.rate <= caps.max_rate, (tier, entry.rate)


def test_injected_latency_cuts_the_rate_and_a_limiter_picks_it_up(
    ctl: Controller, redis_client: redis.Redis, exporter: SyntheticExporter, prometheus: PrometheusServer
) -> None:
    exporter.set("hot", latency_s=0.4)  # p99 ~ 500 ms against a 250 ms SLO
    try:
        expr = '1000 * histogram_quantile(0.99, sum by (tier, le) (rate(ratepilot_backend_request_seconds_bucket{tier="hot"}[3s])))'
        wait_for(lambda: bool(r := query(prometheus.url, expr)) and float(r[0]["value"][1]) > 400)
        report = ctl.loop.tick()
    finally:
        exporter.set("hot", latency_s=0.02)
    assert report.result == "written" and report.errors == {}
    hot, free = report.tiers["hot"], report.tiers["free"]
    assert hot["observation"]["p99_latency_ms"] > 400 and hot["rate"] == pytest.approx(70.0) and hot["rule"] == "none"
    assert free["rate"] == pytest.approx(120.0)  # healthy: up
    entries = table(redis_client)
    assert entries["hot"].rate == pytest.approx(70.0) and entries["hot"].source == "controller"
    assert entries["hot"].burst == pytest.approx(140.0)
    # the limiter's own resolver, with a config that has the tier, applies the controller's rate
    limiter_yaml = yaml.safe_load(Path("limiter/limiter.yaml").read_text())
    limiter_yaml["tiers"]["hot"] = {"client": {"rate": 10, "burst": 20}, "aggregate": {"rate": 100, "burst": 200}}
    config = parse_config(yaml.safe_dump(limiter_yaml), environ={})
    seconds, micros = redis_client.time()
    rates, warnings = resolve_all(redis_client.hgetall(RATES_KEY), seconds + micros / 1e6, config)
    assert warnings == {} and rates["hot"].rate == pytest.approx(70.0) and rates["hot"].source == "controller"
    assert rates["free"].rate == pytest.approx(120.0)


def test_healthy_rises_are_capped_by_the_tier_max(redis_client: redis.Redis, redis_server_session: RedisServer,
                                                   prometheus: PrometheusServer) -> None:  # fmt: skip
    tiers = {"free": {"static_rate": 100, "min_rate": 10, "max_rate": 130}}
    controller = controller_for(redis_server_session.url, prometheus.url, tiers=tiers)
    try:
        controller.lease.try_acquire_or_renew()
        first, second = controller.loop.tick(), controller.loop.tick()
    finally:
        controller.stop()
    assert first.tiers["free"]["rate"] == pytest.approx(120.0)
    assert second.tiers["free"]["rate"] == 130.0 and second.tiers["free"]["rule"] == "tier_bounds"
    assert controller.metrics.registry.get_sample_value(
        "ratepilot_controller_rule_firings_total", {"tier": "free", "rule": "tier_bounds"}
    ) == 1.0


def test_prometheus_down_holds_then_decays_toward_static(
    redis_client: redis.Redis, redis_server_session: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    controller = controller_for(redis_server_session.url, f"http://127.0.0.1:{free_port()}", tiers={"free": TIERS["free"]})
    controller.lease.try_acquire_or_renew()
    redis_client.hset(RATES_KEY, "free", json.dumps({"rate": 300.0, "burst": 600.0, "version": 1, "source": "controller",
                                                     "written_at": time.time(), "expires_at": time.time() + 3600}))  # fmt: skip
    caplog.set_level(logging.INFO)
    try:
        reports = [controller.loop.tick() for _ in range(5)]
    finally:
        controller.stop()
    assert [r.result for r in reports] == ["written"] * 5
    assert [r.tiers["free"]["rule"] for r in reports] == ["stale_hold"] * 3 + ["stale_decay"] * 2
    assert [round(r.tiers["free"]["rate"], 6) for r in reports] == [300.0, 300.0, 300.0, 260.0, 228.0]
    assert errors(controller, "prometheus") == 5
    assert "stage=prometheus" in caplog.text and "ConnectionError" in caplog.text
    within_caps(controller, redis_client)


def test_nan_and_empty_metrics_count_as_missing(ctl: Controller, redis_client: redis.Redis) -> None:
    report = ctl.loop.tick()
    idle = report.tiers["idle"]
    assert idle["observation"]["p99_latency_ms"] is None and idle["observation"]["vector"][OBS_FIELDS.index("missing")] == 1.0
    assert idle["rule"] == "stale_hold" and idle["rate"] == 50.0
    assert report.tiers["free"]["rule"] == "none"
    within_caps(ctl, redis_client)


@pytest.mark.parametrize(("policy", "rule"), [(Raising(), "policy_error"), (NaNPolicy(), "non_finite")])
def test_a_broken_policy_keeps_the_rates_in_force(
    policy: Policy, rule: str, redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    controller = controller_for(redis_server_session.url, prometheus.url, policy, tiers={"free": TIERS["free"], "pro": TIERS["pro"]})
    controller.lease.try_acquire_or_renew()
    caplog.set_level(logging.INFO)
    try:
        report = controller.loop.tick()
    finally:
        controller.stop()
    assert report.result == "written"
    assert {t: (d["rate"], d["rule"]) for t, d in report.tiers.items()} == {"free": (100.0, rule), "pro": (400.0, rule)}
    assert errors(controller, "policy") == 1 and "stage=policy" in caplog.text
    assert {t: e.rate for t, e in table(redis_client).items()} == {"free": 100.0, "pro": 400.0}


class StopsRedis(Policy):
    """Kills the Redis server between the tick's read and its write: a real outage at the worst moment."""

    name = "stops_redis"

    def __init__(self, server: RedisServer):
        self.server = server
        self.stopped = False

    def act(self, observation: Observation) -> np.ndarray:
        if not self.stopped:
            self.server.stop()
            self.stopped = True
        return observation.rate * 0.9


def test_redis_down_during_the_write(redis_server: RedisServer, prometheus: PrometheusServer,
                                     caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    controller = controller_for(redis_server.url, prometheus.url, StopsRedis(redis_server), tiers={"free": TIERS["free"]},
                                redis__timeout_s=0.5)  # fmt: skip
    controller.lease.try_acquire_or_renew()
    caplog.set_level(logging.INFO)
    try:
        failed = controller.loop.tick()
        assert failed.result == "failed" and "redis_write" in failed.errors
        assert errors(controller, "redis_write") == 1 and "stage=redis_write" in caplog.text
        down = controller.loop.tick()  # still down: the read fails, nothing is attempted
        assert down.result == "failed" and "redis_read" in down.errors
        redis_server.start()
        controller.lease.try_acquire_or_renew()
        recovered = controller.loop.tick()
    finally:
        controller.stop()
    assert recovered.result == "written"
    client = redis.Redis.from_url(redis_server.url)
    assert table(client)["free"].rate == pytest.approx(90.0)


def test_a_rate_key_edited_or_deleted_by_hand_is_put_right_next_tick(ctl: Controller, redis_client: redis.Redis) -> None:
    ctl.loop.tick()
    redis_client.hset(RATES_KEY, "free", "not json at all")
    redis_client.hdel(RATES_KEY, "pro")
    redis_client.hset(RATES_KEY, "hot", json.dumps({"rate": 9e6, "burst": 1, "version": 1, "source": "controller",
                                                    "written_at": time.time(), "expires_at": time.time() + 600}))  # fmt: skip
    report = ctl.loop.tick()
    entries = table(redis_client)
    assert set(entries) == set(TIERS)
    assert entries["free"].rate == pytest.approx(120.0)  # from the static 100, as the limiters now apply
    assert entries["pro"].rate == pytest.approx(480.0)
    assert entries["hot"].rate == 1000.0 and report.tiers["hot"]["rule"] == "tier_bounds"
    within_caps(ctl, redis_client)


def test_shadow_mode_logs_decisions_but_writes_no_rates(ctl: Controller, redis_client: redis.Redis) -> None:
    redis_client.set(MODE_KEY, "shadow")
    report = ctl.loop.tick()
    assert report.result == "shadow" and redis_client.hlen(RATES_KEY) == 0
    decisions = ctl.decisions.recent("free", 5)
    assert len(decisions) == 1 and decisions[0]["mode"] == "shadow" and decisions[0]["rate"] == pytest.approx(120.0)
    redis_client.set(MODE_KEY, "active")
    assert ctl.loop.tick().result == "written" and redis_client.hlen(RATES_KEY) == len(TIERS)


def test_operator_overrides_pin_and_cap(ctl: Controller, redis_client: redis.Redis) -> None:
    ctl.overrides.put("free", OverrideRequest(pinned_rate=42, who="alice", reason="test"))
    ctl.overrides.put("pro", OverrideRequest(max_rate=300, who="alice", reason="test"))
    report = ctl.loop.tick()
    assert (report.tiers["free"]["rate"], report.tiers["free"]["source"]) == (42.0, "override")
    assert (report.tiers["pro"]["rate"], report.tiers["pro"]["rule"]) == (300.0, "override_caps")
    entries = table(redis_client)
    assert entries["free"].rate == 42.0 and entries["free"].source == "override"


def test_two_replicas_at_once_only_one_writes(redis_client: redis.Redis, redis_server_session: RedisServer,
                                              prometheus: PrometheusServer) -> None:  # fmt: skip
    replicas = [
        controller_for(redis_server_session.url, prometheus.url, tiers={"free": TIERS["free"]}, replica_id=name)
        for name in ("replica-a", "replica-b")
    ]

    def tick_counts() -> dict[str, dict[str, float]]:
        return {
            r.settings.replica_id: {res: r.metrics.registry.get_sample_value("ratepilot_controller_ticks_total", {"result": res})
                                    or 0.0 for res in ("written", "follower")}
            for r in replicas
        }  # fmt: skip

    def both_ticked_three_times() -> bool:
        counts = sorted(tick_counts().values(), key=lambda c: c["written"])
        return counts[1]["written"] >= 3 and counts[0]["follower"] >= 3

    for replica in replicas:
        replica.start()
    try:
        wait_for(both_ticked_three_times, timeout_s=30)
    finally:
        for replica in replicas:
            replica.stop()
    writers = {f[b"replica"].decode() for _, f in redis_client.xrange(DECISIONS_KEY)}
    assert len(writers) == 1
    results = tick_counts()
    leader = writers.pop()
    follower = next(name for name in results if name != leader)
    assert results[leader]["written"] >= 3 and results[follower]["written"] == 0 and results[follower]["follower"] >= 3


def test_the_scheduled_loop_survives_a_policy_that_always_raises(
    redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer
) -> None:
    controller = controller_for(redis_server_session.url, prometheus.url, Raising(), tiers={"free": TIERS["free"]})
    controller.start()
    try:
        wait_for(lambda: (controller.metrics.registry.get_sample_value("ratepilot_controller_ticks_total",
                                                                      {"result": "written"}) or 0) >= 4, timeout_s=10)  # fmt: skip
        assert controller.running
    finally:
        controller.stop()
    assert errors(controller, "policy") >= 4
    assert table(redis_client)["free"].rate == 100.0


def test_a_corrupt_model_file_keeps_the_previous_policy(tmp_path: Path) -> None:
    corrupt = tmp_path / "policy.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    first = LoadedPolicy(LatencyFollower(), "latency_follower")
    holder = PolicyHolder(first, PolicySettings(name="latency_follower"))
    with pytest.raises(PolicyLoadError, match="not a policy file: a policy is an .npz .ZIP. archive"):
        holder.reload(PolicySettings(name="rl", model=str(corrupt)))
    with pytest.raises(PolicyLoadError, match="no such policy file"):
        holder.reload(PolicySettings(name="rl", model=str(tmp_path / "missing.npz")))
    assert holder.current is first and "no such policy file" in (holder.last_error or "")
