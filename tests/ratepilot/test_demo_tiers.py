"""The two-tier demo's configs and its per-tier accounting (pure parts; the real run is test_demo_run.py)."""

from __future__ import annotations

import numpy as np
import yaml

from controller.settings import settings_from_mapping
from limiter.config import parse_config
from ratepilot.demo.cli import sends_top_tier
from ratepilot.demo.loadgen import Request, RequestPlan, RunRecord
from ratepilot.demo.schedule import arrival_times, default_scenario
from ratepilot.demo.stack import (
    TIER,
    TOP_TIER,
    StackSettings,
    controller_config,
    limiter_config,
    rate_window,
    static_rates,
    tier_prefixes,
)
from ratepilot.demo.tiers import lowest_capacity_phase, request_tiers, served_within_slo, subset
from ratepilot.loadtest.plan import request_plan
from ratepilot.loadtest.scenario import load_scenario


def test_two_tier_configs_share_the_nominal_capacity_and_one_backend_by_priority() -> None:
    settings = StackSettings(nominal_capacity_rps=80.0, two_tiers=True)
    assert static_rates(settings) == {TOP_TIER: 20.0, TIER: 60.0}
    limiter = parse_config(yaml.safe_dump(limiter_config("redis://127.0.0.1:6379/0", settings)), environ={})
    assert {t: limiter.tiers[t].aggregate.rate for t in (TOP_TIER, TIER)} == {TOP_TIER: 20.0, TIER: 60.0}
    assert list(limiter.tiers[TOP_TIER].key_prefixes) == ["gold_"]
    controller = settings_from_mapping(controller_config("redis://127.0.0.1:6379/0", "http://127.0.0.1:9090", 8081, settings), env={})
    (group,) = controller.priority_groups()
    assert [controller.tier_names[i] for i in group.tiers] == [TOP_TIER, TIER] and group.priority.tolist() == [2, 1]
    one = StackSettings(nominal_capacity_rps=80.0)
    assert static_rates(one) == {TIER: 80.0}
    assert settings_from_mapping(controller_config("redis://x:1/0", "http://p:9090", 1, one), env={}).priority_groups() == []


def test_the_demo_scenarios_keys_split_into_the_two_tiers() -> None:
    schedule = default_scenario(60)
    arrivals = arrival_times(schedule.demand_rps, seed=0)
    plan = request_plan(load_scenario("demo"), arrivals, seed=0)
    tiers = request_tiers(plan, arrivals.size, tier_prefixes(StackSettings(1.0, two_tiers=True)), TIER)
    share_gold = float(np.mean(tiers == TOP_TIER))
    assert abs(share_gold - 0.25) < 0.03 and set(tiers.tolist()) == {TOP_TIER, TIER}
    assert set(request_tiers(None, 5, {TOP_TIER: "gold_"}, TIER).tolist()) == {TIER}


def test_the_controller_observes_one_tick_but_never_fewer_than_two_scrapes() -> None:
    assert rate_window(StackSettings(80.0, tick_interval_s=5.0)) == "5000ms"
    assert rate_window(StackSettings(80.0, tick_interval_s=1.0)) == "2000ms"
    config = controller_config("redis://127.0.0.1:6379/0", "http://127.0.0.1:9090", 8081, StackSettings(80.0))
    assert settings_from_mapping(config, env={}).prometheus.window == "5000ms"


def test_two_tiers_only_when_the_scenario_sends_gold_keys() -> None:
    # a trace (no scenario) or a scenario without gold_ clients sends every request to the bottom tier:
    # a second, idle tier would only hold a quarter of the rate and count it as "in force"
    assert sends_top_tier(load_scenario("demo"))
    assert not sends_top_tier(load_scenario("retry_storm"))
    assert not sends_top_tier(None)


def test_served_within_slo_counts_2xx_within_the_slo_in_the_window() -> None:
    record = RunRecord(np.array([0.5, 1.5, 2.5, 3.5, 4.5]))
    record.status[:] = [200, 200, 429, 503, 200]
    record.latency_s[:] = [0.1, 0.4, 0.01, 0.1, 0.2]
    assert served_within_slo(record, slo_ms=300) == 2 / 5
    assert served_within_slo(record, slo_ms=300, start_s=1.0, end_s=4.0) == 0.0
    assert served_within_slo(record, slo_ms=500, start_s=1.0, end_s=4.0) == 1 / 3
    part = subset(record, np.array([True, False, False, False, True]))
    assert part.status.tolist() == [200, 200] and served_within_slo(part, 300) == 1.0
    plan = RequestPlan((Request(),), ("gold_0", "demo_0"), np.zeros(3, dtype=np.int64), np.array([0, 1, 1]))
    assert request_tiers(plan, 3, {TOP_TIER: "gold_", TIER: "demo_"}, TIER).tolist() == [TOP_TIER, TIER, TIER]


def test_the_cut_is_the_lowest_capacity_phase() -> None:
    name, start, end = lowest_capacity_phase(default_scenario(180))
    assert name == "capacity halved" and (start, end) == (72, 126)
