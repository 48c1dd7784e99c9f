"""Replay a recorded run in the simulator: its demand and its rates in force against a calibrated backend.

This is how a calibration is checked: the calibrated simulator, fed what the real run was fed
(requests/s each second, the rate in force each second, optionally the capacity each second),
predicts the run's goodput within SLO and its p99, which are compared with what the clients saw.
Nothing is noisy or lagged here (noise 0, no scrape misses) and clients do not retry: the recorded
demand already holds whatever they retried.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np

from training.calibration import Calibration
from training.latency import tail_quantile
from training.sim import ERRORS, FINISHED, GOOD_TOKENS, JOINED, START_S, THETA_S, BatchSim
from training.world import PROFILE_PER_INTERVAL, Episode, WorldParams


class ReplayResult(NamedTuple):
    """What the calibrated simulator predicts for a recorded run."""

    goodput_rps: float  # requests (cost 1) served within the SLO and without error, per second of the run
    p99_ms: float  # p99 latency of the admitted requests over the whole run
    error_frac: float  # failed / admitted requests
    seconds: int  # seconds replayed (whole 5 s intervals)


def _per_second(name: str, values: np.ndarray, seconds: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size < seconds or not np.all(np.isfinite(array[:seconds])) or np.any(array[:seconds] < 0):
        raise ValueError(f"{name} must be {seconds} finite non-negative values per second")
    return array[:seconds]


def replay(
    calibration: Calibration,
    demand_rps: np.ndarray,
    rate_tps: np.ndarray,
    capacity_tps: np.ndarray | None = None,
    burst_s: float = 1.0,
    seed: int = 0,
) -> ReplayResult:
    """Simulate a recorded run second by second (cut to whole intervals; the first one is the warm-up)."""
    seconds = (np.size(demand_rps) // PROFILE_PER_INTERVAL) * PROFILE_PER_INTERVAL
    if seconds < 2 * PROFILE_PER_INTERVAL:
        raise ValueError(f"a replay needs at least {2 * PROFILE_PER_INTERVAL} s of demand, got {np.size(demand_rps)}")
    demand = _per_second("demand_rps", demand_rps, seconds)
    rate = _per_second("rate_tps", rate_tps, seconds)
    capacity = np.full(seconds, calibration.capacity_tps) if capacity_tps is None else _per_second("capacity_tps", capacity_tps, seconds)
    rate_by_interval = np.maximum(rate.reshape(-1, PROFILE_PER_INTERVAL).mean(axis=1), 1e-3)
    params = calibration.apply(
        WorldParams(noise=0.0, p_missing=0.0, retry_p_throttled=0.0, retry_p_error=0.0, heavy_cost=1.0, burst_s=burst_s)
    )
    params = replace(params, reference_rate=float(rate_by_interval[0]))
    episode = Episode(
        "replay", seed, params, demand, np.maximum(capacity / calibration.capacity_tps, 1e-6), np.zeros(seconds)
    )
    sim = BatchSim([episode])
    sim.reset()
    rows = [sim.record[:, :, 0].copy()]
    for interval_rate in rate_by_interval[1:]:
        sim.step(np.array([interval_rate]))
        rows.append(sim.record[:, :, 0].copy())
    record = np.concatenate(rows, axis=1)  # (columns, sub-steps of the whole run)
    timeout_ms = params.timeout_s * 1000.0
    joined = record[JOINED]
    timed_out = max(float(record[FINISHED].sum() - joined.sum()), 0.0)
    starts = np.append(np.minimum(record[START_S] * 1000.0, timeout_ms), timeout_ms)[None, :]
    thetas = np.append(record[THETA_S] * 1000.0, 0.0)[None, :]
    weights = np.append(joined, timed_out)[None, :]
    p99 = float(min(tail_quantile(starts, thetas, weights, 0.99, iterations=30)[0], timeout_ms))
    finished = float(record[FINISHED].sum())
    return ReplayResult(
        goodput_rps=float(record[GOOD_TOKENS].sum()) / seconds,
        p99_ms=p99,
        error_frac=float(record[ERRORS].sum()) / finished if finished > 0 else 0.0,
        seconds=seconds,
    )
