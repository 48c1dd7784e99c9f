"""The action encoding of policy.base: asymmetric bounds (a cut up to 4x, a raise up to 2x) and an exact inverse."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from policy.base import ACTION_MAX_DOWN, ACTION_MAX_UP, MIN_RATE, action_to_rate, rate_to_action


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
