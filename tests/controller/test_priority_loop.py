"""Priority across tiers sharing one backend, in real ticks: real Prometheus scraping the synthetic exporter, real Redis.

The policy proposes 60 tokens/s for each of `pro` (top priority) and `free` (bottom) of one backend:
C = 120. The exporter reports demand (admitted + throttled) of 80 for pro and 100 for free, so pro
gets its 80 and free the remaining 40; the rate table and the decisions stream say so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from benchmarks.synthetic_exporter import SyntheticExporter
from controller.policies import LoadedPolicy
from controller.rate_store import DECISIONS_KEY
from controller.runtime import Controller
from controller.settings import SettingsError
from limiter.rate_table import RATES_KEY, parse_entry
from policy.base import Policy
from policy.baselines import Static
from ratepilot.servers import PrometheusServer, RedisServer
from tests.controller.policies import Raising
from tests.controller.support import make_settings, query, wait_for

SHARED = {
    "pro": {"static_rate": 60, "min_rate": 5, "max_rate": 1000, "backend": "api", "priority": 2},
    "free": {"static_rate": 60, "min_rate": 5, "max_rate": 1000, "backend": "api", "priority": 1},
    "hot": {"static_rate": 100, "min_rate": 10, "max_rate": 1000},  # in no group: untouched
}


@pytest.fixture
def overloaded(exporter: SyntheticExporter, prometheus: PrometheusServer) -> Iterator[None]:
    """pro asks for 80 tokens/s (50 admitted + 30 throttled), free for 100 (50 + 50), as Prometheus reports them."""
    exporter.set("pro", throttled_tps=30.0)
    exporter.set("free", throttled_tps=50.0)
    expr = 'sum by (tier) (rate(ratepilot_decision_tokens_total{outcome="throttled"}[3s]))'

    def reported() -> bool:
        seen = {s["metric"]["tier"]: float(s["value"][1]) for s in query(prometheus.url, expr)}
        return abs(seen.get("pro", 0) - 30) < 0.5 and abs(seen.get("free", 0) - 50) < 0.5

    try:
        wait_for(reported, timeout_s=40)
        yield
    finally:
        exporter.set("pro", throttled_tps=0.0)
        exporter.set("free", throttled_tps=0.0)


def controller_with(redis_url: str, prometheus_url: str, policy: Policy, tiers: dict[str, Any]) -> Controller:
    settings = make_settings(redis_url, prometheus_url, tiers=tiers)
    controller = Controller(settings, LoadedPolicy(policy, "test"))
    assert controller.lease.try_acquire_or_renew()
    return controller


def test_overload_gives_the_top_tier_its_demand_and_cuts_the_bottom(
    overloaded: None, redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    controller = controller_with(redis_server_session.url, prometheus.url, Static(rate=60.0), SHARED)
    try:
        report = controller.loop.tick()
    finally:
        controller.stop()
    assert report.result == "written" and report.errors == {}
    pro, free, hot = report.tiers["pro"], report.tiers["free"], report.tiers["hot"]
    assert pro["rate"] == pytest.approx(80.0, abs=0.5) and pro["rule"] == "none"
    assert free["rate"] == pytest.approx(40.0, abs=0.5)
    assert pro["rate"] + free["rate"] == pytest.approx(120.0)  # the policy's capacity estimate, divided
    assert hot["rate"] == 60.0 and "priority" not in hot
    assert pro["priority"]["backend"] == "api" and pro["priority"]["outcome"] == "overload"
    assert pro["priority"]["rate_before"] == 60.0 and pro["priority"]["demand"] == pytest.approx(80.0, abs=0.5)
    assert free["proposed"] == 60.0  # what the policy asked for
    table = {k.decode(): parse_entry(v) for k, v in redis_client.hgetall(RATES_KEY).items()}
    assert table["pro"].rate == pytest.approx(pro["rate"]) and table["free"].rate == pytest.approx(free["rate"])
    stream = [json.loads(fields[b"decision"]) for _, fields in redis_client.xrange(DECISIONS_KEY)]
    assert [d["priority"]["outcome"] for d in stream if "priority" in d] == ["overload", "overload"]
    assert any("event=priority" in r.getMessage() and "outcome=overload" in r.getMessage() for r in caplog.records)


def test_the_safety_engine_still_caps_the_divided_rates(
    overloaded: None, redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer
) -> None:
    tiers = {**SHARED, "pro": {**SHARED["pro"], "max_rate": 70}, "free": {**SHARED["free"], "min_rate": 50}}
    controller = controller_with(redis_server_session.url, prometheus.url, Static(rate=60.0), tiers)
    try:
        report = controller.loop.tick()
    finally:
        controller.stop()
    assert report.tiers["pro"]["rate"] == 70.0 and report.tiers["pro"]["rule"] == "tier_bounds"
    assert report.tiers["free"]["rate"] == 50.0 and report.tiers["free"]["rule"] == "tier_bounds"


def test_a_failing_policy_keeps_the_rates_in_force(
    overloaded: None, redis_client: redis.Redis, redis_server_session: RedisServer, prometheus: PrometheusServer
) -> None:
    controller = controller_with(redis_server_session.url, prometheus.url, Raising(), SHARED)
    try:
        report = controller.loop.tick()
    finally:
        controller.stop()
    assert report.result == "written" and "policy" in report.errors
    assert [report.tiers[t]["rate"] for t in ("pro", "free", "hot")] == [60.0, 60.0, 100.0]
    assert all("priority" not in report.tiers[t] for t in ("pro", "free", "hot"))


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ({"a": {"priority": 2}}, "need a backend"),
        ({"a": {"backend": "api", "priority": 1, "reserve": 0.2}, "b": {"backend": "api", "priority": 2}}, "only the top priority"),
        ({"a": {"backend": "api", "reserve": 0.5}, "b": {"backend": "api", "reserve": 0.5}}, "add up to 1"),
        ({"a": {"backend": "api", "weight": 0}}, "greater than 0"),
        ({"a": {"backend": "api", "weight": float("nan")}}, "finite"),
        ({"a": {"backend": "api", "priority": True}}, "valid integer"),
        ({"a": {"backend": "a b"}}, "pattern"),
        ({"a": {"backend": "api", "reserve": 0.95}}, "less than or equal to 0.9"),
    ],
)
def test_priority_settings_that_cannot_work_are_refused(tiers: dict[str, dict[str, Any]], message: str) -> None:
    base = {"static_rate": 10, "min_rate": 1, "max_rate": 100}
    with pytest.raises(SettingsError, match=message):
        make_settings("redis://127.0.0.1:6379/0", "http://127.0.0.1:9090", tiers={k: {**base, **v} for k, v in tiers.items()})


def test_groups_follow_the_tier_order() -> None:
    base = {"static_rate": 10, "min_rate": 1, "max_rate": 100}
    tiers = {"x": base, "low": {**base, "backend": "api"}, "top": {**base, "backend": "api", "priority": 3, "reserve": 0.1, "weight": 2}}
    (group,) = make_settings("redis://127.0.0.1:6379/0", "http://127.0.0.1:9090", tiers=tiers).priority_groups()
    assert group.name == "api" and group.tiers.tolist() == [1, 2] and group.priority.tolist() == [0, 3]
    assert group.weight.tolist() == [1.0, 2.0] and group.reserve == 0.1
