"""The latency model of the simulated backend: the utilisation knee and the p99 of a latency mixture.

p99 of the service time at utilisation rho (0..1) is

    base * (1 + a * rho**k / (1 - rho)),

with the knee's height a and sharpness k: by default KNEE_A and KNEE_K, flat until ~80 % and steep
near saturation, like a pool of many workers (M/M/c) rather than one server. A calibration
(`training.calibration`) fits a and k of a measured backend; a pool of few workers bends earlier.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KNEE_A = 3.0
KNEE_K = 20  # (see knee_power)
RHO_CAP = 0.995
MIN_LATENCY_SHARE = 0.5  # the fastest request takes this share of the idle p99
ORACLE_SLO_MARGIN = 0.8  # the oracle aims its p99 at this share of the SLO (measurement noise, bursts)


def knee_power(r: np.ndarray) -> np.ndarray:
    """r ** KNEE_K (= 20) by squaring: several times faster than np.power."""
    r4 = r * r
    r4 *= r4
    r16 = r4 * r4
    r16 *= r16
    return r16 * r4


def knee(rho: np.ndarray, knee_k: Any = KNEE_K) -> np.ndarray:
    """rho ** knee_k: by squaring when every k is the default KNEE_K, else np.power (per-world k broadcasts)."""
    if np.all(np.asarray(knee_k) == KNEE_K):
        return knee_power(rho)
    return np.power(rho, knee_k)


def service_p99_ms(rho: Any, base_latency_ms: Any, knee_a: Any = KNEE_A, knee_k: Any = KNEE_K) -> Any:
    """p99 service latency (ms) at utilisation rho, without queueing behind a backlog."""
    r = np.asarray(np.minimum(np.maximum(rho, 0.0), RHO_CAP), dtype=np.float64)
    return base_latency_ms * (1.0 + knee_a * knee(r, knee_k) / (1.0 - r))


def slo_utilisation(
    slo_ms: np.ndarray, base_latency_ms: np.ndarray, knee_a: Any = KNEE_A, knee_k: Any = KNEE_K
) -> np.ndarray:
    """The largest utilisation whose p99 stays within ORACLE_SLO_MARGIN * SLO (per world)."""
    grid = np.linspace(0.05, RHO_CAP, 400)
    shape = np.shape(base_latency_ms)
    a = np.broadcast_to(np.asarray(knee_a, dtype=np.float64), shape)[:, None]
    k = np.broadcast_to(np.asarray(knee_k, dtype=np.float64), shape)[:, None]
    p99 = service_p99_ms(grid[None, :], base_latency_ms[:, None], a, k)
    fits = p99 <= ORACLE_SLO_MARGIN * slo_ms[:, None]
    best = np.where(fits, grid[None, :], 0.0).max(axis=1)
    return np.maximum(best, grid[0])


def tail_quantile(start: np.ndarray, theta: np.ndarray, weights: np.ndarray, q: float, iterations: int = 12) -> np.ndarray:
    """Row-wise q-quantile of a mixture of shifted exponentials (N, M): start + Exp(mean theta), by bisection.

    A component with theta = 0 is a point mass at `start` (the timed-out requests). NaN for rows without
    weight.
    """
    total = weights.sum(axis=1)
    target = (1.0 - q) * total
    lo = start.min(axis=1)
    hi = (start + theta * np.log(1.0 / (1.0 - q))).max(axis=1) + 1e-9
    # float32 is ample for latencies and twice as fast through exp
    start32 = start.astype(np.float32)
    inv_theta = (1.0 / np.maximum(theta, 1e-12)).astype(np.float32)
    w32 = weights.astype(np.float32)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        excess = np.maximum(mid[:, None].astype(np.float32) - start32, np.float32(0.0)) * inv_theta
        above = (w32 * np.exp(-excess)).sum(axis=1, dtype=np.float64)
        too_low = above > target
        lo = np.where(too_low, mid, lo)
        hi = np.where(too_low, hi, mid)
    return np.where(total > 0, 0.5 * (lo + hi), np.nan)
