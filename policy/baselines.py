"""Classical rate controllers, the yardsticks the learned policy must beat.

Each baseline is one small class: `act(observation) -> rates` (tokens/s, one per tier; a batch of
simulated worlds is just many tiers). Rates are relative to each tier's reference rate (the
operator's static rate), so one parameter set serves tiers of any size. The feedback controllers
(AIMD, Gradient, PID) share `ClampedPolicy`, which holds a tier's current rate when the interval's
metrics are missing (NaN), the safe thing to do (the safety engine decides what happens after
that), and clamps every new rate to [`min_factor`, `max_factor`] x reference; each writes only
its update.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from limiter.bucket import MAX_RATE
from policy.base import MIN_RATE, Policy
from policy.observation import Observation


def _missing(obs: Observation) -> np.ndarray:
    """Tiers whose latency, error rate or admitted rate is missing this interval."""
    m = obs.metrics
    return ~(np.isfinite(m.p99_latency_ms) & np.isfinite(m.error_rate) & np.isfinite(m.admitted_rps))


def _current_rate(obs: Observation) -> np.ndarray:
    """The rate in force, or the reference rate where it is unknown."""
    rate = np.asarray(obs.metrics.rate, dtype=np.float64)
    return np.where(np.isfinite(rate) & (rate > 0), rate, obs.reference_rate)


class Static(Policy):
    """A fixed rate: `rate` tokens/s if given, else `factor` x the reference rate (the seeds' default)."""

    name: ClassVar[str] = "static"

    def __init__(self, rate: float | None = None, factor: float = 1.0) -> None:
        if rate is not None and not (np.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be finite and positive, got {rate!r}")
        if not (np.isfinite(factor) and factor > 0):
            raise ValueError(f"factor must be finite and positive, got {factor!r}")
        self.rate, self.factor = rate, factor

    def act(self, observation: Observation) -> np.ndarray:
        """The same rate every interval."""
        if self.rate is not None:
            return np.full(observation.n_tiers, float(self.rate))
        return observation.reference_rate * self.factor


class NoLimit(Policy):
    """No limiter at all: a rate `factor` x the reference, far above anything the backend can serve."""

    name: ClassVar[str] = "none"

    def __init__(self, factor: float = 1e4) -> None:
        self.factor = factor

    def act(self, observation: Observation) -> np.ndarray:
        """A huge rate."""
        return np.minimum(observation.reference_rate * self.factor, MAX_RATE)


class Threshold(Policy):
    """The seeds' controller: a rate ladder stepped by bucket utilisation (admitted / rate).

    Utilisation > 80 % -> 2000, > 50 % -> 1500, else 1000 tokens/s (the seeds' premium tier; the free
    tier was 1000/750/500, the same ladder halved), scaled so that the top step is the reference
    rate unless `scale` is given. Source: the project's seed controller (a threshold table).
    """

    name: ClassVar[str] = "threshold"

    def __init__(
        self,
        levels: tuple[float, float, float] = (2000.0, 1500.0, 1000.0),
        thresholds: tuple[float, float] = (0.8, 0.5),
        scale: float | None = None,
    ) -> None:
        self.levels = np.asarray(levels, dtype=np.float64)
        self.thresholds = thresholds
        self.scale = scale

    def act(self, observation: Observation) -> np.ndarray:
        """The ladder step for this interval's utilisation (the lowest step when it is unknown)."""
        m = observation.metrics
        with np.errstate(invalid="ignore", divide="ignore"):
            utilisation = np.nan_to_num(m.admitted_rps / _current_rate(observation), nan=0.0)
        step = np.where(utilisation > self.thresholds[0], 0, np.where(utilisation > self.thresholds[1], 1, 2))
        scale = observation.reference_rate / self.levels[0] if self.scale is None else self.scale
        return self.levels[step] * scale


@dataclass(kw_only=True, eq=False)
class ClampedPolicy(Policy):
    """A feedback controller on the rate in force: hold where metrics are missing, clamp to the bounds.

    As Netflix concurrency-limits' `AbstractLimit` does for its limits: `act` reads the rate in
    force (the reference where it is unknown), asks `update` for the next rate, keeps the current
    rate on tiers whose latency, error rate or admitted rate is missing, and clips the result to
    [`min_factor`, `max_factor`] x reference. Parameters are keyword-only dataclass fields.
    """

    min_factor: float = 0.01  # the lowest rate, x reference
    max_factor: float = 10.0  # the highest rate, x reference

    @abstractmethod
    def update(self, observation: Observation, rate: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """The next rate per tier from the rate in force (`missing` tiers are held whatever this says)."""

    def act(self, observation: Observation) -> np.ndarray:
        """The next rate, held where metrics are missing and clamped to the bounds."""
        rate = _current_rate(observation)
        missing = _missing(observation)
        new = np.where(missing, rate, self.update(observation, rate, missing))
        ref = observation.reference_rate
        return np.clip(new, self.min_factor * ref, self.max_factor * ref)


@dataclass(kw_only=True, eq=False)
class AIMD(ClampedPolicy):
    """Additive increase, multiplicative decrease on the rate.

    Source: TCP congestion avoidance (Jacobson 1988) as Netflix concurrency-limits' `AIMDLimit`
    applies it: on a breach (p99 above `latency_threshold` x SLO, or error rate above
    `error_budget`) rate *= `decrease`; otherwise, if the rate is being used (admitted / rate >=
    `used_share`), rate += `increase` x reference; otherwise hold. Clamped to
    [`min_factor`, `max_factor`] x reference.
    """

    name: ClassVar[str] = "aimd"
    increase: float = 0.05  # added per interval while the rate is used, x reference
    decrease: float = 0.75  # the rate is multiplied by this on a breach
    latency_threshold: float = 1.0  # a breach: p99 above this x SLO ...
    error_budget: float = 0.01  # ... or an error rate above this
    used_share: float = 0.5  # the rate counts as used when admitted / rate >= this

    def update(self, observation: Observation, rate: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """Decrease on a breach, increase while the rate is used, else hold."""
        m = observation.metrics
        breach = (m.p99_latency_ms > self.latency_threshold * observation.slo_ms) | (m.error_rate > self.error_budget)
        used = m.admitted_rps >= self.used_share * rate
        return np.where(breach, rate * self.decrease, np.where(used, rate + self.increase * observation.reference_rate, rate))


@dataclass(kw_only=True, eq=False)
class Gradient(ClampedPolicy):
    """Netflix concurrency-limits' Gradient2 applied to the rate.

    Source: `Gradient2Limit` (github.com/Netflix/concurrency-limits). The long-term latency is an
    exponential average of p99 over `long_window` intervals; gradient = clip(tolerance x long / p99,
    0.5, 1); new = rate x gradient + headroom x rate; rate = rate x (1 - smoothing) + new x
    smoothing. When long / p99 > 2 the long average decays (x 0.95) to recover after an overload;
    an app-limited rate (admitted < half of it) does not grow; an error rate above the budget counts
    as gradient 0.5. Clamped to [`min_factor`, `max_factor`] x reference.
    """

    name: ClassVar[str] = "gradient"
    tolerance: float = 1.5  # how far p99 may exceed the long-term average before the rate shrinks
    smoothing: float = 0.5  # share of the new rate taken per interval
    headroom: float = 0.1  # added each interval, x rate
    long_window: int = 20  # intervals of the long-term p99 average
    error_budget: float = 0.01  # an error rate above this counts as gradient 0.5
    long_p99: np.ndarray | None = field(default=None, init=False, repr=False)  # the long-term p99, ms

    def __post_init__(self) -> None:
        self.alpha = 2.0 / (self.long_window + 1)  # the exponential average's weight of a new p99

    def reset(self) -> None:
        """Forget the long-term latency."""
        self.long_p99 = None

    def update(self, observation: Observation, rate: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """Next rate from the latency gradient (the long-term average does not move on missing tiers)."""
        m = observation.metrics
        short = np.where(missing, np.nan, np.maximum(m.p99_latency_ms, 1e-3))
        if self.long_p99 is None or self.long_p99.shape != short.shape:
            self.long_p99 = np.where(missing, np.nan, short)
        long = np.where(np.isnan(self.long_p99), short, self.long_p99)
        long = np.where(missing, long, long + self.alpha * (short - long))
        with np.errstate(invalid="ignore", divide="ignore"):
            long = np.where(long / short > 2.0, long * 0.95, long)
            gradient = np.clip(self.tolerance * long / short, 0.5, 1.0)
        self.long_p99 = long
        gradient = np.where(m.error_rate > self.error_budget, 0.5, gradient)
        target = rate * gradient + self.headroom * rate
        new = rate * (1.0 - self.smoothing) + target * self.smoothing
        app_limited = m.admitted_rps < 0.5 * rate
        return np.where(app_limited, np.minimum(new, rate), new)


@dataclass(kw_only=True, eq=False)
class PID(ClampedPolicy):
    """A PID controller on p99 latency against `target` x SLO, acting on log(rate) in velocity form.

    Source: the textbook PID (Astrom & Hagglund, "PID Controllers", 1995), velocity form with
    conditional integration. e = clip((target x SLO - p99) / (target x SLO), -1, 1), e = -1 when the
    error rate is above the budget; d ln(rate) = kp (e - e_prev) + ki e + kd (e - 2 e_prev +
    e_prev2), bounded by +-ln 2; no increase while nothing is throttled (the rate does not bind).
    Clamped to [`min_factor`, `max_factor`] x reference.
    """

    name: ClassVar[str] = "pid"
    target: float = 0.8  # the set point: p99 at this x SLO
    kp: float = 0.5  # proportional gain
    ki: float = 0.3  # integral gain
    kd: float = 0.0  # derivative gain
    error_budget: float = 0.01  # an error rate above this counts as the largest error, -1
    e_prev: np.ndarray | None = field(default=None, init=False, repr=False)  # the last interval's error
    e_prev2: np.ndarray | None = field(default=None, init=False, repr=False)  # the one before

    def reset(self) -> None:
        """Forget past errors."""
        self.e_prev = self.e_prev2 = None

    def update(self, observation: Observation, rate: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """Next rate from the latency error (past errors do not move on missing tiers)."""
        m = observation.metrics
        setpoint = self.target * observation.slo_ms
        e = np.clip((setpoint - np.nan_to_num(m.p99_latency_ms)) / setpoint, -1.0, 1.0)
        e = np.where(m.error_rate > self.error_budget, -1.0, e)
        if self.e_prev is None or self.e_prev.shape != e.shape:
            self.e_prev = e.copy()
            self.e_prev2 = e.copy()
        assert self.e_prev2 is not None
        step = self.kp * (e - self.e_prev) + self.ki * e + self.kd * (e - 2 * self.e_prev + self.e_prev2)
        not_binding = ~(np.nan_to_num(m.throttled_rps) > 0)
        step = np.where(not_binding, np.minimum(step, 0.0), step)
        step = np.clip(step, -np.log(2.0), np.log(2.0))
        self.e_prev2 = np.where(missing, self.e_prev2, self.e_prev)
        self.e_prev = np.where(missing, self.e_prev, e)
        return rate * np.exp(step)


class Oracle(Policy):
    """Knows the true capacity: sets `margin` x the rate the backend serves within the SLO next interval.

    Only the simulator provides `Observation.capacity_tokens`; it is the upper reference every other
    policy is measured against (its rate defines `rate_tracking_error`).
    """

    name: ClassVar[str] = "oracle"

    def __init__(self, margin: float = 1.0) -> None:
        self.margin = margin

    def act(self, observation: Observation) -> np.ndarray:
        """The optimal rate."""
        if observation.capacity_tokens is None:
            raise ValueError("the oracle needs Observation.capacity_tokens, which only the simulator knows")
        return np.maximum(self.margin * np.asarray(observation.capacity_tokens, dtype=np.float64), MIN_RATE)


class LateOracle(Oracle):
    """The oracle one interval late: sets the rate the oracle set for the interval just observed.

    What a perfect capacity estimator could reach: interval metrics can tell where the backend was
    during the interval they describe, not where it will be during the next one, which the oracle
    knows. Its score bounds what a policy that infers capacity from the metrics can expect on the
    same worlds (its `rate_tracking_error` above 0 is the price of not seeing the future). Simulator only.
    """

    name: ClassVar[str] = "oracle_late"

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__(margin)
        self.last: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the last interval (a new episode)."""
        self.last = None

    def act(self, observation: Observation) -> np.ndarray:
        """The oracle's rate of the previous observation (of this one, at the first)."""
        now = super().act(observation)
        rates = now if self.last is None else self.last
        self.last = now
        return rates
