"""The traffic physics, vectorised over N independent worlds: `BatchSim`.

One implementation serves everything: `TrafficEnv` (gymnasium) is `BatchSim` with N = 1, the
evaluation harness and the RL trainer step hundreds of worlds at once. N worlds look like N tiers
to a policy, so any `policy.base.Policy` runs unchanged on a batch.

API (for the trainer and the harness)::

    from training.scenarios import make_episodes
    from training.sim import BatchSim

    episodes = make_episodes(["flash_crowd", "steady"], seeds=range(8))   # 16 worlds
    sim = BatchSim(episodes)
    obs = sim.reset()                      # policy.observation.Observation, obs.vector (N, OBS_DIM)
    while True:
        obs, reward, done, info = sim.step(policy.act(obs))   # rates tokens/s, shape (N,)
        if done:                           # all worlds end together after episodes[i].steps intervals
            break
    sim.reset(other_episodes)              # same N, or a new N

* `step(rates)`: rates are refill rates in tokens/s, shape (N,); NaN/inf, a negative rate or a
  wrong shape is a ValueError and changes nothing; rates are clipped to [MIN_RATE, MAX_RATE].
* `reward`: (N,) floats, see `RewardWeights` (the one place that defines the reward).
* `info`: dict of (N,) arrays about the interval just simulated, true values without noise or lag:
  `goodput_tokens`, `bound_tokens` (sum of min(demand, capacity) dt), `demand_tokens` and
  `capacity_tokens` (interval means, tokens/s), `optimal_rate` (the oracle's rate for it), `rate`,
  `p99_ms` (0 when nothing finished), `error_frac`, `throttle_frac`, `slo_violated`, `admitted_tokens`, `throttled_tokens`,
  `errors`, `finished`.
* `obs.capacity_tokens` is what an oracle would set: the largest rate the backend serves within
  the latency SLO during the next interval. Only the simulator knows it.
* Determinism: every random number of a world comes from its episode's seed and is drawn at reset
  (common random numbers): the same episode gives the same traffic whatever the policy and
  whatever else is in the batch.

Physics of one 100 ms sub-step, per world (units in the comments)::

    arrivals  = Poisson(demand) light + heavy requests, plus clients retrying earlier 429s/timeouts
    bucket    = limiter.bucket.refill / admit_count / wait_us (integer µs, µtokens): admit or throttle
    retries   = throttled clients come back after Retry-After (or sooner in a retry storm)
    queue     = fluid FIFO of work (tokens) served at the backend capacity; requests that would wait
                longer than the client timeout time out (errors); a long queue costs capacity (collapse)
    latency   = min latency + queue wait + a service tail that grows steeply with utilisation
    cpu       = served work / capacity
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from limiter.bucket import MAX_RATE, MICRO, admit_count, refill, wait_us
from policy.base import MIN_RATE
from policy.observation import IntervalMetrics, Observation, ObservationBuilder

INTERVAL_S = 5.0  # seconds per control interval (one env step)
SUBSTEP_S = 0.1  # seconds per physics sub-step
SUBSTEPS = int(round(INTERVAL_S / SUBSTEP_S))  # sub-steps per interval
SUBSTEP_US = int(round(SUBSTEP_S * MICRO))  # µs per sub-step
PROFILE_DT_S = 1.0  # resolution of the scenario profiles (demand, capacity, heavy share)
SUB_PER_PROFILE = int(round(PROFILE_DT_S / SUBSTEP_S))
PROFILE_PER_INTERVAL = int(round(INTERVAL_S / PROFILE_DT_S))
RETRY_SLOTS = 128  # sub-steps of retry look-ahead (12.8 s); longer waits are clipped to it
HPA_SLOTS = 32  # control intervals of autoscaler look-ahead
LN100 = float(np.log(100.0))

# Latency model: p99 of the service time at utilisation rho (0..1) is
#   base * (1 + KNEE_A * rho**KNEE_K / (1 - rho)),
# flat until ~80 % and steep near saturation, like a pool of workers (M/M/c) rather than one server.
KNEE_A = 3.0
KNEE_K = 20  # (see _knee_power)
RHO_CAP = 0.995
MIN_LATENCY_SHARE = 0.5  # the fastest request takes this share of the idle p99
UTIL_TAU_S = 5.0  # seconds: the service tail follows the admitted work averaged over this time (the
# fluid queue, not the tail formula, answers short overloads; a short average would count Poisson noise twice)
QUEUE_TAU_S = 1.0  # seconds over which the worker pool smooths admitted work before it queues
ORACLE_SLO_MARGIN = 0.8  # the oracle aims its p99 at this share of the SLO (measurement noise, bursts)


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

    def __post_init__(self) -> None:
        positive = ("capacity_tokens", "slo_ms", "timeout_s", "base_latency_ms", "burst_s", "reference_rate")
        for name in positive:
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and positive, got {value!r}")
        if not self.heavy_cost >= 1:
            raise ValueError(f"heavy_cost must be >= 1 token, got {self.heavy_cost!r}")
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


def _knee_power(r: np.ndarray) -> np.ndarray:
    """r ** KNEE_K (= 20) by squaring: several times faster than np.power."""
    r4 = r * r
    r4 *= r4
    r16 = r4 * r4
    r16 *= r16
    return r16 * r4


def service_p99_ms(rho: Any, base_latency_ms: Any) -> Any:
    """p99 service latency (ms) at utilisation rho, without queueing behind a backlog."""
    r = np.minimum(np.maximum(rho, 0.0), RHO_CAP)
    return base_latency_ms * (1.0 + KNEE_A * _knee_power(np.asarray(r, dtype=np.float64)) / (1.0 - r))


def slo_utilisation(slo_ms: np.ndarray, base_latency_ms: np.ndarray) -> np.ndarray:
    """The largest utilisation whose p99 stays within ORACLE_SLO_MARGIN * SLO (per world)."""
    grid = np.linspace(0.05, RHO_CAP, 400)
    p99 = service_p99_ms(grid[None, :], base_latency_ms[:, None])
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


def take_rows(obs: Observation, rows: Any) -> Observation:
    """The observation of a subset of rows (worlds / tiers), e.g. one policy's share of a batch."""
    m = obs.metrics
    metrics = IntervalMetrics(
        m.p99_latency_ms[rows], m.error_rate[rows], m.cpu[rows], m.admitted_rps[rows], m.throttled_rps[rows], m.rate[rows]
    )
    capacity = None if obs.capacity_tokens is None else obs.capacity_tokens[rows]
    return Observation(metrics, obs.slo_ms[rows], obs.reference_rate[rows], obs.vector[rows], capacity)


