"""Several tiers in front of one backend: `SharedBackendSim` and the `capacity_halves` scenario.

`training.sim.BatchSim` steps N independent worlds, each with its own bucket and its own backend.
`SharedBackendSim` keeps one bucket per tier but lets the tiers of a backend share its queue: each
sub-step the queue, the smoothed inflow and the utilisation see the summed admitted work of all the
tiers of that backend, so every tier's requests wait behind the same backlog, meet the same service
tail and the same timeout, and the CPU is the backend's. Everything per request (admitted, throttled,
good tokens, errors) stays per tier. The tiers of one backend must have the same backend parameters
and capacity profile (checked).

Scenario `capacity_halves` (two tiers, one backend; `two_tier_episodes`):

| quantity            | top tier (priority 2)   | bottom tier (priority 1) | backend                        |
|---------------------|-------------------------|--------------------------|--------------------------------|
| demand, requests/s  | 0.30 x C0               | 0.50 x C0                | C0 = 1000 tokens/s at the start|
| static (start) rate | 0.40 x C0               | 0.60 x C0                |                                |
| capacity            |                         |                          | C0 until `cut_s`, then C0 / 2  |

Clients are open-loop (no retries), as the demo's load generator, so a tier's demand is what its
clients send. After the cut the backend can serve ~0.45 x C0 within the SLO: the top tier's 0.30 fits,
the bottom tier must lose more than half of its traffic. `run_two_tiers` plays it with any policy
(e.g. the RL policy inside `SafePolicy(PriorityPolicy(...))`) and reports per tier the share of
demand served within the SLO after the cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from policy.base import Policy
from policy.priority import PriorityGroup
from policy.safety import SafetyLimits
from training.sim import INTERVAL_S, BatchSim, Episode, Queued, WorldParams
from training.world import PROFILE_PER_INTERVAL

SHARED_PARAMS = (  # WorldParams that describe the backend: equal for all tiers of one backend
    "capacity_tokens", "timeout_s", "base_latency_ms", "collapse", "base_error_rate", "autoscale", "replicas",
)  # fmt: skip
TIERS = ("top", "bottom")
DEMAND_SHARE = (0.30, 0.50)  # of the starting capacity, per tier
STATIC_SHARE = (0.40, 0.60)  # the tiers' static rates, of the starting capacity
PRIORITY = (2, 1)


class SharedBackendSim(BatchSim):
    """`BatchSim` whose worlds are tiers; tiers with the same `backend` id share one backend queue."""

    def __init__(self, episodes: Sequence[Episode], backend: Sequence[int]) -> None:
        self.backend_id = np.asarray(backend, dtype=np.int64).reshape(-1)
        # pool[i, j] = 1 when tiers i and j share a backend: pool @ x sums x over each tier's backend
        self._pool = (self.backend_id[:, None] == self.backend_id[None, :]).astype(np.float64)
        super().__init__(episodes)

    def _load(self, episodes: Sequence[Episode]) -> None:
        episodes = list(episodes)
        if len(episodes) != self.backend_id.size:
            raise ValueError(f"{len(episodes)} episodes for {self.backend_id.size} tiers")
        for b in np.unique(self.backend_id):
            members = [e for e, i in zip(episodes, self.backend_id, strict=True) if i == b]
            first = members[0]
            for e in members[1:]:
                differ = [f for f in SHARED_PARAMS if getattr(e.params, f) != getattr(first.params, f)]
                if differ or not np.array_equal(e.capacity_factor, first.capacity_factor):
                    raise ValueError(f"tiers of backend {b} differ in {differ or ['capacity_factor']}")
            if first.params.autoscale:
                raise ValueError("a shared backend does not autoscale in this simulator")
        super()._load(episodes)

    def _queue(self, admitted_tokens: np.ndarray, capacity_tps: np.ndarray, inv_max_queue: np.ndarray) -> Queued:
        """The backend's queue fed by all its tiers (each tier holds the same copy of the queue state)."""
        return super()._queue(self._pool @ admitted_tokens, capacity_tps, inv_max_queue)

    def _service_tail(self, admitted_tokens: np.ndarray, capacity_tps: np.ndarray) -> np.ndarray:
        """The service tail at the backend's utilisation (all its tiers' work)."""
        return super()._service_tail(self._pool @ admitted_tokens, capacity_tps)


