"""Online capacity estimate per tier, from the admitted work and the backend's CPU (pure numpy, no I/O).

The backend's CPU utilisation is served work / capacity, so while the backend is not saturated
(no queue building) the admitted work divided by the CPU is the capacity itself, one interval after
any change: `instant = admitted_tokens_per_s / cpu`. A backend run at its latency SLO works at
90-97 % CPU, so readings are taken up to CPU_SATURATED; when the p99 is over the SLO a queue may be
building (admitted > served), so the reading is only an upper bound. Per tier:

| case (this interval)                                       | estimate becomes                       | age      |
|------------------------------------------------------------|----------------------------------------|----------|
| metrics missing, or CPU < CPU_FLOOR, or nothing admitted   | unchanged (nothing to learn from)      | + 1      |
| CPU >= CPU_SATURATED (a queue may be building or draining) | unchanged (the ratio is biased)        | + 1      |
| no estimate yet                                            | instant                                | 0        |
| p99 over the SLO (overloaded: instant is an upper bound)   | min(estimate, instant)                 | 0        |
| ln(instant / estimate) beyond +-JUMP (the backend changed) | instant (jump: follow within one tick) | 0        |
| otherwise (measurement noise)                              | ln-space average, weight SMOOTHING     | 0        |

`age` counts the intervals since the estimate was last refreshed (capped at MAX_AGE); with no
estimate yet it is MAX_AGE. With several tiers behind one backend (one CPU figure for all), a
tier's estimate is the capacity its share of the current mix gets.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

CPU_FLOOR = 0.3  # below this the ratio is mostly noise (CPU figures carry additive noise of a few points)
CPU_SATURATED = 0.97  # at or above this the backend may be queueing: admitted / cpu is no longer the capacity
JUMP = 0.2  # ln-ratio beyond which a new reading replaces the estimate (a change, not noise)
SMOOTHING = 0.5  # weight of a new reading within the noise band
MAX_AGE = 6  # intervals: age is capped here (30 s at 5 s ticks)


class CapacityEstimate(NamedTuple):
    """Per tier: ln of the estimated capacity (tokens/s; NaN before the first reading) and its age in intervals."""

    log_capacity: np.ndarray
    age: np.ndarray

    @classmethod
    def unknown(cls, n_tiers: int) -> CapacityEstimate:
        """No reading yet."""
        return cls(np.full(n_tiers, np.nan), np.full(n_tiers, float(MAX_AGE)))


def instant_capacity(admitted_tokens_per_s: np.ndarray, cpu: np.ndarray) -> np.ndarray:
    """admitted / cpu where that is the capacity (CPU_FLOOR <= cpu < CPU_SATURATED, something admitted), else NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = admitted_tokens_per_s / cpu
    usable = np.isfinite(ratio) & (cpu >= CPU_FLOOR) & (cpu < CPU_SATURATED) & (admitted_tokens_per_s > 0)
    return np.where(usable, ratio, np.nan)


def update(
    estimate: CapacityEstimate, admitted_tokens_per_s: np.ndarray, cpu: np.ndarray, over_slo: np.ndarray
) -> CapacityEstimate:
    """The estimate after one interval's metrics (the rules of the module docstring); `over_slo`: p99 > SLO."""
    instant = instant_capacity(admitted_tokens_per_s, cpu)
    fresh = np.isfinite(instant)
    with np.errstate(divide="ignore", invalid="ignore"):
        reading = np.log(instant)
    known = np.isfinite(estimate.log_capacity)
    change = reading - estimate.log_capacity
    smoothed = estimate.log_capacity + SMOOTHING * change
    adopt = fresh & (~known | (np.abs(change) > JUMP))
    log_capacity = np.where(adopt, reading, np.where(fresh, smoothed, estimate.log_capacity))
    capped = fresh & known & over_slo
    log_capacity = np.where(capped, np.minimum(estimate.log_capacity, reading), log_capacity)
    age = np.where(fresh, 0.0, np.minimum(estimate.age + 1.0, MAX_AGE))
    return CapacityEstimate(log_capacity, age)
