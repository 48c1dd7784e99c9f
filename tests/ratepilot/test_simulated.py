"""The demo's world in the simulator, and the real loop's decisions read back from a real Redis stream."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis

from controller.decisions import decision_texts
from controller.rate_store import DECISIONS_KEY
from policy.baselines import Static
from policy.observation import OBS_DIM, IntervalMetrics, ObservationBuilder
from policy.safety import SafetyEngine, SafetyLimits
from ratepilot.demo.run import save_decisions
from ratepilot.demo.schedule import LoadSchedule, default_scenario
from ratepilot.demo.simulated import (
    comparison_plot,
    demo_episode,
    demo_world,
    read_decisions,
    simulate,
    simulate_demo,
)
from ratepilot.demo.stack import StackSettings
from ratepilot.servers import RedisServer


def flat_schedule(demand: float, capacity: float, seconds: int = 60) -> LoadSchedule:
    return LoadSchedule("flat", np.full(seconds, demand), np.full(seconds, capacity), ((0, "flat"),), capacity)


def limits(capacity: float) -> SafetyLimits:
    return SafetyLimits(min_rate=capacity / 10, max_rate=capacity * 2, static_rate=capacity)


def test_demo_episode_carries_the_schedule_in_whole_intervals() -> None:
    schedule = default_scenario(duration_s=62, scale=0.5)  # 62 s: cut to 60, twelve 5 s intervals
    params = demo_world(50.0, 300.0, 0.025, 2.0, 1.0)
    episode = demo_episode(schedule, params)
    assert episode.demand_rps.tolist() == schedule.demand_rps[:60].tolist()
    assert (episode.capacity_factor * 50.0).tolist() == pytest.approx(schedule.capacity_rps[:60].tolist())
    assert episode.steps == 11 and not episode.heavy_frac.any()
    assert params.base_latency_ms == pytest.approx(25.0 * math.log(100.0))  # idle p99 of 25 ms exponential service
    assert params.retry_p_throttled == 0.0 and params.retry_p_error == 0.0  # the demo's load is open loop
    with pytest.raises(ValueError, match="shorter than two control intervals"):
        demo_episode(default_scenario(duration_s=9, scale=0.5), params)


def test_static_rate_at_capacity_under_light_demand_serves_everything_within_slo() -> None:
    schedule = flat_schedule(demand=20.0, capacity=50.0)
    episode = demo_episode(schedule, demo_world(50.0, 300.0, 0.025, 2.0, 1.0))
    run = simulate(episode, Static(factor=1.0), limits(50.0))
    assert run.ticks.rate.tolist() == [50.0] * episode.steps  # the static policy's rate, never clamped
    assert run.ticks.vector.shape == (episode.steps, OBS_DIM)
    assert run.goodput_ratio == pytest.approx(1.0, abs=0.05) and run.slo_violation_frac == 0.0
    assert math.isnan(run.recovery_s)  # no capacity cut in the schedule
    again = simulate(episode, Static(factor=1.0), limits(50.0))
    assert again.goodput_ratio == run.goodput_ratio  # the same episode, the same random numbers


def test_overload_at_a_static_rate_above_capacity_violates_the_slo() -> None:
    episode = demo_episode(flat_schedule(demand=80.0, capacity=50.0), demo_world(50.0, 300.0, 0.025, 2.0, 1.0))
    run = simulate(episode, Static(factor=1.5), limits(50.0))  # 75 req/s admitted into a 50 req/s backend
    assert run.slo_violation_frac > 0.5 and run.goodput_ratio < 0.9


def test_simulate_demo_runs_the_default_schedule_with_a_baseline() -> None:
    schedule = default_scenario(duration_s=60, scale=0.5)
    run = simulate_demo(schedule, StackSettings(nominal_capacity_rps=50.0, policy="aimd", workers=2))
    assert 0 < run.goodput_ratio <= 1.1 and 0 <= run.slo_violation_frac <= 1
    assert set(run.to_dict()) == {"goodput_ratio", "slo_violation_frac", "recovery_s"}


def test_decisions_saved_from_a_real_stream_read_back_tick_by_tick(redis_client: redis.Redis,
                                                                   redis_server_session: RedisServer, tmp_path: Path) -> None:  # fmt: skip
    builder = ObservationBuilder(slo_ms=np.array([300.0, 300.0]), reference_rate=np.array([50.0, 50.0]))
    engine = SafetyEngine(SafetyLimits(min_rate=np.full(2, 5.0), max_rate=np.full(2, 100.0), static_rate=np.full(2, 50.0)))
    for tick, rate in enumerate((50.0, 40.0)):
        metrics = IntervalMetrics(np.full(2, 150.0), np.zeros(2), np.full(2, 0.6), np.full(2, 30.0), np.full(2, 3.0), np.full(2, rate))
        observation = builder.build(metrics)
        safety = engine.apply(observation, np.full(2, rate * 1.2))
        for tier, text in zip(("gold", "demo"), decision_texts(observation, observation.rate, safety, "active", "rl", 1000.0 + 5 * tick),
                              strict=True):  # fmt: skip
            redis_client.xadd(DECISIONS_KEY, {"tier": tier, "version": tick + 1, "fence": "f", "replica": "r", "decision": text})
    path = tmp_path / "decisions.jsonl"
    assert save_decisions(redis_server_session.url, path) == 4
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [row["tier"] for row in rows] == ["gold", "demo", "gold", "demo"]  # oldest first
    ticks = read_decisions(path, "demo", load_started_s=995.0)
    assert ticks.t_s.tolist() == [5.0, 10.0]
    assert ticks.rate_in_force.tolist() == [50.0, 40.0] and ticks.rate.tolist() == [60.0, 48.0]
    assert ticks.vector.shape == (2, OBS_DIM) and ticks.vector[0, 0] == pytest.approx(0.5)  # p99 / SLO
    assert read_decisions(path, "demo").t_s.tolist() == [0.0, 5.0]  # without the load's start: from the first tick
    with pytest.raises(ValueError, match="no decisions of tier 'silver'"):
        read_decisions(path, "silver")
    png = comparison_plot(tmp_path / "cmp.png", {"real": ticks}, flat_schedule(30.0, 50.0, seconds=15))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
