"""Two tiers in front of one backend: the shared queue's physics, and priority when capacity halves (seeded)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from policy.baselines import Static
from policy.priority import PrioritySafePolicy
from policy.registry import make_policy
from policy.safety import SafetyEngine
from training.multitier import (
    SharedBackendSim,
    TwoTierRun,
    run_two_tiers,
    two_tier_episodes,
    two_tier_group,
    two_tier_limits,
)
from training.sim import BatchSim
from training.world import Episode

SETTLE = 6  # intervals (30 s) after the cut: the backlog built before the first tick after it has drained


def run(prioritised: bool, seed: int) -> TwoTierRun:
    groups = [two_tier_group()] if prioritised else []
    return run_two_tiers(PrioritySafePolicy(make_policy("rl"), SafetyEngine(two_tier_limits()), groups=groups), seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_when_capacity_halves_the_top_tier_keeps_its_demand_served_and_the_bottom_is_cut(seed: int) -> None:
    result = run(prioritised=True, seed=seed)
    before = result.served_within_slo(start=2, end=result.cut_interval)
    assert np.all(before >= 0.95), before  # enough capacity: both tiers served
    top, bottom = result.served_within_slo(result.cut_interval + SETTLE)
    assert top >= 0.95, top
    assert bottom <= 0.35, bottom  # the bottom tier absorbs the cut (0.5 C0 asked of ~0.45 C0 left, 0.3 C0 of it the top's)
    # the rates say why: the backend's capacity estimate goes to the top tier's demand first
    late = slice(result.cut_interval + SETTLE, None)
    assert np.median(result.rate[0, late]) == pytest.approx(300.0, rel=0.1)
    assert np.median(result.rate[1, late]) < np.median(result.rate[0, late])
    # over the whole time since the cut, the first ~15 s serve no tier within the SLO (the backlog of the
    # interval before the first tick): the top tier's share is lower, still well above the bottom's
    top_all, bottom_all = result.served_within_slo()
    assert top_all >= 0.78 and bottom_all <= 0.3


def test_without_priority_the_same_policy_cuts_the_top_tier_too() -> None:
    result = run(prioritised=False, seed=0)
    top, bottom = result.served_within_slo(result.cut_interval + SETTLE)
    assert top < 0.7 and bottom < 0.7


def test_the_same_seed_gives_the_same_run() -> None:
    first, second = run(True, 3), run(True, 3)
    np.testing.assert_array_equal(first.good_tokens, second.good_tokens)
    np.testing.assert_array_equal(first.rate, second.rate)


def test_two_tiers_of_one_backend_load_it_like_one_tier_with_their_summed_demand() -> None:
    # open rates (no throttling), total demand 0.9 x capacity: at the knee, the backend decides latency
    tiers = two_tier_episodes(seed=0, seconds=60, cut_s=30)
    tiers = [replace(e, demand_rps=e.demand_rps * 0.9 / 0.8, capacity_factor=np.ones(60)) for e in tiers]
    one = Episode("one", 0, tiers[0].params, tiers[0].demand_rps + tiers[1].demand_rps, np.ones(60), np.zeros(60))
    shared, single = SharedBackendSim(tiers, backend=[0, 0]), BatchSim([one])
    shared.reset(), single.reset()
    good_shared, good_single, cpu_shared, cpu_single, p99, p99_single = 0.0, 0.0, [], [], [], []
    for _ in range(shared.steps):
        _, _, _, info = shared.step(np.full(2, 5000.0))
        good_shared += info["goodput_tokens"].sum()
        p99.append(info["p99_ms"])
        cpu_shared.append(shared.hist[7, :, -50:].mean(axis=1))  # column CPU of the last interval
        info = single.step(np.full(1, 5000.0))[3]
        good_single += info["goodput_tokens"].sum()
        p99_single.append(info["p99_ms"][0])
        cpu_single.append(single.hist[7, 0, -50:].mean())
    assert good_shared == pytest.approx(good_single, rel=0.03)
    p99_by_tier, cpu_by_tier = np.array(p99), np.array(cpu_shared)
    # one queue: the tiers' requests meet the same waits, each tier weighted by its own arrivals
    np.testing.assert_allclose(p99_by_tier[:, 0], p99_by_tier[:, 1], rtol=0.1)
    np.testing.assert_allclose(cpu_by_tier[:, 0], cpu_by_tier[:, 1], rtol=1e-9)  # one backend: one CPU
    assert np.mean(cpu_by_tier[:, 0]) == pytest.approx(np.mean(cpu_single), rel=0.03) and np.mean(cpu_single) > 0.85
    # p99 at the knee follows the Poisson draws (other draws in one stream than in two): same order
    assert np.median(p99_by_tier[:, 0]) == pytest.approx(np.median(p99_single), rel=0.35)
    assert np.median(p99_single) > 3 * 50  # the knee: well above the idle p99 of 50 ms


def test_tiers_of_one_backend_must_share_its_parameters() -> None:
    top, bottom = two_tier_episodes(seed=0)
    with pytest.raises(ValueError, match="capacity_tokens"):
        SharedBackendSim([top, replace(bottom, params=replace(bottom.params, capacity_tokens=10.0))], backend=[0, 0])
    with pytest.raises(ValueError, match="capacity_factor"):
        SharedBackendSim([top, replace(bottom, capacity_factor=np.ones(bottom.capacity_factor.size))], backend=[0, 0])
    SharedBackendSim([top, replace(bottom, params=replace(bottom.params, capacity_tokens=10.0))], backend=[0, 1])  # two backends


def test_a_static_limiter_serves_neither_tier_after_the_cut() -> None:
    result = run_two_tiers(Static(), seed=0)  # each tier at its static rate: 1.0 x C0 in total against 0.5 x C0
    top, bottom = result.served_within_slo(result.cut_interval + SETTLE)
    assert top < 0.1 and bottom < 0.1
