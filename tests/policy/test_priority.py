"""The priority allocator: exact allocations for each rule of policy/priority.py's table, and its invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.baselines import Static
from policy.observation import IntervalMetrics, ObservationBuilder
from policy.priority import (
    PriorityConfigError,
    PriorityGroup,
    PrioritySafePolicy,
    allocate,
    allocate_groups,
    water_fill,
)
from policy.safety import OperatorCaps, SafePolicy, SafetyEngine, SafetyLimits


def two_tiers(reserve: float = 0.0) -> PriorityGroup:
    """Tier 0 is the top priority, tier 1 the bottom."""
    return PriorityGroup("backend", tiers=[0, 1], priority=[2, 1], weight=[1, 1], reserve=reserve)


def test_overload_serves_the_top_tier_first_and_cuts_the_bottom() -> None:
    result = allocate(np.array([30.0, 70.0]), np.array([60.0, 80.0]), two_tiers())
    assert result.outcome == "overload"
    assert result.capacity == 100.0
    np.testing.assert_allclose(result.rates, [60.0, 40.0])
    np.testing.assert_allclose(result.cut, [0.0, 40.0])


def test_top_demand_above_capacity_takes_all_of_it() -> None:
    # C = min(30, 80) + min(30, 20) = 50: all of it to the top tier
    result = allocate(np.array([30.0, 30.0]), np.array([80.0, 20.0]), two_tiers())
    np.testing.assert_allclose(result.rates, [50.0, 0.0])
    assert result.capacity == 50.0


def test_proposals_covering_every_demand_stand_exactly() -> None:
    proposed = np.array([40.0, 60.0])
    result = allocate(proposed, np.array([30.0, 50.0]), two_tiers())
    assert result.outcome == "proposed"
    assert np.array_equal(result.rates, proposed)


def test_the_top_tier_takes_the_bottoms_load_never_its_headroom() -> None:
    # the bottom's 80 admits only its demand of 30: C = 20 + 30 = 50, the top takes 40 of it
    result = allocate(np.array([20.0, 80.0]), np.array([40.0, 30.0]), two_tiers())
    assert result.outcome == "overload" and result.capacity == 50.0
    np.testing.assert_allclose(result.rates, [40.0, 10.0])


def test_headroom_goes_back_to_the_tiers_whose_demand_is_met() -> None:
    group = PriorityGroup("b", tiers=[0, 1, 2], priority=[1, 1, 1], weight=[1, 1, 1])
    # C = 5 + 50 + 20 = 75 by max-min over demand [10, 50, 20]: [10, 45, 20]; tier 2 keeps its 20 above demand
    result = allocate(np.array([5.0, 55.0, 40.0]), np.array([10.0, 50.0, 20.0]), group)
    np.testing.assert_allclose(result.rates, [10.0, 45.0, 40.0])


def test_reserve_keeps_the_lower_tiers_within_their_share() -> None:
    # total rate 100, the bottom may admit 70 of its 100: C = 10 + 80 = 90, the 10 it may not take go to the top
    result = allocate(np.array([20.0, 80.0]), np.array([10.0, 100.0]), two_tiers(reserve=0.3))
    assert result.outcome == "overload"
    np.testing.assert_allclose(result.rates, [30.0, 70.0])


def test_reserve_leaves_the_rates_when_the_lower_tiers_stay_within_it() -> None:
    result = allocate(np.array([10.0, 90.0]), np.array([5.0, 50.0]), two_tiers(reserve=0.2))
    assert result.outcome == "proposed"
    np.testing.assert_array_equal(result.rates, [10.0, 90.0])


def test_weighted_max_min_within_one_level() -> None:
    # water level L: 10 fits (10 <= L), then 80 left over weights 2 + 1: L = 26.67
    given = water_fill(np.array([100.0, 100.0, 10.0]), np.array([1.0, 2.0, 1.0]), 90.0)
    np.testing.assert_allclose(given, [80 / 3, 160 / 3, 10.0])


def test_three_levels_fill_from_the_top() -> None:
    group = PriorityGroup("b", tiers=[0, 1, 2], priority=[3, 2, 1], weight=[1, 1, 1])
    result = allocate(np.array([20.0, 20.0, 20.0]), np.array([30.0, 40.0, 50.0]), group)
    np.testing.assert_allclose(result.rates, [30.0, 30.0, 0.0])


@pytest.mark.parametrize(
    ("proposed", "demand"),
    [([30.0, 70.0], [np.nan, 10.0]), ([np.inf, 70.0], [1.0, 10.0]), ([0.0, 0.0], [1.0, 1.0]), ([30.0, 70.0], [-1.0, 5.0])],
)
def test_unusable_input_leaves_the_proposals(proposed: list[float], demand: list[float]) -> None:
    result = allocate(np.array(proposed), np.array(demand), two_tiers())
    assert result.outcome == "skipped"
    np.testing.assert_array_equal(result.rates, proposed)


def test_tiers_outside_every_group_keep_their_proposal() -> None:
    group = PriorityGroup("b", tiers=[2, 0], priority=[5, 1], weight=[1, 1])
    result = allocate_groups(np.array([50.0, 7.0, 50.0]), np.array([90.0, 99.0, 30.0]), [group])
    # C = min(50, 90) + min(50, 30) = 80: tier 2 (top) its 30 and its headroom back, tier 0 the other 50
    np.testing.assert_allclose(result.rates, [50.0, 7.0, 50.0])
    assert result.groups["b"].outcome == "overload"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weight": [1, 0]}, "weights"),
        ({"weight": [1, float("nan")]}, "weights"),
        ({"reserve": 0.95}, "reserve"),
        ({"reserve": float("nan")}, "reserve"),
        ({"tiers": [0, 0]}, "distinct"),
        ({"priority": [1]}, "one entry per tier"),
    ],
)
def test_bad_groups_are_refused(changes: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"tiers": [0, 1], "priority": [2, 1], "weight": [1, 1], **changes}
    with pytest.raises(PriorityConfigError, match=message):
        PriorityGroup("b", **args)  # type: ignore[arg-type]


finite = st.floats(min_value=0.0, max_value=1e4, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    proposed=st.lists(finite, min_size=3, max_size=3),
    demand=st.lists(finite, min_size=3, max_size=3),
    priority=st.lists(st.integers(0, 2), min_size=3, max_size=3),
    reserve=st.sampled_from([0.0, 0.1, 0.5]),
)
def test_invariants(proposed: list[float], demand: list[float], priority: list[int], reserve: float) -> None:
    group = PriorityGroup("b", tiers=[0, 1, 2], priority=priority, weight=[1, 2, 1], reserve=reserve)
    p, d = np.array(proposed), np.array(demand)
    result = allocate(p, d, group)
    if result.outcome == "skipped":
        assert p.sum() <= 0
        return
    load = np.minimum(p, d).sum()
    divided_load = np.minimum(result.rates, d)
    tol = 1e-6 * (1 + p.sum())
    assert divided_load.sum() <= load + tol  # the division never adds load
    assert result.rates.sum() <= p.sum() + tol and np.all(result.rates >= -tol)
    for level in set(priority):  # a higher level short of demand: no lower level admits anything
        higher = group.priority > level
        if np.any(result.rates[higher] < d[higher] - tol):
            assert divided_load[group.priority == level].sum() <= tol
    lower = ~group.top
    if lower.any():
        assert divided_load[lower].sum() <= (1 - reserve) * p.sum() + tol
    if np.all(p >= d) and reserve == 0:
        np.testing.assert_allclose(result.rates, p, atol=tol)  # every demand covered: the rates stand


def observation_of(admitted: list[float], throttled: list[float], rate: list[float], p99_ms: float = 100.0):  # type: ignore[no-untyped-def]
    n = len(rate)
    builder = ObservationBuilder(slo_ms=np.full(n, 250.0), reference_rate=np.full(n, 50.0))
    metrics = IntervalMetrics(
        p99_latency_ms=np.full(n, p99_ms), error_rate=np.zeros(n), cpu=np.full(n, 0.5),
        admitted_rps=np.array(admitted), throttled_rps=np.array(throttled), rate=np.array(rate),
    )  # fmt: skip
    return builder.build(metrics)


def safe_two_tiers(min_rate: list[float], max_rate: list[float]) -> PrioritySafePolicy:
    limits = SafetyLimits(min_rate=np.array(min_rate), max_rate=np.array(max_rate), static_rate=np.array([50.0, 50.0]))
    return PrioritySafePolicy(Static(rate=50.0), SafetyEngine(limits), groups=[two_tiers()])


def test_the_wrapper_divides_by_the_observed_demand() -> None:
    safe = safe_two_tiers([1.0, 1.0], [1000.0, 1000.0])
    result = safe.decide(observation_of(admitted=[40.0, 50.0], throttled=[30.0, 20.0], rate=[50.0, 50.0]))
    np.testing.assert_allclose(result.rates, [70.0, 30.0])  # demand [70, 70], C = 100
    np.testing.assert_allclose(result.proposed, [50.0, 50.0])  # what the policy asked for
    assert result.deciding_rule == ["none", "none"]
    assert safe.last_division is not None and safe.last_division.groups["backend"].outcome == "overload"


def test_the_brakes_cut_lands_on_the_bottom_tier() -> None:
    safe = safe_two_tiers([1.0, 1.0], [1000.0, 1000.0])
    # p99 = 4 x SLO: the brake halves both rates (C = 25 + 25); the top tier keeps its demand of 40
    result = safe.decide(observation_of(admitted=[40.0, 50.0], throttled=[0.0, 20.0], rate=[50.0, 50.0], p99_ms=1000.0))
    np.testing.assert_allclose(result.rates, [40.0, 10.0])
    assert result.fired_rules(0) == ["emergency_brake"] and result.fired_rules(1) == ["emergency_brake"]


def test_the_per_tier_caps_still_apply_to_the_division() -> None:
    safe = safe_two_tiers([1.0, 10.0], [60.0, 1000.0])
    safe.caps = OperatorCaps(min_rate=np.array([np.nan, np.nan]), max_rate=np.array([np.nan, np.nan]), pinned=np.array([np.nan, 5.0]))
    result = safe.decide(observation_of(admitted=[50.0, 50.0], throttled=[50.0, 50.0], rate=[50.0, 50.0]))
    # division [100, 0]: the top tier's max 60, the bottom's min 10, then the operator's pin 5
    np.testing.assert_allclose(result.rates, [60.0, 5.0])
    assert result.deciding_rule == ["tier_bounds", "pinned"] and result.source == ["controller", "override"]


def test_a_failing_policy_is_not_divided() -> None:
    limits = SafetyLimits(min_rate=np.array([1.0, 1.0]), max_rate=np.array([1000.0, 1000.0]), static_rate=np.array([50.0, 50.0]))
    safe = PrioritySafePolicy(Static(rate=50.0), SafetyEngine(limits), groups=[two_tiers()])
    safe.inner.act = lambda observation: 1 / 0  # type: ignore[method-assign]
    result = safe.decide(observation_of(admitted=[40.0, 50.0], throttled=[30.0, 20.0], rate=[50.0, 30.0]))
    np.testing.assert_array_equal(result.rates, [50.0, 30.0])
    assert result.deciding_rule == ["policy_error", "policy_error"] and safe.last_division is None


def test_without_groups_it_is_the_safety_engine_alone() -> None:
    limits = SafetyLimits(min_rate=np.array([1.0, 1.0]), max_rate=np.array([1000.0, 1000.0]), static_rate=np.array([50.0, 50.0]))
    observation = observation_of(admitted=[40.0, 50.0], throttled=[30.0, 20.0], rate=[50.0, 50.0], p99_ms=1000.0)
    plain = SafePolicy(Static(rate=50.0), SafetyEngine(limits)).decide(observation)
    grouped = PrioritySafePolicy(Static(rate=50.0), SafetyEngine(limits))
    np.testing.assert_array_equal(grouped.decide(observation).rates, plain.rates)
    assert grouped.last_division is None
