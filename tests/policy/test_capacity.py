"""The online capacity estimate: one test per rule of policy/capacity.py's table, with the exact next values."""

from __future__ import annotations

import numpy as np

from policy.capacity import JUMP, MAX_AGE, SMOOTHING, CapacityEstimate, instant_capacity, update

CALM = np.array([False])  # p99 within the SLO


def known(capacity: float, age: float = 0.0) -> CapacityEstimate:
    return CapacityEstimate(np.array([np.log(capacity)]), np.array([age]))


def test_instant_capacity_is_admitted_over_cpu_only_where_the_backend_is_not_saturated() -> None:
    admitted = np.array([100.0, 100.0, 100.0, 100.0, 0.0, np.nan])
    cpu = np.array([0.5, 0.29, 0.97, 0.96, 0.5, 0.5])
    expected = [200.0, np.nan, np.nan, 100.0 / 0.96, np.nan, np.nan]
    np.testing.assert_array_equal(instant_capacity(admitted, cpu), expected)


def test_nothing_to_learn_from_keeps_the_estimate_and_ages_it() -> None:
    for admitted, cpu in ((np.nan, 0.5), (100.0, 0.29), (0.0, 0.5), (100.0, np.nan)):
        after = update(known(300.0, age=2), np.array([admitted]), np.array([cpu]), CALM)
        assert after.log_capacity[0] == np.log(300.0) and after.age[0] == 3


def test_a_saturated_backend_holds_the_estimate_and_the_age_is_capped() -> None:
    after = update(known(300.0, age=MAX_AGE), np.array([500.0]), np.array([0.97]), CALM)
    assert after.log_capacity[0] == np.log(300.0) and after.age[0] == MAX_AGE


def test_the_first_reading_is_taken_as_it_is() -> None:
    after = update(CapacityEstimate.unknown(2), np.array([100.0, 100.0]), np.array([0.4, 0.98]), np.array([False, False]))
    assert after.log_capacity[0] == np.log(250.0) and np.isnan(after.log_capacity[1])
    assert after.age.tolist() == [0.0, MAX_AGE]


def test_a_change_beyond_the_noise_band_is_adopted_at_once() -> None:
    down = update(known(400.0, age=3), np.array([100.0]), np.array([0.5]), CALM)  # 200: ln 2 away, > JUMP
    assert down.log_capacity[0] == np.log(200.0) and down.age[0] == 0
    up = update(known(200.0), np.array([150.0]), np.array([0.5]), CALM)  # 300
    assert up.log_capacity[0] == np.log(300.0)


def test_noise_within_the_band_is_averaged_in_log_space() -> None:
    reading = 200.0 * np.exp(0.5 * JUMP)  # inside the band
    after = update(known(200.0), np.array([reading * 0.5]), np.array([0.5]), CALM)
    assert np.isclose(after.log_capacity[0], np.log(200.0) + SMOOTHING * 0.5 * JUMP)
    assert after.age[0] == 0


def test_over_the_slo_a_reading_can_only_lower_the_estimate() -> None:
    """A queue may be building: admitted / cpu is then at most an upper bound of the capacity."""
    over = np.array([True])
    higher = update(known(200.0, age=2), np.array([150.0]), np.array([0.5]), over)  # reads 300
    assert higher.log_capacity[0] == np.log(200.0) and higher.age[0] == 0
    lower = update(known(200.0), np.array([60.0]), np.array([0.5]), over)  # reads 120
    assert lower.log_capacity[0] == np.log(120.0)
    first = update(CapacityEstimate.unknown(1), np.array([150.0]), np.array([0.5]), over)
    assert first.log_capacity[0] == np.log(300.0)  # with nothing known, an upper bound is the best there is