def _stack(episodes: Sequence[Episode], field: str) -> np.ndarray:
    return np.array([getattr(e.params, field) for e in episodes], dtype=np.float64)


class BatchSim:
    """N simulated worlds stepped together, one control interval per `step` (see the module docstring)."""

    def __init__(self, episodes: Sequence[Episode]) -> None:
        self._load(episodes)

    # -- set-up -------------------------------------------------------------------------------
    def _load(self, episodes: Sequence[Episode]) -> None:
        episodes = list(episodes)
        if not episodes:
            raise ValueError("BatchSim needs at least one episode")
        steps = {e.steps for e in episodes}
        if len(steps) != 1:
            raise ValueError(f"all episodes of a batch must have the same number of steps, got {sorted(steps)}")
        self.episodes = episodes
        self.n = n = len(episodes)
        self.steps = steps.pop()
        p = {f: _stack(episodes, f) for f in WorldParams.__dataclass_fields__}
        self.p = p
        self.demand = np.stack([e.demand_rps for e in episodes]).astype(np.float64)
        self.cap_factor = np.stack([e.capacity_factor for e in episodes]).astype(np.float64)
        self.heavy = np.stack([e.heavy_frac for e in episodes]).astype(np.float64)
        heavy_cost_ut = np.floor(p["heavy_cost"] * MICRO).astype(np.int64)
        self.cost_ut = np.stack([np.full(n, MICRO, dtype=np.int64), heavy_cost_ut])  # (2, N): light, heavy
        self.rho_slo = slo_utilisation(p["slo_ms"], p["base_latency_ms"])
        self.lag_sub = np.clip(np.round(p["lag_s"] / SUBSTEP_S), 0, SUBSTEPS).astype(np.int64)
        self.hpa_delay = np.clip(np.round(p["hpa_delay_s"] / INTERVAL_S), 1, HPA_SLOTS - 1).astype(np.int64)
        self.client_delay_sub = np.clip(np.round(p["retry_delay_s"] / SUBSTEP_S), 1, RETRY_SLOTS - 1).astype(np.int64)
        self._draw_noise()

    def _draw_noise(self) -> None:
        """All randomness of every world, from its own seed (common random numbers across policies)."""
        subs = (self.steps + 1) * SUBSTEPS
        self.arrivals = np.empty((subs, 2, self.n), dtype=np.float32)  # (sub-step, light/heavy, world)
        self.obs_noise = np.empty((self.steps + 1, self.n, 5))
        self.obs_missing = np.empty((self.steps + 1, self.n))
        for i, e in enumerate(self.episodes):
            rng = np.random.default_rng(np.random.SeedSequence([e.seed, zlib.crc32(e.name.encode()), 0x5EED]))
            lam = np.repeat(self.demand[i] * SUBSTEP_S, SUB_PER_PROFILE)
            h = np.repeat(self.heavy[i], SUB_PER_PROFILE)
            self.arrivals[:, 0, i] = rng.poisson(lam * (1.0 - h))
            self.arrivals[:, 1, i] = rng.poisson(lam * h)
            self.obs_noise[:, i] = rng.standard_normal((self.steps + 1, 5))
            self.obs_missing[:, i] = rng.random(self.steps + 1)

    def reset(self, episodes: Sequence[Episode] | None = None) -> Observation:
        """Start the episodes (new ones if given) and return the observation after the warm-up interval."""
        if episodes is not None:
            self._load(episodes)
        n, p = self.n, self.p
        self.t = 0  # control intervals simulated so far (the warm-up is interval 0)
        self.clock_us = 0  # simulated time, µs
        self.rate = p["reference_rate"].copy()  # refill rate in force, tokens/s
        self.bucket_cap_ut = self._bucket_capacity(self.rate)
        self.tokens_ut = self.bucket_cap_ut.copy()  # a new bucket starts full
        self.queue = np.zeros(n)  # work waiting at the backend, tokens
        self.util = np.zeros(n)  # smoothed utilisation of the backend
        self.inflow = np.zeros(n)  # admitted work reaching the queue, tokens per sub-step (smoothed)
        self.retries = np.zeros((SUBSTEPS + RETRY_SLOTS, 2, n))  # clients coming back, per sub-step from now
        self.replicas = p["replicas"].copy()
        self.hpa_pending = np.repeat(self.replicas[:, None], HPA_SLOTS, axis=1)
        self.hpa_head = 0
        self.hist = np.zeros((len(_HIST_KEYS), n, 2 * SUBSTEPS))  # last two intervals, per sub-step
        self.record = np.zeros((len(_HIST_KEYS), SUBSTEPS, n))  # this interval, filled sub-step by sub-step
        self.builder = ObservationBuilder(slo_ms=p["slo_ms"], reference_rate=p["reference_rate"])
        self.optimal_rate = self._optimal_rate(0)
        self._simulate_interval()
        obs, _ = self._observe()
        self.t = 1
        return obs

    def _bucket_capacity(self, rate: np.ndarray) -> np.ndarray:
        """Bucket size in µtokens: burst_s of the rate, and never less than one heavy request."""
        return np.floor(np.maximum(rate * self.p["burst_s"], self.p["heavy_cost"]) * MICRO).astype(np.int64)

    def _capacity_seconds(self, interval: int) -> np.ndarray:
        """True backend capacity (tokens/s) for each second of a control interval, shape (N, 5)."""
        lo = interval * PROFILE_PER_INTERVAL
        scale = self.p["capacity_tokens"] * self.replicas / self.p["replicas"]
        return self.cap_factor[:, lo : lo + PROFILE_PER_INTERVAL] * scale[:, None]

    def _optimal_rate(self, interval: int) -> np.ndarray:
        """The oracle's rate for an interval: SLO utilisation of its lowest capacity, less the backlog to drain."""
        capacity = self._capacity_seconds(interval).min(axis=1)
        return np.maximum(self.rho_slo * capacity - self.queue / INTERVAL_S, 0.05 * capacity)

    # -- stepping -----------------------------------------------------------------------------
    def step(self, rates: Any) -> tuple[Observation, np.ndarray, bool, dict[str, np.ndarray]]:
        """Apply new refill rates (tokens/s, shape (N,)) and simulate one control interval."""
        if self.t > self.steps:
            raise RuntimeError("episode is over: call reset()")
        new_rate = np.asarray(rates, dtype=np.float64).reshape(-1)
        if new_rate.shape != (self.n,):
            raise ValueError(f"expected {self.n} rates, got shape {np.shape(rates)}")
        if not np.all(np.isfinite(new_rate)) or np.any(new_rate < 0):
            raise ValueError("rates must be finite and non-negative (tokens/s)")
        new_rate = np.clip(new_rate, MIN_RATE, MAX_RATE)
        churn = np.abs(np.log2(new_rate / self.rate))
        self.rate = new_rate
        self.bucket_cap_ut = self._bucket_capacity(new_rate)
        self.tokens_ut = np.minimum(self.tokens_ut, self.bucket_cap_ut)
        optimal = self.optimal_rate
        self._simulate_interval()
        obs, truth = self._observe()
        reward = (
            REWARD.goodput * truth["goodput_tokens"] / np.maximum(truth["bound_tokens"], 1.0)
            - REWARD.slo * np.clip(truth["p99_ms"] / self.p["slo_ms"] - 1.0, 0.0, 1.0)
            - REWARD.error * truth["error_frac"]
            - REWARD.churn * churn
        )
        truth["optimal_rate"] = optimal
        truth["rate"] = new_rate.copy()
        self.t += 1
        done = self.t > self.steps
        return obs, reward, done, truth

    def _simulate_interval(self) -> None:
        """Run the sub-steps of interval self.t and append their records to the history."""
        p, n, t = self.p, self.n, self.t
        rows = np.arange(n)
        # per-interval constants, (S, N) or (N,)
        capacity_seconds = self._capacity_seconds(t)
        self.interval_capacity = capacity_seconds.mean(axis=1)  # tokens/s, before the autoscaler moves
        capacity = np.ascontiguousarray(np.maximum(np.repeat(capacity_seconds, SUB_PER_PROFILE, axis=1).T, 1e-6))  # (S, N) tokens/s
        timeout_s = p["timeout_s"]
        inv_max_queue = 1.0 / (capacity * timeout_s)  # a client waits for at most capacity * timeout tokens
        collapse, base_err = p["collapse"], p["base_error_rate"]
        slo_s = p["slo_ms"] / 1000.0
        min_lat_s = MIN_LATENCY_SHARE * p["base_latency_ms"] / 1000.0
        theta_scale = p["base_latency_ms"] / 1000.0 / LN100
        alpha = SUBSTEP_S / UTIL_TAU_S
        beta = SUBSTEP_S / QUEUE_TAU_S
        cost_ut = self.cost_ut
        arrivals = self.arrivals[t * SUBSTEPS : (t + 1) * SUBSTEPS]
        # Retry-After is whole seconds (>= 1) until one more token; the rate is fixed for the interval
        retry_after_sub = np.maximum(np.ceil(wait_us(MICRO, self.rate) / MICRO), 1.0) / SUBSTEP_S
        delay_thr = np.where(p["honour_retry_after"] > 0, retry_after_sub, self.client_delay_sub)
        delay_thr = np.clip(delay_thr, 1, RETRY_SLOTS - 1).astype(np.int64)
        klass = np.arange(2)[:, None]
        idx_thr = (delay_thr[None, :] * 2 + klass) * n + rows[None, :]  # flat index into self.retries
        idx_err = (self.client_delay_sub[None, :] * 2 + klass) * n + rows[None, :]
        retries = self.retries
        retries[:RETRY_SLOTS] = retries[SUBSTEPS:].copy()  # shift the look-ahead by one interval
        retries[RETRY_SLOTS:] = 0.0
        flat = retries.reshape(-1)
        p_thr, p_err = p["retry_p_throttled"], p["retry_p_error"]
        stride = 2 * n
        tokens, queue, util, inflow = self.tokens_ut, self.queue, self.util, self.inflow
        clock, rate, bucket_cap = self.clock_us, self.rate, self.bucket_cap_ut
        budget = np.zeros((2, n), dtype=np.int64)
        rec = self.record
        for k in range(SUBSTEPS):
            # arrivals: new requests plus retrying clients (a fluid amount: expected retries, not drawn)
            ask = arrivals[k] + retries[k]  # (2, N) requests: light, heavy
            # the token bucket, limiter.bucket arithmetic in µs and µtokens; tokens are split between
            # light and heavy requests in proportion to what they ask
            # (integer µtokens: whole numbers held exactly; int64 also divides faster than float)
            tokens = refill(tokens, clock, clock + SUBSTEP_US, rate, bucket_cap).astype(np.int64)
            clock += SUBSTEP_US
            ask_ut = ask * cost_ut
            total_ut = ask_ut[0] + ask_ut[1]
            budget[0] = tokens * ask_ut[0] / np.maximum(total_ut, 1.0)  # truncates: never more than the share
            budget[1] = tokens - budget[0]
            admitted = admit_count(budget, ask, cost_ut)
            admitted_ut = admitted * cost_ut
            tokens = (tokens - admitted_ut[0] - admitted_ut[1]).astype(np.int64)
            flat[idx_thr + k * stride] += (ask - admitted) * p_thr  # throttled clients come back later
            # the backend: a fluid FIFO queue of work served at a capacity a long queue erodes
            adm_tok = (admitted_ut[0] + admitted_ut[1]) * (1.0 / MICRO)
            adm_req = admitted[0] + admitted[1]
            cap = capacity[k] * (1.0 - collapse * np.minimum(queue * inv_max_queue[k], 1.0))
            util += alpha * (adm_tok / (cap * SUBSTEP_S) - util)
            # the queue sees admitted work smoothed over QUEUE_TAU_S: the worker pool absorbs Poisson
            # lumps (the service tail models those), only a sustained excess builds a backlog
            inflow += beta * (adm_tok - inflow)
            overflow = np.maximum(queue + inflow - cap * timeout_s, 0.0)  # would wait past the timeout
            joined_share = 1.0 - overflow / np.maximum(inflow, 1e-12)
            start = min_lat_s + np.minimum(queue / cap, timeout_s)  # s: the fastest latency, behind the backlog
            queue = queue + (inflow - overflow)
            served = np.minimum(queue, cap * SUBSTEP_S)
            queue = queue - served
            # service tail: exponential with the p99 of the utilisation curve
            r = np.minimum(util, RHO_CAP)
            theta = theta_scale * ((1.0 - MIN_LATENCY_SHARE) + KNEE_A * _knee_power(r) / (1.0 - r))  # s
            inv_theta = 1.0 / theta
            joined = adm_req * joined_share
            # (exponents clipped at 50: exp underflow takes a slow path and the tail is 0 to 1e-21 anyway)
            p_ok = 1.0 - np.exp(-np.clip((slo_s - start) * inv_theta, 0.0, 50.0))
            p_timeout = np.exp(-np.clip((timeout_s - start) * inv_theta, 0.0, 50.0))
            errors = adm_req - joined * (1.0 - np.minimum(p_timeout + base_err, 1.0))
            flat[idx_err + k * stride] += admitted * (errors * p_err / np.maximum(adm_req, 1e-12))
            rec[0, k] = adm_tok
            rec[1, k] = total_ut * (1.0 / MICRO) - adm_tok
            rec[2, k] = adm_req
            rec[3, k] = errors
            rec[4, k] = joined
            rec[5, k] = start
            rec[6, k] = theta
            rec[7, k] = served / (cap * SUBSTEP_S)
            rec[8, k] = adm_tok * joined_share * p_ok * (1.0 - base_err)
        self.tokens_ut, self.queue, self.util, self.inflow, self.clock_us = tokens, queue, util, inflow, clock
        self.hist[:, :, :SUBSTEPS] = self.hist[:, :, SUBSTEPS:]
        self.hist[:, :, SUBSTEPS:] = rec.transpose(0, 2, 1)
        self._autoscale()

    def _autoscale(self) -> None:
        """HPA-like scaling: desired replicas from this interval's CPU take effect hpa_delay intervals later."""
        p = self.p
        on = p["autoscale"] > 0
        if not np.any(on):
            return
        cpu = self.hist[_CPU, :, SUBSTEPS:].mean(axis=1)
        desired = np.clip(np.ceil(self.replicas * cpu / p["hpa_target_cpu"]), p["replicas"], p["max_replicas"])
        rows = np.arange(self.n)
        # each world's delay is fixed, so every slot of its ring is written once per turn, in order
        later = (self.hpa_head + self.hpa_delay) % HPA_SLOTS
        self.hpa_pending[rows, later] = desired
        self.hpa_head = (self.hpa_head + 1) % HPA_SLOTS
        self.replicas = np.where(on, self.hpa_pending[:, self.hpa_head], self.replicas)

    # -- observing ----------------------------------------------------------------------------
    def _window(self, start: np.ndarray) -> dict[str, np.ndarray]:
        """Sums, CPU and p99 over the interval-long window starting at history column `start` (per world)."""
        if np.all(start == SUBSTEPS):
            took = self.hist[:, :, SUBSTEPS:]
        else:
            windows = np.lib.stride_tricks.sliding_window_view(self.hist, SUBSTEPS, axis=2)  # (K, N, S+1, S)
            took = windows[:, np.arange(self.n), start]
        sums = took.sum(axis=2)
        out = {key: sums[i] for i, key in enumerate(_HIST_KEYS)}
        out["cpu"] = out["cpu"] / SUBSTEPS
        # latency: each sub-step's requests are start + Exp(theta); timed-out ones a point mass at the
        # timeout (a served request never waits longer: the client has left)
        timed_out = out["finished"] - out["joined"]
        timeout_ms = self.p["timeout_s"][:, None] * 1000.0
        # pairs of sub-steps merged (weighted means of start and tail): half the work, same p99 to ~1 %
        w = took[_JOINED].reshape(self.n, -1, 2)
        pair_w = w.sum(axis=2)
        share = np.divide(w, pair_w[:, :, None], out=np.full(w.shape, 0.5), where=pair_w[:, :, None] > 0)
        pair_start = (took[_START].reshape(w.shape) * share).sum(axis=2) * 1000.0
        pair_theta = (took[_THETA].reshape(w.shape) * share).sum(axis=2) * 1000.0
        starts = np.concatenate([np.minimum(pair_start, timeout_ms), timeout_ms], axis=1)
        thetas = np.concatenate([pair_theta, np.zeros((self.n, 1))], axis=1)
        weights = np.concatenate([pair_w, timed_out[:, None]], axis=1)
        out["p99_ms"] = np.minimum(tail_quantile(starts, thetas, weights, 0.99), timeout_ms[:, 0])
        return out

    def _observe(self) -> tuple[Observation, dict[str, np.ndarray]]:
        """The lagged, noisy observation the controller would get, and the interval's true figures."""
        p, t = self.p, self.t
        true = self._window(np.full(self.n, SUBSTEPS))
        seen = self._window(SUBSTEPS - self.lag_sub)
        z = self.obs_noise[t]
        sigma = p["noise"]
        missing = self.obs_missing[t] < p["p_missing"]
        nan = np.where(missing, np.nan, 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            error_rate = seen["errors"] / seen["finished"]
        metrics = IntervalMetrics(
            p99_latency_ms=seen["p99_ms"] * np.exp(sigma * z[:, 0]) * nan,
            error_rate=np.clip(error_rate * np.exp(sigma * z[:, 1]), 0.0, 1.0) * nan,
            cpu=np.clip(seen["cpu"] + 0.5 * sigma * z[:, 2], 0.0, 2.0) * nan,
            admitted_rps=seen["adm_tok"] / INTERVAL_S * np.exp(0.2 * sigma * z[:, 3]) * nan,
            throttled_rps=seen["thr_tok"] / INTERVAL_S * np.exp(0.2 * sigma * z[:, 4]) * nan,
            rate=self.rate.copy(),
        )
        lo = t * PROFILE_PER_INTERVAL
        seconds = slice(lo, lo + PROFILE_PER_INTERVAL)
        demand_tok = (self.demand[:, seconds] * mean_cost(self.heavy[:, seconds], p["heavy_cost"][:, None])).mean(axis=1)
        capacity = self.interval_capacity
        finished = true["finished"]
        with np.errstate(invalid="ignore", divide="ignore"):
            error_frac = np.where(finished > 0, true["errors"] / finished, 0.0)
            asked = true["adm_tok"] + true["thr_tok"]
            throttle_frac = np.where(asked > 0, true["thr_tok"] / asked, 0.0)
        p99 = np.nan_to_num(true["p99_ms"], nan=0.0)  # no request finished: no latency to report
        truth = {
            "goodput_tokens": true["good_tok"],
            "bound_tokens": np.minimum(demand_tok, capacity) * INTERVAL_S,
            "demand_tokens": demand_tok,
            "capacity_tokens": capacity,
            "p99_ms": p99,
            "error_frac": error_frac,
            "throttle_frac": throttle_frac,
            "slo_violated": (p99 > p["slo_ms"]) | (error_frac > p["error_budget"]),
            "admitted_tokens": true["adm_tok"],
            "throttled_tokens": true["thr_tok"],
            "errors": true["errors"],
            "finished": finished,
        }
        self.optimal_rate = self._optimal_rate(min(t + 1, self.steps))
        obs = self.builder.build(metrics, capacity_tokens=self.optimal_rate.copy())
        return obs, truth


_HIST_KEYS = ("adm_tok", "thr_tok", "finished", "errors", "joined", "start_s", "theta_s", "cpu", "good_tok")
_JOINED, _START, _THETA, _CPU = (_HIST_KEYS.index(k) for k in ("joined", "start_s", "theta_s", "cpu"))
