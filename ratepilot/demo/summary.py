"""Turn a load generator's record into the comparison metrics and per-second series (pure numpy).

Client-side definitions (what the callers of the API experienced):

* goodput_rps: requests answered 2xx within the latency SLO, per second of the run;
* p99_latency_ms: p99 latency of the admitted requests (not throttled), from the scheduled send time;
* throttle_frac: share of requests answered 429; error_frac: share that got a 5xx, another 4xx or no answer;
* slo_violation_frac: share of control intervals whose p99 exceeded the SLO or whose error share
  exceeded the error budget;
* upper_bound_rps: mean over the run's seconds of min(scheduled demand, backend capacity), the most
  any limiter could have served within SLO (the simulator's `goodput_ratio` bound, `training.metrics`);
* goodput_ratio: goodput_rps / upper_bound_rps, so the real loop and `ratepilot evaluate` are
  compared on the same measure (NaN when the bound is unknown or zero);
* recovery_s: after the schedule's largest capacity cut (`capacity_cut`), seconds until the rate in
  force (all tiers, sampled once a second) is back at RECOVERY_SHARE of the new capacity, having
  dipped below it (0 when it never dipped; NaN without a cut, when it is not back before the
  capacity changes again or the run ends, and for the static limiter, whose rate never moves).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ratepilot.demo.loadgen import RunRecord

THROTTLED = 429
RECOVERY_SHARE = 0.9  # recovered: the rate in force is back at this share of the capacity after the cut
MIN_CUT = 0.1  # a capacity drop of at least this share in one second counts as a cut
INTERVAL_S = 5  # the controller's tick, the unit of slo_violation_frac


@dataclass(frozen=True)
class RunSummary:
    """The metrics of one run, as written to --json."""

    goodput_rps: float
    p99_latency_ms: float
    throttle_frac: float
    error_frac: float
    slo_violation_frac: float
    requests: int
    duration_s: float
    generator_lag_p99_ms: float
    upper_bound_rps: float
    goodput_ratio: float
    recovery_s: float = math.nan

    def to_dict(self) -> dict[str, float | None]:
        """Plain floats and ints for JSON (NaN, which JSON lacks, as null)."""
        out: dict[str, float | None] = {}
        for key, value in asdict(self).items():
            out[key] = (None if math.isnan(value) else round(value, 6)) if isinstance(value, float) else value
        return out


def upper_bound_rps(demand_rps: np.ndarray, capacity_rps: np.ndarray) -> float:
    """Mean of min(demand, capacity) over the seconds of a schedule, in requests/s."""
    demand, capacity = np.asarray(demand_rps, dtype=float), np.asarray(capacity_rps, dtype=float)
    if demand.shape != capacity.shape or demand.size == 0:
        raise ValueError(f"demand and capacity must be non-empty and of one length, got {demand.shape} and {capacity.shape}")
    if not (np.all(np.isfinite(demand)) and np.all(np.isfinite(capacity))) or demand.min() < 0 or capacity.min() < 0:
        raise ValueError("demand and capacity must be finite and >= 0")
    return float(np.minimum(demand, capacity).mean())


def capacity_cut(capacity_rps: np.ndarray) -> tuple[int, int] | None:
    """(first second, end second) of the phase after the largest one-second capacity drop of >= MIN_CUT; None without one."""
    capacity = np.asarray(capacity_rps, dtype=float)
    if capacity.size < 2:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = 1.0 - capacity[1:] / capacity[:-1]
    drop = np.where(np.isfinite(drop), drop, 0.0)
    if drop.max() < MIN_CUT:
        return None
    start = int(np.argmax(drop)) + 1
    changes = np.flatnonzero(capacity[start + 1 :] != capacity[start])
    end = start + 1 + int(changes[0]) if changes.size else int(capacity.size)
    return start, end


def recovery_seconds(seconds: np.ndarray, rate: np.ndarray, capacity_rps: np.ndarray, share: float = RECOVERY_SHARE) -> float:
    """Seconds from the largest capacity cut until the rate in force is back at `share` of the new capacity (module docstring).

    `seconds` and `rate` are the run's samples (the second of the schedule each was taken in, the rate then).
    """
    cut = capacity_cut(capacity_rps)
    if cut is None:
        return math.nan
    start, end = cut
    target = share * float(np.asarray(capacity_rps, dtype=float)[start])
    seconds, rate = np.asarray(seconds, dtype=float), np.asarray(rate, dtype=float)
    phase = (seconds >= start) & (seconds < end) & np.isfinite(rate)
    t, r = seconds[phase], rate[phase]
    below = np.flatnonzero(r < target)
    if below.size == 0:
        return 0.0 if t.size else math.nan
    back = np.flatnonzero(r[below[0] :] >= target)
    return float(t[below[0] + back[0]] - start) if back.size else math.nan


def outcome_masks(status: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ok, throttled, error) masks of completed requests."""
    done = status >= 0
    ok = done & (status >= 200) & (status < 300)
    throttled = status == THROTTLED
    return ok, throttled, done & ~ok & ~throttled


