"""Each baseline: exact next rates for given observations (numbers worked out by hand from the docstrings)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policy.base import Policy
from policy.baselines import AIMD, PID, Gradient, LateOracle, NoLimit, Oracle, Static, Threshold
from policy.observation import IntervalMetrics, Observation, ObservationBuilder
from policy.registry import POLICIES, UnknownPolicyError, make_policy, register_policy

NAN = math.nan


def observe(
    p99: list[float], rate: list[float], admitted: list[float] | None = None, throttled: list[float] | None = None,
    errors: list[float] | None = None, slo: float = 200.0, reference: float = 1000.0, capacity: list[float] | None = None,
    builder: ObservationBuilder | None = None,
) -> Observation:  # fmt: skip
    """An observation of len(p99) tiers with the given metrics (admitted defaults to the rate)."""
    n = len(p99)
    builder = builder or ObservationBuilder(slo_ms=np.full(n, slo), reference_rate=np.full(n, reference))
    metrics = IntervalMetrics(
        p99_latency_ms=np.array(p99, dtype=float),
        error_rate=np.array(errors if errors is not None else [0.0] * n, dtype=float),
        cpu=np.full(n, 0.5),
        admitted_rps=np.array(admitted if admitted is not None else rate, dtype=float),
        throttled_rps=np.array(throttled if throttled is not None else [0.0] * n, dtype=float),
        rate=np.array(rate, dtype=float),
    )
    return builder.build(metrics, None if capacity is None else np.array(capacity, dtype=float))


def test_static_is_a_fixed_rate_or_a_factor_of_the_reference() -> None:
    obs = observe([100.0, 900.0], [10.0, 5000.0])
    assert Static(rate=750.0).act(obs).tolist() == [750.0, 750.0]
    assert Static(factor=0.8).act(obs).tolist() == [800.0, 800.0]
    with pytest.raises(ValueError):
        Static(rate=0.0)


def test_no_limit_is_far_above_the_reference() -> None:
    assert NoLimit().act(observe([100.0], [1000.0])).tolist() == [1e7]


def test_threshold_ladder_steps_by_utilisation() -> None:
    # utilisation 0.9, 0.6, 0.3, unknown -> top, middle, bottom, bottom step; top = reference (1000)
    obs = observe([100.0] * 4, [1000.0] * 4, admitted=[900.0, 600.0, 300.0, NAN])
    assert Threshold().act(obs).tolist() == [1000.0, 750.0, 500.0, 500.0]
    assert Threshold(scale=1.0).act(obs).tolist() == [2000.0, 1500.0, 1000.0, 1000.0]


def test_aimd_decreases_on_breach_increases_when_used_holds_otherwise() -> None:
    # tier 0: p99 over the SLO -> x0.75; tier 1: errors over budget -> x0.75; tier 2: healthy and used
    # -> +0.05 x reference; tier 3: healthy, rate barely used -> hold; tier 4: metrics missing -> hold
    obs = observe(
        [250.0, 100.0, 100.0, 100.0, NAN], [800.0] * 5, admitted=[800.0, 800.0, 600.0, 100.0, 800.0],
        errors=[0.0, 0.05, 0.0, 0.0, 0.0],
    )  # fmt: skip
    assert AIMD().act(obs).tolist() == [600.0, 600.0, 850.0, 800.0, 800.0]


def test_aimd_is_clamped_to_its_factors_of_the_reference() -> None:
    obs = observe([500.0, 100.0], [10.0, 10_000.0])
    assert AIMD().act(obs).tolist() == [10.0, 10_000.0]  # 7.5 -> min 0.01 x 1000; 10050 -> max 10 x 1000


def test_gradient_first_interval_and_after_latency_rises() -> None:
    policy = Gradient()
    first = policy.act(observe([100.0], [1000.0]))
    # long = short = 100: gradient = min(1.5, 1) = 1; new = 1000 + 0.1 x 1000; smoothed halfway -> 1050
    assert first.tolist() == pytest.approx([1050.0])
    second = policy.act(observe([400.0], [1050.0]))
    # long = 100 + (2/21)(400 - 100) = 128.571...; gradient = 1.5 x 128.571 / 400 = 0.48214 -> 0.5
    # new = 1050 x 0.5 + 105 = 630; smoothed: 525 + 315 = 840
    assert second.tolist() == pytest.approx([840.0])
    assert policy.long_p99 is not None and policy.long_p99[0] == pytest.approx(100 + 300 * 2 / 21)


def test_gradient_does_not_grow_an_unused_rate_and_halves_on_errors() -> None:
    obs = observe([100.0, 100.0], [1000.0, 1000.0], admitted=[200.0, 1000.0], errors=[0.0, 0.5])
    # tier 0 app-limited: min(1050, 1000); tier 1: gradient 0.5 -> 500 + 100 -> (1000 + 600) / 2 = 800
    assert Gradient().act(obs).tolist() == pytest.approx([1000.0, 800.0])


def test_pid_moves_log_rate_by_the_latency_error() -> None:
    policy = PID()
    # setpoint 0.8 x 200 = 160 ms; p99 240 -> e = -0.5; first call: step = ki e = -0.15
    first = policy.act(observe([240.0], [1000.0], throttled=[100.0]))
    assert first.tolist() == pytest.approx([1000.0 * math.exp(-0.15)])
    # p99 80 -> e = 0.5; step = kp (0.5 + 0.5) + ki 0.5 = 0.65 (throttling, so the rate binds)
    second = policy.act(observe([80.0], [900.0], throttled=[100.0]))
    assert second.tolist() == pytest.approx([900.0 * math.exp(0.65)])


def test_pid_does_not_raise_a_rate_that_does_not_bind_and_caps_the_step() -> None:
    policy = PID()
    assert policy.act(observe([16.0], [1000.0])).tolist() == [1000.0]  # e = 0.9 but nothing throttled
    policy = PID(kp=0.0, ki=5.0)
    assert policy.act(observe([400.0], [1000.0])).tolist() == pytest.approx([500.0])  # -5 capped at -ln 2


def test_stateful_baselines_hold_the_rate_when_metrics_are_missing() -> None:
    obs = observe([NAN], [700.0])
    for policy in (AIMD(), Gradient(), PID()):
        assert policy.act(obs).tolist() == [700.0], policy.name


def test_oracle_sets_the_simulators_capacity_and_refuses_without_it() -> None:
    assert Oracle().act(observe([100.0], [1.0], capacity=[812.5])).tolist() == [812.5]
    assert Oracle(margin=0.9).act(observe([100.0], [1.0], capacity=[1000.0])).tolist() == [900.0]
    with pytest.raises(ValueError, match="capacity_tokens"):
        Oracle().act(observe([100.0], [1.0]))


def test_late_oracle_sets_the_oracles_rate_of_the_previous_interval() -> None:
    late = LateOracle()
    rates = [late.act(observe([100.0], [1.0], capacity=[c])).tolist() for c in (800.0, 400.0, 600.0)]
    assert rates == [[800.0], [800.0], [400.0]]
    late.reset()
    assert late.act(observe([100.0], [1.0], capacity=[300.0])).tolist() == [300.0]


def test_reset_forgets_state() -> None:
    policy = PID()
    policy.act(observe([240.0], [1000.0], throttled=[1.0]))
    policy.reset()
    assert policy.e_prev is None
    gradient = Gradient()
    gradient.act(observe([100.0], [1000.0]))
    gradient.reset()
    assert gradient.long_p99 is None


def test_registry_makes_every_baseline_by_name_with_params() -> None:
    for name in ("static", "none", "threshold", "aimd", "gradient", "pid", "oracle", "oracle_late"):
        assert isinstance(make_policy(name), Policy)
    assert make_policy("static", factor=0.5).act(observe([1.0], [1.0])).tolist() == [500.0]
    with pytest.raises(UnknownPolicyError, match="available: static"):
        make_policy("nope")


def test_registering_a_policy_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(POLICIES, "half", lambda: Static(factor=0.5))
    assert make_policy("half").act(observe([1.0], [1.0])).tolist() == [500.0]
    monkeypatch.delitem(POLICIES, "half")
    register_policy("double", lambda: Static(factor=2.0))
    try:
        assert make_policy("double").act(observe([1.0], [1.0])).tolist() == [2000.0]
    finally:
        POLICIES.pop("double")
