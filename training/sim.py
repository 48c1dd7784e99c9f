"""The traffic physics, vectorised over N independent worlds: `BatchSim`.

One implementation serves everything: `TrafficEnv` (gymnasium) is `BatchSim` with N = 1, the
evaluation harness and the RL trainer step hundreds of worlds at once. N worlds look like N tiers
to a policy, so any `policy.base.Policy` runs unchanged on a batch. A world's parameters, episode
profiles and reward live in `training.world`, the latency curve in `training.latency`.

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

Physics of one 100 ms sub-step, per world, in this order (`BatchSim._simulate_interval`)::

    arrivals  = Poisson(demand) new requests, light and heavy (drawn at reset)            requests
    retries   = + the clients due back now after an earlier 429 or timeout (expected, not drawn)
    bucket    = limiter.bucket.refill / admit_count / wait_us (integer µs, µtokens): admit or
                throttle; throttled clients are booked to come back after Retry-After (or sooner
                in a retry storm)
    queue     = fluid FIFO of work (tokens) served at the backend capacity (tokens/s); work that would
                wait longer than the client timeout is dropped (errors); a long queue costs capacity
                (collapse)
    service   = cpu = served work / capacity; the service tail (s) follows the utilisation averaged
                over UTIL_TAU_S
    latency   = min latency + queue wait + Exp(service tail): the share within the SLO and the share
                past the timeout (errors; those clients are booked to retry after retry_delay_s)
    onset     = a calibrated backend (`training.calibration`) fails at least its fitted share at this
                utilisation (logistic; off unless error_onset_slope > 0)

Each sub-step writes one row of the record (`ADMITTED_TOKENS` … `GOOD_TOKENS`); the observation
and the true figures of an interval are sums and quantiles over those rows.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from limiter.bucket import MAX_RATE, MICRO, admit_count, refill, wait_us
from policy.base import MIN_RATE
from policy.observation import IntervalMetrics, Observation, ObservationBuilder
from training.latency import KNEE_K, MIN_LATENCY_SHARE, knee_power, slo_utilisation, tail_quantile
from training.world import (
    HPA_SLOTS,
    INTERVAL_S,
    PROFILE_PER_INTERVAL,
    RETRY_SLOTS,
    REWARD,
    SUB_PER_PROFILE,
    SUBSTEP_S,
    SUBSTEP_US,
    SUBSTEPS,
    Episode,
    WorldParams,
    mean_cost,
)

LN100 = float(np.log(100.0))
UTIL_TAU_S = 5.0  # seconds: the service tail follows the admitted work averaged over this time (the
# fluid queue, not the tail formula, answers short overloads; a short average would count Poisson noise twice)
QUEUE_TAU_S = 1.0  # seconds over which the worker pool smooths admitted work before it queues
UTIL_STEP = SUBSTEP_S / UTIL_TAU_S  # share of the gap the utilisation average closes per sub-step
INFLOW_STEP = SUBSTEP_S / QUEUE_TAU_S  # share of the gap the smoothed inflow closes per sub-step
MAX_EXPONENT = 50.0  # exponents are clipped here: exp underflow takes a slow path, and e**-50 is 0 to 2e-22

LIGHT, HEAVY = 0, 1  # request classes: axis 1 of `arrivals` and `retries`, axis 0 of a sub-step's (2, N)

# Columns of the sub-step record: `BatchSim.record[column, sub-step, world]` (this interval) and
# `BatchSim.hist[column, world, sub-step]` (the last two intervals).
ADMITTED_TOKENS = 0  # tokens admitted by the bucket
THROTTLED_TOKENS = 1  # tokens asked for and refused (429)
FINISHED = 2  # requests admitted: each one ends, in time, late or in error
ERRORS = 3  # admitted requests that failed: dropped by a full queue, timed out, or the base error rate
JOINED = 4  # admitted requests that joined the queue (not dropped)
START_S = 5  # s: the fastest latency of the sub-step's requests (min latency + wait behind the backlog)
THETA_S = 6  # s: mean of the exponential service tail
CPU = 7  # served work / capacity (share)
GOOD_TOKENS = 8  # admitted tokens served within the SLO and without error
RECORD_KEYS = ("adm_tok", "thr_tok", "finished", "errors", "joined", "start_s", "theta_s", "cpu", "good_tok")


class Backend(NamedTuple):
    """Per-world constants of the backend and its clients, (N,) arrays derived once from `WorldParams`."""

    timeout_s: np.ndarray  # clients give up after this long
    slo_s: np.ndarray  # latency SLO
    min_latency_s: np.ndarray  # the fastest request: MIN_LATENCY_SHARE of the idle p99
    tail_scale_s: np.ndarray  # idle p99 / ln 100: the mean of an exponential whose p99 is the idle p99
    collapse: np.ndarray  # share of capacity lost when the queue is full
    base_error_rate: np.ndarray  # errors at any load (share)
    knee_a: np.ndarray  # height of the latency knee (`training.latency`)
    rho_cap: np.ndarray  # the latency curve stops at this utilisation
    onset_util: np.ndarray  # utilisation at which half the requests fail (the error onset); used when onset_slope > 0
    onset_slope: np.ndarray  # steepness of the error onset, per unit of utilisation; 0: no onset beyond the queue's drops
    p_retry_throttled: np.ndarray  # share of throttled requests retried
    p_retry_error: np.ndarray  # share of failed requests retried

    @classmethod
    def of(cls, p: dict[str, np.ndarray]) -> Backend:
        """The constants of stacked `WorldParams` fields."""
        return cls(
            timeout_s=p["timeout_s"],
            slo_s=p["slo_ms"] / 1000.0,
            min_latency_s=MIN_LATENCY_SHARE * p["base_latency_ms"] / 1000.0,
            tail_scale_s=p["base_latency_ms"] / 1000.0 / LN100,
            collapse=p["collapse"],
            base_error_rate=p["base_error_rate"],
            knee_a=p["knee_a"],
            rho_cap=p["knee_rho_cap"],
            onset_util=p["error_onset_util"],
            onset_slope=p["error_onset_slope"],
            p_retry_throttled=p["retry_p_throttled"],
            p_retry_error=p["retry_p_error"],
        )


class Queued(NamedTuple):
    """One sub-step of the backend queue, per world."""

    capacity_tps: np.ndarray  # tokens/s served this sub-step, after the collapse of a long queue
    joined_share: np.ndarray  # share of the admitted work that joined the queue (the rest waits past the timeout)
    start_s: np.ndarray  # s: the fastest latency, behind the backlog found on arrival
    served_tokens: np.ndarray  # work served this sub-step


class Latency(NamedTuple):
    """Outcome of one sub-step's admitted requests, per world."""

    joined: np.ndarray  # requests that joined the queue
    p_in_slo: np.ndarray  # share of the joined requests that finish within the SLO
    errors: np.ndarray  # requests that failed: dropped, timed out, the base error rate or the error onset
    onset_share: np.ndarray | None  # share failing by the error onset at this utilisation (None: no onset)