def _p99_ms(latency_s: np.ndarray) -> float:
    return float(np.percentile(latency_s, 99) * 1000) if latency_s.size else float("nan")


def summarize(
    record: RunRecord, duration_s: float, slo_ms: float, error_budget: float, upper_bound: float = float("nan"),
    recovery_s: float = math.nan,
) -> RunSummary:  # fmt: skip
    """The comparison metrics of one run; `upper_bound` is the schedule's `upper_bound_rps`, `recovery_s` its `recovery_seconds` (NaN: unknown)."""
    if not duration_s > 0:
        raise ValueError("duration_s must be positive")
    if upper_bound < 0:
        raise ValueError(f"upper_bound must be >= 0, got {upper_bound}")
    n = record.offsets_s.size
    ok, throttled, error = outcome_masks(record.status)
    never_answered = record.status < 0  # still in flight when the run ended: counts as an error
    error = error | never_answered
    latency = np.where(never_answered, np.inf, record.latency_s)
    admitted = ~throttled
    good = ok & (latency * 1000 <= slo_ms)
    intervals = np.floor(record.offsets_s / INTERVAL_S).astype(int)
    violations = 0
    n_intervals = max(1, int(np.ceil(duration_s / INTERVAL_S)))
    for k in range(n_intervals):
        in_k = intervals == k
        sent = int(in_k.sum())
        if sent == 0:
            continue
        p99 = _p99_ms(latency[in_k & admitted])
        if (p99 > slo_ms) or (error[in_k].sum() / sent > error_budget):
            violations += 1
    lag = record.lag_s[np.isfinite(record.lag_s)]
    goodput_rps = float(good.sum() / duration_s)
    return RunSummary(
        goodput_rps=goodput_rps,
        p99_latency_ms=_p99_ms(latency[admitted]),
        throttle_frac=float(throttled.sum() / n) if n else 0.0,
        error_frac=float(error.sum() / n) if n else 0.0,
        slo_violation_frac=violations / n_intervals,
        requests=n,
        duration_s=float(duration_s),
        generator_lag_p99_ms=_p99_ms(lag),
        upper_bound_rps=float(upper_bound),
        goodput_ratio=goodput_rps / upper_bound if upper_bound > 0 else float("nan"),
        recovery_s=float(recovery_s),
    )


@dataclass(frozen=True)
class SecondSeries:
    """Per-second client-side series of a run, by scheduled send second (for the plot)."""

    sent: np.ndarray
    ok: np.ndarray
    good: np.ndarray
    throttled: np.ndarray
    errors: np.ndarray
    p50_ms: np.ndarray
    p99_ms: np.ndarray


def per_second(record: RunRecord, seconds: int, slo_ms: float) -> SecondSeries:
    """Counts per scheduled second and the p50/p99 latency of the admitted requests of each second."""
    ok, throttled, error = outcome_masks(record.status)
    error = error | (record.status < 0)
    second = np.clip(record.offsets_s.astype(int), 0, max(seconds - 1, 0))

    def count(mask: np.ndarray) -> np.ndarray:
        return np.bincount(second[mask], minlength=seconds)[:seconds].astype(float)

    latency = np.where(record.status < 0, np.inf, record.latency_s)
    p50, p99 = np.full(seconds, np.nan), np.full(seconds, np.nan)
    admitted = ~throttled
    order = np.argsort(second, kind="stable")
    bounds = np.searchsorted(second[order], np.arange(seconds + 1))
    for s in range(seconds):
        idx = order[bounds[s] : bounds[s + 1]]
        idx = idx[admitted[idx]]
        if idx.size:
            p50[s], p99[s] = np.minimum(np.percentile(latency[idx], [50, 99]) * 1000, 1e9)
    return SecondSeries(
        sent=count(np.ones_like(ok)),
        ok=count(ok),
        good=count(ok & (latency * 1000 <= slo_ms)),
        throttled=count(throttled),
        errors=count(error),
        p50_ms=p50,
        p99_ms=p99,
    )


def window_stats(record: RunRecord, now_s: float, window_s: float = 2.0) -> dict[str, float]:
    """Rates and p99 over the requests scheduled in the last completed `window_s` seconds (live view)."""
    lo, hi = now_s - window_s - 1.0, now_s - 1.0  # give requests a second to finish
    sel = (record.offsets_s >= lo) & (record.offsets_s < hi)
    status = record.status[sel]
    ok, throttled, error = outcome_masks(status)
    admitted_latency = record.latency_s[sel][~throttled & (status >= 0)]
    return {
        "sent_rps": float(sel.sum() / window_s),
        "ok_rps": float(ok.sum() / window_s),
        "throttled_rps": float(throttled.sum() / window_s),
        "error_rps": float(error.sum() / window_s),
        "p99_ms": _p99_ms(admitted_latency),
    }
