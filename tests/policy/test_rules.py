"""Each safety rule on its own: exact next rates and exactly which tiers it fired for."""

from __future__ import annotations

import numpy as np

from limiter.bucket import MAX_RATE
from policy import safety

NAN = np.nan


def a(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def test_policy_error_keeps_rate_in_force_when_no_proposal() -> None:
    rates, fired = safety.keep_on_policy_error(None, a(10, 20))
    assert rates.tolist() == [10, 20]
    assert fired.tolist() == [True, True]


def test_policy_error_fires_on_wrong_shape_and_not_on_right_one() -> None:
    rates, fired = safety.keep_on_policy_error(a(1, 2, 3), a(10, 20))
    assert rates.tolist() == [10, 20] and fired.all()
    rates, fired = safety.keep_on_policy_error(a(1, 2), a(10, 20))
    assert rates.tolist() == [1, 2] and not fired.any()


def test_non_finite_proposals_keep_rate_in_force() -> None:
    rates, fired = safety.keep_non_finite(a(NAN, np.inf, -np.inf, 7), a(1, 2, 3, 4))
    assert rates.tolist() == [1, 2, 3, 7]
    assert fired.tolist() == [True, True, True, False]


def test_step_limit_up_and_down_separately() -> None:
    rates, fired = safety.limit_step(a(400, 10, 120, 50), a(100, 100, 100, 100), a(1.5), a(0.5))
    assert rates.tolist() == [150, 50, 120, 50]
    assert fired.tolist() == [True, True, False, False]


def test_stale_holds_then_decays_toward_static() -> None:
    rates, hold, decay = safety.hold_or_decay_when_stale(
        proposed=a(999, 999, 999, 999),
        in_force=a(100, 100, 100, 20),
        static=a(50, 50, 50, 50),
        stale_ticks=np.array([0, 2, 3, 4]),
        hold_ticks=3,
        decay=0.25,
    )
    assert rates.tolist() == [999, 100, 100, 20 + (50 - 20) * 0.25]
    assert hold.tolist() == [False, True, True, False]
    assert decay.tolist() == [False, False, False, True]


def test_brake_on_latency_or_errors_regardless_of_proposal() -> None:
    rates, fired = safety.brake(
        proposed=a(500, 500, 30, 500, 500),
        in_force=a(100, 100, 100, 100, 100),
        p99_over_slo=a(3.5, 1.0, 4.0, NAN, 2.9),
        error_rate=a(0.0, 0.25, 0.0, NAN, 0.2),
        p99_limit=3.0,
        error_limit=0.2,
        ratio=0.5,
    )
    # the brake never raises a rate the policy already cut deeper
    assert rates.tolist() == [50, 50, 30, 500, 500]
    assert fired.tolist() == [True, True, True, False, False]


def test_brake_holds_a_cut_already_in_force_instead_of_cutting_again() -> None:
    # the interval after a cut still carries the backlog of the rate before it: the brake caps the rate at
    # ratio x the rate that loaded the backend (the larger of the rate in force and the one before it)
    rates, fired = safety.brake(
        proposed=a(80, 80, 20, 500),
        in_force=a(50, 100, 50, 30),
        p99_over_slo=a(5.0, 5.0, 5.0, 5.0),
        error_rate=a(0.0, 0.0, 0.0, 0.0),
        p99_limit=3.0,
        error_limit=0.2,
        ratio=0.5,
        previous_in_force=a(100, 100, 100, NAN),
    )
    # halved last tick: held at 50, not cut to 25; no cut last tick: cut to 50; the policy's deeper cut
    # stands; no rate before (NaN): the rate in force is the reference
    assert rates.tolist() == [50, 50, 20, 15]
    assert fired.tolist() == [True, True, True, True]


def test_clamp_between_with_missing_bounds() -> None:
    rates, fired = safety.clamp_between(a(1, 50, 900, 900), a(5, 5, 5, NAN), a(100, 100, 100, NAN))
    assert rates.tolist() == [5, 50, 100, 900]
    assert fired.tolist() == [True, False, True, False]


def test_pin_replaces_and_reports_only_real_changes() -> None:
    rates, fired = safety.pin(a(10, 20, 30), a(NAN, 25, 30))
    assert rates.tolist() == [10, 25, 30]
    assert fired.tolist() == [False, True, False]


def test_guard_never_lets_zero_negative_nan_or_unlimited_through() -> None:
    rates, fired = safety.guard(a(0, -3, NAN, np.inf, MAX_RATE * 2, 42), a(7, 7, 7, 7, 7, 7))
    assert rates.tolist() == [7, 7, 7, 7, 7, 42]
    assert fired.tolist() == [True, True, True, True, True, False]
