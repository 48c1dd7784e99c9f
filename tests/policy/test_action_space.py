"""The action encoding of policy.base: asymmetric bounds (a cut up to 4x, a raise up to 2x), an exact inverse, two anchors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.base import (
    ACTION_MAX_DOWN,
    ACTION_MAX_UP,
    ANCHORED,
    MIN_RATE,
    RELATIVE,
    action_anchor,
    action_to_rate,
    apply_action,
    rate_to_action,
)
from policy.observation import IntervalMetrics, ObservationBuilder


def test_action_bounds_cut_by_four_and_raise_by_two() -> None:
    rate = np.full(7, 100.0)
    actions = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, -3.0, 3.0])
    expected = [25.0, 50.0, 100.0, 100.0 * 2**0.5, 200.0, 25.0, 200.0]  # beyond [-1, 1] is clipped
    np.testing.assert_allclose(action_to_rate(rate, actions), expected)
    assert (ACTION_MAX_DOWN, ACTION_MAX_UP) == (4.0, 2.0)


def test_rate_to_action_saturates_outside_one_interval_and_maps_nan_to_hold() -> None:
    rate = np.full(6, 100.0)
    wanted = np.array([25.0, 10.0, 200.0, 1000.0, 100.0, np.nan])
    np.testing.assert_allclose(rate_to_action(rate, wanted), [-1.0, -1.0, 1.0, 1.0, 0.0, 0.0])


def test_nan_action_holds_and_the_rate_never_goes_below_the_floor() -> None:
    np.testing.assert_allclose(
        action_to_rate(np.array([100.0, MIN_RATE]), np.array([np.nan, -1.0])), [100.0, MIN_RATE]
    )


@given(
    st.floats(min_value=0.01, max_value=1e6),
    st.floats(min_value=-1.0, max_value=1.0),
)
def test_rate_to_action_inverts_action_to_rate(rate: float, action: float) -> None:
    new_rate = action_to_rate(np.array([rate]), np.array([action]))
    np.testing.assert_allclose(rate_to_action(np.array([rate]), new_rate), [action], atol=1e-9)


def test_anchored_space_acts_on_the_fresh_capacity_estimate_else_on_the_rate() -> None:
    builder = ObservationBuilder(slo_ms=np.array([100.0]), reference_rate=np.full(2, 100.0))
    # tier 0: 80 admitted at 50 % CPU -> estimate 160; tier 1: saturated, no estimate
    metrics = IntervalMetrics(
        p99_latency_ms=np.array([50.0, 400.0]),
        error_rate=np.zeros(2),
        cpu=np.array([0.5, 0.99]),
        admitted_rps=np.array([80.0, 100.0]),
        throttled_rps=np.zeros(2),
        rate=np.full(2, 100.0),
    )
    vector = builder.build(metrics).vector
    rate = np.full(2, 100.0)
    np.testing.assert_allclose(action_anchor(rate, vector), [160.0, 100.0])
    np.testing.assert_allclose(apply_action(ANCHORED, rate, vector, np.array([0.0, 0.0])), [160.0, 100.0])
    np.testing.assert_allclose(apply_action(ANCHORED, rate, vector, np.array([-0.5, 1.0])), [80.0, 200.0])
    np.testing.assert_allclose(apply_action(RELATIVE, rate, vector, np.array([-0.5, 1.0])), [50.0, 200.0])
    with pytest.raises(ValueError, match="unknown action space"):
        apply_action("log-multiplier:down=2,up=2", rate, vector, np.zeros(2))
