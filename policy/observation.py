"""The observation builder: one function turns interval metrics into what every policy sees.

The simulator and the controller both call `ObservationBuilder.build`, so a policy is trained on
exactly what it gets in production. All arrays have one entry per tier.

Feature vector (`Observation.vector[:, i]`, float64, schema `OBS_SCHEMA`): the table `OBS_TABLE`
below is the one definition of the columns, their meaning and bounds (`obs_table_markdown()` renders
it, e.g. into `training.env.TrafficEnv`'s docstring). Code reads a column by its constant:
`vector[:, P99_OVER_SLO]`, never by a bare number.

A missing metric (None, NaN, inf) enters the vector as 0 with `missing` = 1; the raw fields keep NaN
so that the safety engine can see it.

The builder keeps state across intervals: the last features (for the deltas) and an online capacity
estimate per tier (`policy.capacity`: admitted work / CPU while the backend is not saturated), so a
policy can tell within one or two intervals where the backend's capacity now is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from policy import capacity


class ObsColumn(NamedTuple):
    """One column of the observation vector."""

    name: str
    meaning: str  # unit / meaning
    low: float
    high: float
    values: str = ""  # how the table shows the bounds when they are a set, not an interval


OBS_TABLE = (
    ObsColumn("p99_over_slo", "reported p99 latency / latency SLO", 0, 10),
    ObsColumn("error_rate", "errored / finished requests", 0, 1),
    ObsColumn("cpu", "backend CPU utilisation (share)", 0, 2),
    ObsColumn("admitted_over_rate", "admitted tokens/s / refill rate", 0, 5),
    ObsColumn("throttled_over_rate", "throttled tokens/s / refill rate", 0, 20),
    ObsColumn("log_rate_over_ref", "ln(refill rate / reference rate)", -5, 5),
    ObsColumn("d_p99_over_slo", "change of p99_over_slo since the last interval", -10, 10),
    ObsColumn("d_error_rate", "change of error_rate", -1, 1),
    ObsColumn("d_throttled_over_rate", "change of throttled_over_rate", -20, 20),
    ObsColumn("d_log_rate", "change of log_rate_over_ref (the last action's effect)", -5, 5),
    ObsColumn("ln_capacity_over_rate", "ln(estimated capacity / refill rate); 0 before any estimate", -5, 5),
    ObsColumn("d_ln_capacity", "change of ln(estimated capacity) since the last interval", -5, 5),
    ObsColumn("capacity_age", "intervals since the estimate was refreshed / 6 (1: stale or none)", 0, 1),
    ObsColumn("missing", "1 when any metric of the interval was missing", 0, 1, "{0, 1}"),
    ObsColumn("bias", "constant 1", 1, 1, "{1}"),
)
# Column numbers, in OBS_TABLE order (tests/policy/test_observation.py checks that they agree).
(
    P99_OVER_SLO,
    ERROR_RATE,
    CPU,
    ADMITTED_OVER_RATE,
    THROTTLED_OVER_RATE,
    LOG_RATE_OVER_REF,
    D_P99_OVER_SLO,
    D_ERROR_RATE,
    D_THROTTLED_OVER_RATE,
    D_LOG_RATE,
    LN_CAPACITY_OVER_RATE,
    D_LN_CAPACITY,
    CAPACITY_AGE,
    MISSING,
    BIAS,
) = range(len(OBS_TABLE))
MEASURED = slice(P99_OVER_SLO, LOG_RATE_OVER_REF + 1)  # the columns computed from one interval's metrics
DELTA_OF = [P99_OVER_SLO, ERROR_RATE, THROTTLED_OVER_RATE, LOG_RATE_OVER_REF]  # what D_P99_OVER_SLO ... D_LOG_RATE change

OBS_FIELDS = tuple(column.name for column in OBS_TABLE)
OBS_DIM = len(OBS_FIELDS)
OBS_SCHEMA = "ratepilot-obs-v2:" + ",".join(OBS_FIELDS)  # v2: the capacity estimate columns
OBS_LOW = np.array([column.low for column in OBS_TABLE], dtype=np.float64)
OBS_HIGH = np.array([column.high for column in OBS_TABLE], dtype=np.float64)


def obs_table_markdown() -> str:
    """`OBS_TABLE` as a Markdown table (column number, name, unit / meaning, bounds)."""
    lines = ["| i  | feature               | unit / meaning                                          | bounds    |"]
    lines.append("|----|-----------------------|---------------------------------------------------------|-----------|")
    for i, column in enumerate(OBS_TABLE):
        bounds = column.values or f"[{column.low:g}, {column.high:g}]"
        lines.append(f"| {i:<2} | {column.name:<21} | {column.meaning:<55} | {bounds:<9} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class IntervalMetrics:
    """What Prometheus reports over one control interval, one entry per tier (NaN where missing)."""

    p99_latency_ms: np.ndarray
    error_rate: np.ndarray
    cpu: np.ndarray
    admitted_rps: np.ndarray  # admitted tokens/s
    throttled_rps: np.ndarray  # throttled tokens/s
    rate: np.ndarray  # the refill rate in force, tokens/s


@dataclass(frozen=True)
class Observation:
    """Raw interval metrics plus the normalised feature vector; `capacity_rps` only in simulation."""

    metrics: IntervalMetrics
    slo_ms: np.ndarray
    reference_rate: np.ndarray
    vector: np.ndarray  # shape (n_tiers, OBS_DIM)
    capacity_tokens: np.ndarray | None = None  # true capacity in tokens/s; known only to the simulator

    @property
    def n_tiers(self) -> int:
        """Number of tiers."""
        return int(self.vector.shape[0])

    @property
    def rate(self) -> np.ndarray:
        """The refill rate in force, tokens/s."""
        return self.metrics.rate


def _as_array(values: object, n: int) -> np.ndarray:
    array = np.array(values, dtype=np.float64).reshape(-1)
    if array.size == 1 and n > 1:
        array = np.repeat(array, n)
    if array.size != n:
        raise ValueError(f"expected {n} values (one per tier), got {array.size}")
    return array


@dataclass
class ObservationBuilder:
    """Builds observations interval after interval; it remembers the last features (for the deltas) and the capacity estimate."""

    slo_ms: np.ndarray
    reference_rate: np.ndarray
    _previous: np.ndarray | None = field(default=None, repr=False)
    _capacity: capacity.CapacityEstimate | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.slo_ms = np.asarray(self.slo_ms, dtype=np.float64).reshape(-1)
        self.reference_rate = np.asarray(self.reference_rate, dtype=np.float64).reshape(-1)
        if self.slo_ms.size != self.reference_rate.size and self.slo_ms.size != 1:
            raise ValueError("slo_ms needs one value or one per tier")
        if np.any(~np.isfinite(self.slo_ms)) or np.any(self.slo_ms <= 0):
            raise ValueError("slo_ms must be finite and positive")
        if np.any(~np.isfinite(self.reference_rate)) or np.any(self.reference_rate <= 0):
            raise ValueError("reference_rate must be finite and positive")
        self.slo_ms = _as_array(self.slo_ms, self.reference_rate.size)

    @property
    def n_tiers(self) -> int:
        """Number of tiers."""
        return int(self.reference_rate.size)

    def reset(self) -> None:
        """Forget the last interval and the capacity estimate (a new episode, or a restarted controller)."""
        self._previous = None
        self._capacity = None

    def build(self, metrics: IntervalMetrics, capacity_tokens: np.ndarray | None = None) -> Observation:
        """Normalise one interval's metrics into an Observation."""
        n = self.n_tiers
        m = IntervalMetrics(
            p99_latency_ms=_as_array(metrics.p99_latency_ms, n),
            error_rate=_as_array(metrics.error_rate, n),
            cpu=_as_array(metrics.cpu, n),
            admitted_rps=_as_array(metrics.admitted_rps, n),
            throttled_rps=_as_array(metrics.throttled_rps, n),
            rate=_as_array(metrics.rate, n),
        )
        raw = np.stack([m.p99_latency_ms, m.error_rate, m.cpu, m.admitted_rps, m.throttled_rps, m.rate], axis=1)
        missing = ~np.isfinite(raw).all(axis=1)
        rate = np.where(np.isfinite(m.rate) & (m.rate > 0), m.rate, self.reference_rate)
        with np.errstate(divide="ignore", invalid="ignore"):
            base = np.stack(
                [
                    m.p99_latency_ms / self.slo_ms,
                    m.error_rate,
                    m.cpu,
                    m.admitted_rps / rate,
                    m.throttled_rps / rate,
                    np.log(rate / self.reference_rate),
                ],
                axis=1,
            )
        base = np.where(np.isfinite(base), base, 0.0)
        base = np.clip(base, OBS_LOW[MEASURED], OBS_HIGH[MEASURED])
        previous = base if self._previous is None else self._previous
        deltas = base[:, DELTA_OF] - previous[:, DELTA_OF]
        self._previous = base
        estimate = self._capacity_columns(m, rate)
        vector = np.concatenate([base, deltas, estimate, missing[:, None].astype(np.float64), np.ones((n, 1))], axis=1)
        vector = np.clip(vector, OBS_LOW, OBS_HIGH)
        return Observation(m, self.slo_ms, self.reference_rate, vector, capacity_tokens)

    def _capacity_columns(self, m: IntervalMetrics, rate: np.ndarray) -> np.ndarray:
        """LN_CAPACITY_OVER_RATE, D_LN_CAPACITY, CAPACITY_AGE after folding this interval into the estimate."""
        before = capacity.CapacityEstimate.unknown(self.n_tiers) if self._capacity is None else self._capacity
        after = capacity.update(before, m.admitted_rps, m.cpu, over_slo=m.p99_latency_ms > self.slo_ms)
        self._capacity = after
        known = np.isfinite(after.log_capacity)
        over_rate = np.where(known, after.log_capacity - np.log(rate), 0.0)
        change = np.where(known & np.isfinite(before.log_capacity), after.log_capacity - before.log_capacity, 0.0)
        return np.stack([over_rate, change, after.age / capacity.MAX_AGE], axis=1)
