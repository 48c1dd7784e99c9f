"""The engine: rule order, which rule is reported, overrides, and that no output ever escapes the caps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limiter.bucket import MAX_RATE
from policy.base import Policy
from policy.observation import IntervalMetrics, Observation, ObservationBuilder
from policy.safety import (
    RULES,
    OperatorCaps,
    SafePolicy,
    SafetyConfigError,
    SafetyEngine,
    SafetyLimits,
)

NAN = np.nan


def limits(n: int = 1, **kw: object) -> SafetyLimits:
    base = dict(min_rate=10.0, max_rate=1000.0, static_rate=100.0)
    base.update(kw)
    return SafetyLimits(
        min_rate=np.full(n, base.pop("min_rate")),
        max_rate=np.full(n, base.pop("max_rate")),
        static_rate=np.full(n, base.pop("static_rate")),
        **base,  # type: ignore[arg-type]
    )


def observe(rate: list[float], p99: list[float] | None = None, err: list[float] | None = None, slo: float = 100.0) -> Observation:
    n = len(rate)
    builder = ObservationBuilder(slo_ms=np.array([slo]), reference_rate=np.full(n, 100.0))
    metrics = IntervalMetrics(
        p99_latency_ms=np.array(p99 if p99 is not None else [50.0] * n),
        error_rate=np.array(err if err is not None else [0.0] * n),
        cpu=np.full(n, 0.5),
        admitted_rps=np.full(n, 10.0),
        throttled_rps=np.zeros(n),
        rate=np.array(rate, dtype=np.float64),
    )
    return builder.build(metrics)


def test_policy_rate_stands_when_nothing_fires() -> None:
    result = SafetyEngine(limits()).apply(observe([100.0]), np.array([120.0]))
    assert result.rates.tolist() == [120.0]
    assert result.deciding_rule == ["none"]
    assert result.source == ["controller"]


def test_step_then_tier_max() -> None:
    result = SafetyEngine(limits(max_rate=140.0)).apply(observe([100.0]), np.array([400.0]))
    assert result.rates.tolist() == [140.0]
    assert result.fired_rules(0) == ["step_limit", "tier_bounds"]
    assert result.deciding_rule == ["tier_bounds"]


def test_brake_beats_policy_and_step_limit_but_not_tier_min() -> None:
    engine = SafetyEngine(limits(min_rate=40.0, brake_ratio=0.3))
    result = engine.apply(observe([100.0], p99=[1000.0]), np.array([150.0]))
    assert result.rates.tolist() == [40.0]  # 0.3 x 100 = 30, floored by the tier min of 40
    assert result.fired_rules(0) == ["emergency_brake", "tier_bounds"]


def test_brake_after_a_cut_holds_then_cuts_again_only_if_still_overloaded() -> None:
    class Raise(Policy):
        def act(self, observation: Observation) -> np.ndarray:
            return observation.rate * 1.4

    safe = SafePolicy(Raise(), SafetyEngine(limits()))
    assert safe.act(observe([100.0], p99=[1000.0])).tolist() == [50.0]  # the brake cuts the rate in force
    assert safe.act(observe([50.0], p99=[1000.0])).tolist() == [50.0]  # the backlog of 100: held, not 25
    assert safe.act(observe([50.0], p99=[1000.0])).tolist() == [25.0]  # a whole interval at 50 still over: cut
    assert safe.act(observe([25.0], p99=[50.0])).tolist() == [35.0]  # within the SLO: the policy's raise


def test_missing_metrics_hold_then_decay_and_nan_counts_as_missing() -> None:
    engine = SafetyEngine(limits(stale_hold_ticks=2, stale_decay=0.5, static_rate=100.0))
    stale = None
    rate = 300.0
    seen = []
    for _ in range(4):
        result = engine.apply(observe([rate], p99=[NAN]), np.array([999.0]), stale_ticks=stale)
        stale, rate = result.stale_ticks, float(result.rates[0])
        seen.append((rate, result.deciding_rule[0]))
    assert seen == [(300.0, "stale_hold"), (300.0, "stale_hold"), (200.0, "stale_decay"), (150.0, "stale_decay")]
    fresh = engine.apply(observe([rate]), np.array([160.0]), stale_ticks=stale)
    assert fresh.stale_ticks.tolist() == [0] and fresh.rates.tolist() == [160.0]


def test_policy_failure_and_nan_keep_rate_in_force() -> None:
    engine = SafetyEngine(limits(n=2))
    failed = engine.apply(observe([100.0, 200.0]), None)
    assert failed.rates.tolist() == [100.0, 200.0]
    assert failed.deciding_rule == ["policy_error", "policy_error"]
    assert np.isnan(failed.proposed).all()
    nan = engine.apply(observe([100.0, 200.0]), np.array([NAN, np.inf]))
    assert nan.rates.tolist() == [100.0, 200.0]
    assert nan.deciding_rule == ["non_finite", "non_finite"]


def test_operator_caps_replace_tier_bounds_and_pin_wins() -> None:
    engine = SafetyEngine(limits(n=3, max_up=10.0))
    caps = OperatorCaps(min_rate=np.array([NAN, 300.0, NAN]), max_rate=np.array([NAN, 2000.0, 50.0]), pinned=np.array([NAN, NAN, 77.0]))
    result = engine.apply(observe([100.0, 100.0, 100.0]), np.array([900.0, 200.0, 900.0]), caps)
    assert result.rates.tolist() == [900.0, 300.0, 77.0]
    assert result.deciding_rule == ["none", "override_caps", "pinned"]
    assert result.source == ["controller", "override", "override"]


def test_invalid_rate_in_force_is_replaced_by_static() -> None:
    result = SafetyEngine(limits()).apply(observe([0.0]), np.array([1e9]))
    # in force 0 is not a rate: the engine steps from the static 100 instead, at most x1.5
    assert result.rates.tolist() == [150.0]


@pytest.mark.parametrize(
    "kw",
    [
        {"min_rate": 500.0, "max_rate": 100.0, "static_rate": 200.0},
        {"static_rate": 5000.0},
        {"min_rate": 0.0},
        {"max_up": 0.9},
        {"max_down": 0.0},
        {"brake_ratio": 1.0},
        {"stale_decay": 0.0},
        {"brake_error_rate": 0.0},
    ],
)
def test_limits_that_cannot_work_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(SafetyConfigError):
        limits(**kw)


def test_rules_table_order_is_the_documented_one() -> None:
    assert RULES[0] == "policy_error" and RULES[-1] == "guard"
    assert RULES.index("emergency_brake") > RULES.index("step_limit")
    assert RULES.index("pinned") > RULES.index("override_caps") > RULES.index("tier_bounds")


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.0), st.floats(-1e12, 1e12))


@settings(max_examples=200, deadline=None)
@given(
    proposed=st.lists(floats, min_size=3, max_size=3),
    in_force=st.lists(floats, min_size=3, max_size=3),
    p99=st.lists(floats, min_size=3, max_size=3),
    cap_low=st.one_of(st.none(), st.floats(1.0, 1e5)),
    stale=st.integers(0, 10),
)
def test_no_output_escapes_the_caps(
    proposed: list[float], in_force: list[float], p99: list[float], cap_low: float | None, stale: int
) -> None:
    engine = SafetyEngine(limits(n=3))
    caps = OperatorCaps.none(3)
    if cap_low is not None:
        caps = OperatorCaps(np.array([cap_low, NAN, NAN]), np.array([cap_low * 2, NAN, NAN]), np.full(3, NAN))
    with np.errstate(all="ignore"):
        obs = observe(in_force, p99=p99)
    result = engine.apply(obs, np.array(proposed), caps, np.full(3, stale))
    assert np.isfinite(result.rates).all()
    assert (result.rates > 0).all() and (result.rates <= MAX_RATE).all()
    assert (result.rates[1:] >= 10.0).all() and (result.rates[1:] <= 1000.0).all()
    if cap_low is not None:
        assert cap_low <= result.rates[0] <= cap_low * 2


class Exploding(Policy):
    name = "exploding"

    def act(self, observation: Observation) -> np.ndarray:
        raise RuntimeError("boom")


def test_safe_policy_wraps_a_policy_that_raises() -> None:
    wrapped = SafePolicy(Exploding(), SafetyEngine(limits()))
    assert wrapped.act(observe([123.0])).tolist() == [123.0]
    assert wrapped.last_result is not None and wrapped.last_result.deciding_rule == ["policy_error"]
