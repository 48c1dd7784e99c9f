"""One simulated world's description: its parameters, its episode profiles, the reward and the clock.

`WorldParams` are the scalar parameters of a world (domain-randomised by `training.scenarios`),
`Episode` adds the per-second profiles of one episode, `RewardWeights` defines the reward. The time
constants fix the simulator's clock: 5 s control intervals of 100 ms physics sub-steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from limiter.bucket import MICRO
from training.latency import KNEE_A, KNEE_K, RHO_CAP

INTERVAL_S = 5.0  # seconds per control interval (one env step)
SUBSTEP_S = 0.1  # seconds per physics sub-step
SUBSTEPS = int(round(INTERVAL_S / SUBSTEP_S))  # sub-steps per interval
SUBSTEP_US = int(round(SUBSTEP_S * MICRO))  # µs per sub-step
PROFILE_DT_S = 1.0  # resolution of the scenario profiles (demand, capacity, heavy share)
SUB_PER_PROFILE = int(round(PROFILE_DT_S / SUBSTEP_S))
PROFILE_PER_INTERVAL = int(round(INTERVAL_S / PROFILE_DT_S))
RETRY_SLOTS = 128  # sub-steps of retry look-ahead (12.8 s); longer waits are clipped to it
HPA_SLOTS = 32  # control intervals of autoscaler look-ahead


@dataclass(frozen=True)
class RewardWeights:
    """The reward of one interval: the one place it is defined.

    reward = goodput * (goodput tokens within SLO / sum of min(demand, capacity) dt)
             - slo * clip(true p99 / SLO - 1, 0, 1)
             - error * (errored / finished requests)
             - churn * |log2(new rate / old rate)|
    """

    goodput: float = 1.0
    slo: float = 1.0
    error: float = 2.0
    churn: float = 0.05


REWARD = RewardWeights()


@dataclass(frozen=True)
class WorldParams:
    """Scalar parameters of one simulated world (domain-randomised per episode by the scenarios)."""

    capacity_tokens: float = 1000.0  # nominal backend capacity, tokens (= work units) per second
    slo_ms: float = 300.0  # p99 latency SLO
    error_budget: float = 0.01  # error rate above which an interval violates the SLO
    timeout_s: float = 3.0  # clients give up (error) after this long
    base_latency_ms: float = 50.0  # p99 latency of an idle backend
    heavy_cost: float = 4.0  # tokens (and work) of a heavy request; a light one costs 1
    burst_s: float = 0.5  # bucket capacity = rate * burst_s tokens
    retry_p_throttled: float = 0.5  # share of throttled (429) requests that are retried
    retry_p_error: float = 0.4  # share of timed-out requests that are retried
    retry_delay_s: float = 1.0  # client back-off when Retry-After is not honoured, and after a timeout
    honour_retry_after: bool = True  # False: clients retry after retry_delay_s whatever the header says
    noise: float = 0.05  # relative measurement noise of the reported metrics
    lag_s: float = 1.0  # scrape lag: the reported window ends this long before the tick
    p_missing: float = 0.0  # probability that one interval's scrape is missing (NaN)
    reference_rate: float = 900.0  # the operator's static rate, tokens/s; the starting rate
    collapse: float = 0.3  # capacity lost when the queue is full (thrashing), share
    base_error_rate: float = 0.001  # errors that happen at any load
    autoscale: bool = False  # HPA-like autoscaling of the capacity
    replicas: int = 4  # starting (and minimum) replica count; capacity_tokens is for this many
    max_replicas: int = 16
    hpa_target_cpu: float = 0.7  # the HPA scales to bring CPU to this
    hpa_delay_s: float = 60.0  # seconds from the HPA's decision until new replicas serve
    knee_a: float = KNEE_A  # latency knee: p99 = base_latency * (1 + knee_a * rho**knee_k / (1 - rho))
    knee_k: float = KNEE_K  # sharpness of the knee (the default is the fast path of `training.latency.knee_power`)
    knee_rho_cap: float = RHO_CAP  # the curve stops at this utilisation (a calibrated backend's saturated p99)
    error_onset_util: float = 1.0  # utilisation at which half the admitted requests fail (when error_onset_slope > 0)
    error_onset_slope: float = 0.0  # 0: errors come only from the queue (drops, timeouts) and base_error_rate

    def __post_init__(self) -> None:
        positive = ("capacity_tokens", "slo_ms", "timeout_s", "base_latency_ms", "burst_s", "reference_rate")
        for name in positive:
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and positive, got {value!r}")
        if not self.heavy_cost >= 1:
            raise ValueError(f"heavy_cost must be >= 1 token, got {self.heavy_cost!r}")
        if not (np.isfinite(self.knee_a) and self.knee_a >= 0 and np.isfinite(self.knee_k) and 1 <= self.knee_k <= 64):
            raise ValueError(f"need knee_a >= 0 and 1 <= knee_k <= 64, got {self.knee_a!r}, {self.knee_k!r}")
        if not 0 < self.knee_rho_cap <= RHO_CAP:
            raise ValueError(f"knee_rho_cap must be in (0, {RHO_CAP}], got {self.knee_rho_cap!r}")
        if not (np.isfinite(self.error_onset_slope) and self.error_onset_slope >= 0 and np.isfinite(self.error_onset_util)):
            raise ValueError("error_onset_slope must be finite and >= 0 and error_onset_util finite")
        if not 1 <= self.replicas <= self.max_replicas:
            raise ValueError("need 1 <= replicas <= max_replicas")


@dataclass(frozen=True)
class Episode:
    """One world for one episode: parameters plus per-second profiles covering `steps + 1` intervals.

    The first interval is a warm-up at the reference rate that produces the first observation.
    """

    name: str
    seed: int
    params: WorldParams
    demand_rps: np.ndarray  # requests/s per second of the episode (without retries)
    capacity_factor: np.ndarray  # multiplies params.capacity_tokens, per second
    heavy_frac: np.ndarray  # share of heavy requests, per second
    window_s: tuple[float, float] | None = None  # (start, end) seconds of the trace a window was cut from

    @property
    def steps(self) -> int:
        """Control intervals in the episode (after the warm-up)."""
        return self.demand_rps.size // PROFILE_PER_INTERVAL - 1

    def __post_init__(self) -> None:
        n = self.demand_rps.size
        if n < 2 * PROFILE_PER_INTERVAL or n % PROFILE_PER_INTERVAL:
            raise ValueError(f"profiles must cover a whole number (>= 2) of {INTERVAL_S:g} s intervals, got {n} s")
        for name in ("capacity_factor", "heavy_frac"):
            if getattr(self, name).size != n:
                raise ValueError(f"{name} has {getattr(self, name).size} values, demand_rps has {n}")
        for name in ("demand_rps", "capacity_factor", "heavy_frac"):
            array = getattr(self, name)
            if not np.all(np.isfinite(array)) or np.any(array < 0):
                raise ValueError(f"{name} must be finite and non-negative")
        if np.any(self.heavy_frac > 1):
            raise ValueError("heavy_frac must be <= 1")


def mean_cost(heavy_frac: Any, heavy_cost: Any) -> Any:
    """Average tokens per request for a heavy share and a heavy cost."""
    return 1.0 + heavy_frac * (heavy_cost - 1.0)