def retry_landing(delay_sub: np.ndarray, retries_shape: tuple[int, ...]) -> np.ndarray:
    """Positions (2, N) in `retries[k:]`, flattened, of `retries[k + delay_sub, class, world]`.

    `np.ravel_multi_index` flattens the three named coordinates once per interval: 3-D fancy indexing
    would cost about three times as much in the sub-step loop. The positions hold for every k because
    `retries[k:]` is a C-contiguous view whose rows keep their length.
    """
    classes = np.arange(retries_shape[1])[:, None]
    worlds = np.arange(retries_shape[2])[None, :]
    return np.ravel_multi_index((delay_sub[None, :], classes, worlds), retries_shape)


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
        self.rho_slo = slo_utilisation(p["slo_ms"], p["base_latency_ms"], p["knee_a"], p["knee_k"])
        self.knee_k = None if np.all(p["knee_k"] == KNEE_K) else p["knee_k"]  # None: the fast default knee
        self.error_onset = bool(np.any(p["error_onset_slope"] > 0))
        self.lag_sub = np.clip(np.round(p["lag_s"] / SUBSTEP_S), 0, SUBSTEPS).astype(np.int64)
        self.hpa_delay = np.clip(np.round(p["hpa_delay_s"] / INTERVAL_S), 1, HPA_SLOTS - 1).astype(np.int64)
        self.client_delay_sub = np.clip(np.round(p["retry_delay_s"] / SUBSTEP_S), 1, RETRY_SLOTS - 1).astype(np.int64)
        self.backend = Backend.of(p)
        self.budget_ut = np.zeros((2, n), dtype=np.int64)  # µtokens of a sub-step's bucket for light, heavy
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
        self.hist = np.zeros((len(RECORD_KEYS), n, 2 * SUBSTEPS))  # last two intervals, per sub-step
        self.record = np.zeros((len(RECORD_KEYS), SUBSTEPS, n))  # this interval, filled sub-step by sub-step
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

    # -- one control interval: arrivals → retries → bucket → queue → service → latency ----------
    def _simulate_interval(self) -> None:
        """Simulate the sub-steps of interval self.t and append their records to the history."""
        t = self.t
        capacity_tps = self._substep_capacity(t)  # (S, N) tokens/s before collapse
        inv_max_queue = 1.0 / (capacity_tps * self.backend.timeout_s)  # 1/tokens: a client waits behind at most capacity * timeout
        new_requests = self.arrivals[t * SUBSTEPS : (t + 1) * SUBSTEPS]  # (S, 2, N) requests: light, heavy
        retries = self._advance_retries()  # (slots, 2, N) requests due back, by sub-step from now
        throttled_land = retry_landing(self._throttled_delay_sub(), retries.shape)
        failed_land = retry_landing(self.client_delay_sub, retries.shape)
        p_retry_throttled, p_retry_error = self.backend.p_retry_throttled, self.backend.p_retry_error
        for k in range(SUBSTEPS):
            # arrivals and retries: the clients due back now are a fluid (expected) amount, not drawn
            asked = new_requests[k] + retries[k]  # (2, N) requests
            # bucket
            admitted, asked_ut, admitted_ut = self._bucket(asked)
            retries[k:].reshape(-1)[throttled_land] += (asked - admitted) * p_retry_throttled
            admitted_tokens = (admitted_ut[LIGHT] + admitted_ut[HEAVY]) * (1.0 / MICRO)
            admitted_requests = admitted[LIGHT] + admitted[HEAVY]
            # queue, service, latency
            queued = self._queue(admitted_tokens, capacity_tps[k], inv_max_queue[k])
            theta_s = self._service_tail(admitted_tokens, queued.capacity_tps)
            latency = self._latency(admitted_requests, queued, theta_s)
            # failed clients come back too, in proportion to what each class had admitted
            retry_share = latency.errors * p_retry_error / np.maximum(admitted_requests, 1e-12)
            retries[k:].reshape(-1)[failed_land] += admitted * retry_share
            self._record(k, admitted_tokens, asked_ut, admitted_requests, queued, theta_s, latency)
        self.hist[:, :, :SUBSTEPS] = self.hist[:, :, SUBSTEPS:]
        self.hist[:, :, SUBSTEPS:] = self.record.transpose(0, 2, 1)
        self._autoscale()

    def _substep_capacity(self, interval: int) -> np.ndarray:
        """Backend capacity (tokens/s) of each sub-step of an interval, shape (S, N); sets interval_capacity."""
        capacity_seconds = self._capacity_seconds(interval)
        self.interval_capacity = capacity_seconds.mean(axis=1)  # tokens/s, before the autoscaler moves
        return np.ascontiguousarray(np.maximum(np.repeat(capacity_seconds, SUB_PER_PROFILE, axis=1).T, 1e-6))

    def _advance_retries(self) -> np.ndarray:
        """Shift the retry look-ahead by one interval: slot 0 is the first sub-step of this interval."""
        retries = self.retries
        retries[:RETRY_SLOTS] = retries[SUBSTEPS:].copy()
        retries[RETRY_SLOTS:] = 0.0
        return retries

    def _throttled_delay_sub(self) -> np.ndarray:
        """Sub-steps until a throttled client retries, (N,): Retry-After if honoured, else retry_delay_s.

        Retry-After is whole seconds (>= 1) until one more token; the rate is fixed for the interval.
        """
        retry_after_sub = np.maximum(np.ceil(wait_us(MICRO, self.rate) / MICRO), 1.0) / SUBSTEP_S
        delay_sub = np.where(self.p["honour_retry_after"] > 0, retry_after_sub, self.client_delay_sub)
        return np.clip(delay_sub, 1, RETRY_SLOTS - 1).astype(np.int64)

    def _bucket(self, asked: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Refill the bucket for one sub-step and admit what its tokens pay for (`limiter.bucket` arithmetic).

        Tokens are split between light and heavy requests in proportion to what they ask. Integer
        µtokens hold whole numbers exactly, and int64 also divides faster than float. Returns
        (admitted requests (2, N), asked µtokens (N,), admitted µtokens (2, N)).
        """
        now_us = self.clock_us + SUBSTEP_US
        tokens_ut = refill(self.tokens_ut, self.clock_us, now_us, self.rate, self.bucket_cap_ut).astype(np.int64)
        self.clock_us = now_us
        cost_ut = self.cost_ut
        asked_by_class_ut = asked * cost_ut
        asked_ut = asked_by_class_ut[LIGHT] + asked_by_class_ut[HEAVY]
        budget_ut = self.budget_ut
        budget_ut[LIGHT] = tokens_ut * asked_by_class_ut[LIGHT] / np.maximum(asked_ut, 1.0)  # truncates: never more than the share
        budget_ut[HEAVY] = tokens_ut - budget_ut[LIGHT]
        admitted = admit_count(budget_ut, asked, cost_ut)
        admitted_ut = admitted * cost_ut
        self.tokens_ut = (tokens_ut - admitted_ut[LIGHT] - admitted_ut[HEAVY]).astype(np.int64)
        return admitted, asked_ut, admitted_ut

    def _queue(self, admitted_tokens: np.ndarray, capacity_tps: np.ndarray, inv_max_queue: np.ndarray) -> Queued:
        """One sub-step of the fluid FIFO queue of work (tokens), served at a capacity a long queue erodes.

        The queue sees admitted work smoothed over QUEUE_TAU_S: the worker pool absorbs Poisson lumps
        (the service tail models those), only a sustained excess builds a backlog.
        """
        backend, queue = self.backend, self.queue
        capacity_tps = capacity_tps * (1.0 - backend.collapse * np.minimum(queue * inv_max_queue, 1.0))
        self.inflow += INFLOW_STEP * (admitted_tokens - self.inflow)
        inflow = self.inflow
        overflow = np.maximum(queue + inflow - capacity_tps * backend.timeout_s, 0.0)  # would wait past the timeout
        joined_share = 1.0 - overflow / np.maximum(inflow, 1e-12)
        start_s = backend.min_latency_s + np.minimum(queue / capacity_tps, backend.timeout_s)
        queue = queue + (inflow - overflow)
        served_tokens = np.minimum(queue, capacity_tps * SUBSTEP_S)
        self.queue = queue - served_tokens
        return Queued(capacity_tps, joined_share, start_s, served_tokens)

    def _service_tail(self, admitted_tokens: np.ndarray, capacity_tps: np.ndarray) -> np.ndarray:
        """Mean (s) of the exponential service tail: the utilisation curve's p99 at the smoothed utilisation."""
        self.util += UTIL_STEP * (admitted_tokens / (capacity_tps * SUBSTEP_S) - self.util)
        rho = np.minimum(self.util, self.backend.rho_cap)
        rho_k = knee_power(rho) if self.knee_k is None else np.power(rho, self.knee_k)
        return self.backend.tail_scale_s * ((1.0 - MIN_LATENCY_SHARE) + self.backend.knee_a * rho_k / (1.0 - rho))

    def _latency(self, admitted_requests: np.ndarray, queued: Queued, theta_s: np.ndarray) -> Latency:
        """Latency = start + Exp(theta): the share within the SLO, and the errors (dropped, timed out, base rate)."""
        backend = self.backend
        inv_theta = 1.0 / theta_s
        joined = admitted_requests * queued.joined_share
        p_in_slo = 1.0 - np.exp(-np.clip((backend.slo_s - queued.start_s) * inv_theta, 0.0, MAX_EXPONENT))
        p_timeout = np.exp(-np.clip((backend.timeout_s - queued.start_s) * inv_theta, 0.0, MAX_EXPONENT))
        errors = admitted_requests - joined * (1.0 - np.minimum(p_timeout + backend.base_error_rate, 1.0))
        onset_share = None
        if self.error_onset:  # a calibrated backend fails at least this share near its onset (the queue's drops count toward it)
            exponent = np.clip(-backend.onset_slope * (self.util - backend.onset_util), -MAX_EXPONENT, MAX_EXPONENT)
            onset_share = np.where(backend.onset_slope > 0, 1.0 / (1.0 + np.exp(exponent)), 0.0)
            errors = np.maximum(errors, admitted_requests * onset_share)
        return Latency(joined, p_in_slo, errors, onset_share)

    def _record(
        self,
        k: int,
        admitted_tokens: np.ndarray,
        asked_ut: np.ndarray,
        admitted_requests: np.ndarray,
        queued: Queued,
        theta_s: np.ndarray,
        latency: Latency,
    ) -> None:
        """Write sub-step k's row of the record."""
        record = self.record
        record[ADMITTED_TOKENS, k] = admitted_tokens
        record[THROTTLED_TOKENS, k] = asked_ut * (1.0 / MICRO) - admitted_tokens
        record[FINISHED, k] = admitted_requests
        record[ERRORS, k] = latency.errors
        record[JOINED, k] = latency.joined
        record[START_S, k] = queued.start_s
        record[THETA_S, k] = theta_s
        record[CPU, k] = queued.served_tokens / (queued.capacity_tps * SUBSTEP_S)
        no_error = 1.0 - self.backend.base_error_rate
        good_share = queued.joined_share * latency.p_in_slo * no_error
        if latency.onset_share is not None:
            good_share = np.minimum(good_share, 1.0 - latency.onset_share)
        record[GOOD_TOKENS, k] = admitted_tokens * good_share

    def _autoscale(self) -> None:
        """HPA-like scaling: desired replicas from this interval's CPU take effect hpa_delay intervals later."""
        p = self.p
        on = p["autoscale"] > 0
        if not np.any(on):
            return
        cpu = self.hist[CPU, :, SUBSTEPS:].mean(axis=1)
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
        out = {key: sums[i] for i, key in enumerate(RECORD_KEYS)}
        out["cpu"] = out["cpu"] / SUBSTEPS
        # latency: each sub-step's requests are start + Exp(theta); timed-out ones a point mass at the
        # timeout (a served request never waits longer: the client has left)
        timed_out = out["finished"] - out["joined"]
        timeout_ms = self.p["timeout_s"][:, None] * 1000.0
        # pairs of sub-steps merged (weighted means of start and tail): half the work, same p99 to ~1 %
        w = took[JOINED].reshape(self.n, -1, 2)
        pair_w = w.sum(axis=2)
        share = np.divide(w, pair_w[:, :, None], out=np.full(w.shape, 0.5), where=pair_w[:, :, None] > 0)
        pair_start = (took[START_S].reshape(w.shape) * share).sum(axis=2) * 1000.0
        pair_theta = (took[THETA_S].reshape(w.shape) * share).sum(axis=2) * 1000.0
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

