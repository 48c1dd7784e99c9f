"""Evaluation metrics from the per-interval truth the simulator reports (the README's Evaluation section shows them).

Every function takes `info` arrays stacked over an episode, shape (T, N): T intervals, N worlds.

- `goodput_ratio`: goodput within the SLO / sum(min(demand, capacity) dt), in tokens (a heavy request
  counts its cost, so the ratio is unit-free; with only light requests it is requests). Retried
  requests that succeed count as goodput, so a ratio can exceed 1 slightly.
- `slo_violation_frac`: share of intervals whose true p99 exceeded the SLO or whose error rate
  exceeded the error budget.
- `p99_latency_ms`: mean over intervals (with traffic) of the interval's true p99.
- `throttle_frac`: throttled / asked tokens (retries included, they are asks too).
- `error_frac`: errored / finished requests.
- `rate_tracking_error`: mean of |rate - optimal| / optimal over intervals whose demand exceeded the
  capacity (the oracle's rate is the optimum); NaN when no interval was overloaded.
"""

from __future__ import annotations

import math

import numpy as np

METRICS = ("goodput_ratio", "slo_violation_frac", "p99_latency_ms", "throttle_frac", "error_frac", "rate_tracking_error")
HIGHER_IS_BETTER = {"goodput_ratio": True, "mean_reward": True}


def episode_metrics(info: dict[str, np.ndarray], reward: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-world metrics, each an (N,) array, from (T, N) per-interval arrays."""
    with np.errstate(invalid="ignore", divide="ignore"):
        goodput = info["goodput_tokens"].sum(axis=0) / np.maximum(info["bound_tokens"].sum(axis=0), 1e-9)
        asked = info["admitted_tokens"].sum(axis=0) + info["throttled_tokens"].sum(axis=0)
        throttle = np.where(asked > 0, info["throttled_tokens"].sum(axis=0) / asked, 0.0)
        finished = info["finished"].sum(axis=0)
        errors = np.where(finished > 0, info["errors"].sum(axis=0) / finished, 0.0)
        overloaded = info["demand_tokens"] > info["capacity_tokens"]
        tracking = np.abs(info["rate"] - info["optimal_rate"]) / info["optimal_rate"]
        count = overloaded.sum(axis=0)
        rate_error = np.where(count > 0, np.where(overloaded, tracking, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)
        p99 = np.nanmean(np.where(info["finished"] > 0, info["p99_ms"], np.nan), axis=0)
    out = {
        "goodput_ratio": goodput,
        "slo_violation_frac": info["slo_violated"].astype(np.float64).mean(axis=0),
        "p99_latency_ms": p99,
        "throttle_frac": throttle,
        "error_frac": errors,
        "rate_tracking_error": rate_error,
    }
    if reward is not None:
        out["mean_reward"] = reward.mean(axis=0)
    return out


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of metric dicts, ignoring NaN (NaN when every value is NaN)."""
    keys = list(rows[0]) if rows else list(METRICS)
    out = {}
    for key in keys:
        values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        out[key] = float(np.mean(values)) if values else math.nan
    return out


def to_json_safe(metrics: dict[str, float]) -> dict[str, float | None]:
    """NaN -> None (JSON has no NaN), floats rounded to 6 digits."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else round(float(v), 6)) for k, v in metrics.items()}