def two_tier_episodes(seed: int, seconds: int = 180, cut_s: int = 60, capacity: float = 1000.0) -> list[Episode]:
    """The `capacity_halves` scenario: top and bottom tier of one backend (see the module docstring)."""
    if seconds % PROFILE_PER_INTERVAL or not 0 < cut_s < seconds:
        raise ValueError(f"need whole {INTERVAL_S:g} s intervals and 0 < cut_s < seconds, got {seconds}, {cut_s}")
    factor = np.where(np.arange(seconds) < cut_s, 1.0, 0.5)
    base = WorldParams(capacity_tokens=capacity, retry_p_throttled=0.0, retry_p_error=0.0, heavy_cost=1.0)
    return [
        Episode(
            f"capacity_halves:{tier}", seed,
            replace(base, reference_rate=static * capacity),
            demand_rps=np.full(seconds, demand * capacity), capacity_factor=factor, heavy_frac=np.zeros(seconds),
        )  # fmt: skip
        for tier, demand, static in zip(TIERS, DEMAND_SHARE, STATIC_SHARE, strict=True)
    ]


def two_tier_group() -> PriorityGroup:
    """The scenario's backend group: the top tier first."""
    return PriorityGroup("backend", tiers=np.arange(len(TIERS)), priority=np.array(PRIORITY), weight=np.ones(len(TIERS)))


def two_tier_limits(capacity: float = 1000.0) -> SafetyLimits:
    """Safety limits as the packaged controller.yaml's: bounds 0.1x..10x static, x1.5 up, x0.25 down per tick."""
    static = np.array(STATIC_SHARE) * capacity
    return SafetyLimits(min_rate=static * 0.1, max_rate=static * 10, static_rate=static, max_up=1.5, max_down=0.25)


@dataclass(frozen=True)
class TwoTierRun:
    """Per tier (rows in `TIERS` order), per interval (columns): what one run of `capacity_halves` gave."""

    demand_tokens: np.ndarray  # tokens/s asked for
    good_tokens: np.ndarray  # tokens served within the SLO and without error, over the interval
    rate: np.ndarray  # refill rate in force, tokens/s
    p99_ms: np.ndarray  # the backend's true p99 (the same for every tier)
    capacity_tokens: np.ndarray  # the backend's capacity, tokens/s
    cut_interval: int  # first interval with the halved capacity

    def served_within_slo(self, start: int | None = None, end: int | None = None) -> np.ndarray:
        """Per tier, goodput within the SLO / demand over intervals [start, end) (default: from the cut on)."""
        window = slice(self.cut_interval if start is None else start, end)
        return self.good_tokens[:, window].sum(axis=1) / (self.demand_tokens[:, window].sum(axis=1) * INTERVAL_S)


def run_two_tiers(policy: Policy, seed: int, seconds: int = 180, cut_s: int = 60) -> TwoTierRun:
    """Play `capacity_halves` with `policy` deciding both tiers' rates each interval."""
    sim = SharedBackendSim(two_tier_episodes(seed, seconds, cut_s), backend=[0, 0])
    policy.reset()
    obs = sim.reset()
    rows: dict[str, list[np.ndarray]] = {"demand": [], "good": [], "rate": [], "p99": [], "capacity": []}
    done = False
    while not done:
        obs, _, done, info = sim.step(policy.act(obs))
        rows["demand"].append(info["demand_tokens"])
        rows["good"].append(info["goodput_tokens"])
        rows["rate"].append(info["rate"])
        rows["p99"].append(info["p99_ms"])
        rows["capacity"].append(info["capacity_tokens"])
    cols = {k: np.stack(v, axis=1) for k, v in rows.items()}
    # step i simulates interval i + 1 (interval 0 is the warm-up)
    return TwoTierRun(cols["demand"], cols["good"], cols["rate"], cols["p99"], cols["capacity"], cut_s // int(INTERVAL_S) - 1)
