"""Scenario library: named generators of simulated worlds, trace replay, suites and seed hygiene.

A scenario turns (name, seed) into an `Episode`: world parameters (domain-randomised: capacity,
SLO, latency, timeout, noise, scrape lag, retry behaviour, the operator's reference rate, ...) and
per-second profiles of demand, capacity and heavy share. Load is drawn relative to the capacity
(1.0 = demand equal to capacity in tokens/s) and converted to requests/s.

Hold-out rules for training vs evaluation:
* seeds: evaluation uses seeds 0, 1, 2, ...; training must draw its seeds from
  `TRAIN_SEED_OFFSET` upwards (`train_seeds(n)`), so no evaluated world was seen in training;
* traces: `trace:NAME` cuts its window from the first `TRAIN_SHARE` of a packaged trace with
  split="train" and from the rest with split="eval" (the default and what suite `traces` uses);
* shapes: suite `unseen` (`training.unseen`, written apart from these generators, with other shapes
  and parameters) is never trained on; it measures how the policy does in worlds nobody listed here.

The library (suite `default`, what training samples) covers demand shapes (steady, diurnal, flash
crowd, agent bursts and agent-like clients, retry storm, heavy mix, autoscaling lag) and capacity
that steps, flaps and drifts at time scales from seconds to minutes, partial outages of a share of
the fleet, capacity cuts that coincide with demand peaks, and `mixed_world`, any demand shape times
any capacity dynamics, every parameter drawn broadly.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import numpy as np

from training.calibration import Calibration
from training.sim import INTERVAL_S, Episode, WorldParams, mean_cost
from training.traces import PACKAGED_TRACES, TRAIN_SHARE, Trace, packaged_trace
from training.unseen import UNSEEN

DEFAULT_STEPS = 120  # control intervals per episode (10 minutes)
TRAIN_SEED_OFFSET = 1_000_000  # training seeds start here; evaluation seeds are small numbers
TRACE_PREFIX = "trace:"
MAX_TRACE_STEPS = 720  # a trace file longer than an hour is cut to its first hour
TRACE_CAPACITY_SHARE = 0.5  # training windows of the packaged traces that also get a changing capacity

Profile = tuple[np.ndarray, np.ndarray, np.ndarray]  # load (x capacity), capacity factor, heavy share
Generator = Callable[[np.random.Generator, int, bool], tuple[Profile, dict[str, object]]]


def sample_params(rng: np.random.Generator, randomize: bool = True) -> WorldParams:
    """World parameters: the nominal world, or a domain-randomised one drawn from rng."""
    if not randomize:
        return WorldParams()
    capacity = float(np.exp(rng.uniform(np.log(200.0), np.log(5000.0))))
    base_latency = float(rng.uniform(20.0, 80.0))
    return WorldParams(
        capacity_tokens=capacity,
        slo_ms=base_latency * float(rng.uniform(3.0, 8.0)),
        error_budget=float(rng.uniform(0.005, 0.02)),
        timeout_s=float(rng.uniform(2.0, 6.0)),
        base_latency_ms=base_latency,
        heavy_cost=float(rng.integers(2, 9)),
        burst_s=float(rng.uniform(0.2, 1.0)),
        retry_p_throttled=float(rng.uniform(0.2, 0.8)),
        retry_p_error=float(rng.uniform(0.2, 0.7)),
        retry_delay_s=float(rng.uniform(0.5, 2.0)),
        noise=float(rng.uniform(0.0, 0.15)),
        lag_s=float(rng.uniform(0.0, 3.0)),
        p_missing=float(rng.uniform(0.0, 0.02)),
        reference_rate=capacity * float(rng.uniform(0.6, 1.2)),
        collapse=float(rng.uniform(0.1, 0.5)),
        base_error_rate=float(rng.uniform(0.0, 0.003)),
    )


# -- profile helpers ----------------------------------------------------------------------------
def _wiggle(rng: np.random.Generator, seconds: int, sigma: float = 0.05, tau_s: float = 10.0) -> np.ndarray:
    """Multiplicative AR(1) noise around 1 with the given stationary sigma and correlation time."""
    phi = np.exp(-1.0 / tau_s)
    shocks = rng.standard_normal(seconds) * sigma * np.sqrt(1 - phi**2)
    x = np.empty(seconds)
    x[0] = rng.standard_normal() * sigma
    for i in range(1, seconds):
        x[i] = phi * x[i - 1] + shocks[i]
    return np.exp(x)


def _heavy0(rng: np.random.Generator, randomize: bool) -> float:
    return float(rng.uniform(0.02, 0.2)) if randomize else 0.1


def _flat(seconds: int, value: float) -> np.ndarray:
    return np.full(seconds, value, dtype=np.float64)


# -- the named scenarios (load is relative to the capacity in tokens/s) ---------------------------
def steady(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """Constant load between 0.5x and 1.4x capacity with small correlated wiggles."""
    load = rng.uniform(0.5, 1.4) * _wiggle(rng, seconds)
    return (load, _flat(seconds, 1.0), _flat(seconds, _heavy0(rng, randomize))), {}


def diurnal(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """A day compressed into the episode: a cosine between a trough and a peak above capacity."""
    lo, hi, phase = rng.uniform(0.2, 0.5), rng.uniform(1.1, 1.8), rng.uniform(0, 1)
    t = np.arange(seconds) / seconds
    load = (lo + (hi - lo) * (1 - np.cos(2 * np.pi * (t + phase))) / 2) * _wiggle(rng, seconds)
    return (load, _flat(seconds, 1.0), _flat(seconds, _heavy0(rng, randomize))), {}


def flash_crowd(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """The seeds' benchmark: 10x the base load for 10 s at a random moment."""
    base = rng.uniform(0.3, 0.8)
    load = base * _wiggle(rng, seconds)
    start = int(rng.uniform(0.2, 0.6) * seconds)
    load[start : start + 10] *= 10.0
    return (load, _flat(seconds, 1.0), _flat(seconds, _heavy0(rng, randomize))), {}


def agent_bursts(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """AI agents: trains of 3-8 short bursts (1-3 s at 3-8x) every 30-90 s on a low base load."""
    load = rng.uniform(0.2, 0.5) * _wiggle(rng, seconds)
    t = int(rng.uniform(5, 30))
    while t < seconds:
        at = t
        for _ in range(int(rng.integers(3, 9))):
            length = int(rng.integers(1, 4))
            load[at : at + length] *= rng.uniform(3.0, 8.0)
            at += length + int(rng.integers(1, 5))
        t += int(rng.uniform(30, 90))
    return (load, _flat(seconds, 1.0), _flat(seconds, _heavy0(rng, randomize))), {}


def capacity_drop(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """A node fails in the middle of a traffic spike: capacity falls to 30-60 % for 30-120 s."""
    load = rng.uniform(0.5, 0.8) * _wiggle(rng, seconds)
    spike_at, spike_len = int(rng.uniform(0.3, 0.5) * seconds), int(rng.uniform(60, 120))
    load[spike_at : spike_at + spike_len] *= rng.uniform(1.5, 2.5)
    capacity = _flat(seconds, 1.0)
    drop_at = spike_at + int(rng.uniform(0.2, 0.5) * spike_len)
    capacity[drop_at : drop_at + int(rng.uniform(30, 120))] = rng.uniform(0.3, 0.6)
    return (load, capacity, _flat(seconds, _heavy0(rng, randomize))), {}


def slow_degradation(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """A leak or a noisy neighbour: capacity declines linearly to 30-50 % under a steady load."""
    load = rng.uniform(0.6, 1.0) * _wiggle(rng, seconds)
    start, floor = int(rng.uniform(0.0, 0.3) * seconds), rng.uniform(0.3, 0.5)
    t = np.arange(seconds)
    capacity = np.where(t < start, 1.0, 1.0 - (1.0 - floor) * (t - start) / max(seconds - start, 1))
    return (load, capacity, _flat(seconds, _heavy0(rng, randomize))), {}


def retry_storm(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """A spike whose clients retry almost everything at once and ignore Retry-After."""
    load = rng.uniform(0.5, 0.8) * _wiggle(rng, seconds)
    at = int(rng.uniform(0.2, 0.5) * seconds)
    load[at : at + int(rng.uniform(15, 40))] *= rng.uniform(2.0, 4.0)
    overrides: dict[str, object] = {
        "retry_p_throttled": 0.95,
        "retry_p_error": 0.9,
        "honour_retry_after": False,
        "retry_delay_s": float(rng.uniform(0.2, 0.5)),
    }
    return (load, _flat(seconds, 1.0), _flat(seconds, _heavy0(rng, randomize))), overrides


def heavy_mix(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """The request count stays, but the share of heavy requests jumps, so the work per second soars."""
    h0, h1 = rng.uniform(0.02, 0.1), rng.uniform(0.4, 0.6)
    at = int(rng.uniform(0.3, 0.6) * seconds)
    heavy = np.where(np.arange(seconds) < at, h0, h1)
    return (rng.uniform(0.5, 0.8) * _wiggle(rng, seconds), _flat(seconds, 1.0), heavy), {"_requests_fixed_at": h0}


def autoscaling_lag(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """Demand ramps to 2-3x the starting capacity; an HPA adds replicas, each after a 30-90 s delay."""
    start, end = rng.uniform(0.5, 0.8), rng.uniform(2.0, 3.0)
    ramp_at, ramp_len = int(rng.uniform(0.1, 0.3) * seconds), int(rng.uniform(0.2, 0.5) * seconds)
    t = np.arange(seconds)
    load = (start + (end - start) * np.clip((t - ramp_at) / ramp_len, 0, 1)) * _wiggle(rng, seconds)
    replicas = int(rng.integers(2, 6))
    overrides: dict[str, object] = {
        "autoscale": True,
        "replicas": replicas,
        "max_replicas": 4 * replicas,
        "hpa_target_cpu": float(rng.uniform(0.6, 0.8)),
        "hpa_delay_s": float(rng.uniform(30.0, 90.0)),
    }
    return (load, _flat(seconds, 1.0), _flat(seconds, _heavy0(rng, randomize))), overrides


# -- capacity dynamics at many time scales (issue 18): the backend changes while the policy runs -------
def _dwell_times(rng: np.random.Generator, seconds: int, lo_s: float, hi_s: float) -> np.ndarray:
    """Change points: gaps drawn log-uniform in [lo_s, hi_s] seconds, from 0 to the end."""
    gaps = np.exp(rng.uniform(np.log(lo_s), np.log(hi_s), size=seconds // int(lo_s) + 2)).astype(int) + 1
    points = np.cumsum(gaps)
    return points[points < seconds]


def _piecewise(rng: np.random.Generator, seconds: int, points: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A level per segment between change points, drawn uniformly in [lo, hi]."""
    levels = rng.uniform(lo, hi, size=points.size + 1)
    return levels[np.searchsorted(points, np.arange(seconds), side="right")]


def _demand_shape(rng: np.random.Generator, seconds: int) -> np.ndarray:
    """A random demand (x capacity): steady, ramps, bursts or peaks, at a random mean load."""
    kind = int(rng.integers(0, 4))
    t = np.arange(seconds)
    if kind == 0:
        load = _flat(seconds, 1.0)
    elif kind == 1:
        load = 1.0 + rng.uniform(-0.5, 0.8) * np.clip((t - rng.uniform(0, seconds)) / rng.uniform(20, 200), 0, 1)
    elif kind == 2:
        load = _piecewise(rng, seconds, _dwell_times(rng, seconds, 3.0, 60.0), 0.4, 2.0)
    else:
        load = 1.0 + rng.uniform(0.5, 2.5) * np.exp(-(((t - rng.uniform(0, seconds)) / rng.uniform(5, 60)) ** 2))
    return rng.uniform(0.4, 1.3) * load * _wiggle(rng, seconds, sigma=rng.uniform(0.02, 0.2), tau_s=rng.uniform(2, 30))


def capacity_steps(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """Capacity jumps between levels (0.25-1.3x) that last from a few seconds to minutes."""
    lo_s = float(np.exp(rng.uniform(np.log(3.0), np.log(60.0))))
    capacity = _piecewise(rng, seconds, _dwell_times(rng, seconds, lo_s, 8 * lo_s), 0.25, 1.3)
    return (_demand_shape(rng, seconds), capacity, _flat(seconds, _heavy0(rng, randomize))), {}


def capacity_flaps(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """Capacity flaps between two levels with a period of 4 s to 3 min and a random duty cycle."""
    period = float(np.exp(rng.uniform(np.log(4.0), np.log(180.0))))
    low, duty = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
    phase = (np.arange(seconds) / period + rng.uniform(0, 1)) % 1.0
    capacity = np.where(phase < duty, low, rng.uniform(0.9, 1.2))
    return (_demand_shape(rng, seconds), capacity, _flat(seconds, _heavy0(rng, randomize))), {}


def capacity_drift(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """Capacity wanders (log-normal AR(1), sigma 0.15-0.6) with a correlation time of 3 s to 5 min."""
    tau = float(np.exp(rng.uniform(np.log(3.0), np.log(300.0))))
    capacity = np.clip(_wiggle(rng, seconds, sigma=rng.uniform(0.15, 0.6), tau_s=tau) * rng.uniform(0.7, 1.1), 0.15, 2.0)
    return (_demand_shape(rng, seconds), capacity, _flat(seconds, _heavy0(rng, randomize))), {}


def partial_outage(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """A fleet of 2-12 replicas loses some of them, one incident after another (each 5 s to 4 min)."""
    replicas = int(rng.integers(2, 13))
    alive = np.full(seconds, float(replicas))
    for _ in range(int(rng.integers(1, 5))):
        at, length = int(rng.uniform(0, seconds)), int(np.exp(rng.uniform(np.log(5.0), np.log(240.0))))
        alive[at : at + length] -= int(rng.integers(1, replicas))
    capacity = np.clip(alive / replicas, 0.1, None)  # a whole-fleet outage still leaves a trickle (a fallback)
    return (_demand_shape(rng, seconds), capacity, _flat(seconds, _heavy0(rng, randomize))), {}


def peak_with_cut(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """Demand peaks (1.3-3x for 10-120 s) and the capacity falls (to 0.3-0.8) within seconds of each peak."""
    load = rng.uniform(0.4, 0.9) * _wiggle(rng, seconds)
    capacity = _flat(seconds, 1.0)
    for _ in range(int(rng.integers(1, 4))):
        at, length = int(rng.uniform(0, 0.9) * seconds), int(rng.uniform(10, 120))
        load[at : at + length] *= rng.uniform(1.3, 3.0)
        cut_at = max(0, at + int(rng.uniform(-10, 20)))
        capacity[cut_at : cut_at + int(rng.uniform(10, 150))] *= rng.uniform(0.3, 0.8)
    return (load, capacity, _flat(seconds, _heavy0(rng, randomize))), {}


def agent_clients(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """Many agent-like clients, each on for a heavy-tailed while at a high rate, heavier requests; capacity may step."""
    load = rng.uniform(0.1, 0.4) * _wiggle(rng, seconds)
    for _ in range(int(rng.integers(5, 60))):
        at, length = int(rng.uniform(0, seconds)), int(min(rng.pareto(1.5) * 3 + 1, 120))
        load[at : at + length] += rng.uniform(0.05, 1.0) * rng.uniform(0.5, 1.5, size=len(load[at : at + length]))
    heavy = np.clip(_heavy0(rng, randomize) + rng.uniform(0, 0.3) * (load > np.median(load)), 0.0, 0.8)
    capacity = _piecewise(rng, seconds, _dwell_times(rng, seconds, 20.0, 200.0), 0.5, 1.1) if rng.random() < 0.5 else _flat(seconds, 1.0)
    overrides: dict[str, object] = {"retry_p_throttled": float(rng.uniform(0.5, 0.95)), "retry_delay_s": float(rng.uniform(0.2, 2.0))}
    return (load, capacity, heavy), overrides


def mixed_world(rng: np.random.Generator, seconds: int, randomize: bool) -> tuple[Profile, dict[str, object]]:
    """Any library demand times any capacity dynamics above: the combinations nobody listed."""
    (load, _, heavy), overrides = DEMAND_SHAPES[int(rng.integers(0, len(DEMAND_SHAPES)))](rng, seconds, randomize)
    (_, capacity, _), _ = CAPACITY_SHAPES[int(rng.integers(0, len(CAPACITY_SHAPES)))](rng, seconds, randomize)
    overrides.pop("autoscale", None)
    return (load, capacity, heavy), overrides


SCENARIOS: dict[str, Generator] = {
    "steady": steady,
    "diurnal": diurnal,
    "flash_crowd": flash_crowd,
    "agent_bursts": agent_bursts,
    "capacity_drop": capacity_drop,
    "slow_degradation": slow_degradation,
    "retry_storm": retry_storm,
    "heavy_mix": heavy_mix,
    "autoscaling_lag": autoscaling_lag,
    "capacity_steps": capacity_steps,
    "capacity_flaps": capacity_flaps,
    "capacity_drift": capacity_drift,
    "partial_outage": partial_outage,
    "peak_with_cut": peak_with_cut,
    "agent_clients": agent_clients,
    "mixed_world": mixed_world,
}
DEMAND_SHAPES: tuple[Generator, ...] = (steady, diurnal, flash_crowd, agent_bursts, retry_storm, heavy_mix)
CAPACITY_SHAPES: tuple[Generator, ...] = (capacity_steps, capacity_flaps, capacity_drift, partial_outage, slow_degradation)
GENERATORS: dict[str, Generator] = SCENARIOS | UNSEEN  # everything make_episode knows; training uses SCENARIOS only
SUITES: dict[str, tuple[str, ...]] = {
    "default": tuple(SCENARIOS),
    "traces": tuple(TRACE_PREFIX + name for name in PACKAGED_TRACES),
    "unseen": tuple(UNSEEN),
}
SUITES["all"] = SUITES["default"] + SUITES["traces"]
TRAINABLE_SUITES = ("default", "traces", "all")  # `unseen` measures generalisation: never trained on


_CALIBRATION: list[Calibration] = []  # the calibration in force (`calibrated_worlds`), at most one


@contextmanager
def calibrated_worlds(calibration: Calibration | None) -> Iterator[None]:
    """Inside, every episode made here has the calibrated backend's service model (None: unchanged).

    Training and evaluation build their episodes through this module, so one `with` around a run
    (`ratepilot train --calibration`, `ratepilot evaluate --calibration`) calibrates all its worlds.
    """
    if calibration is None:
        yield
        return
    _CALIBRATION.append(calibration)
    try:
        yield
    finally:
        _CALIBRATION.pop()


def _calibrated(episode: Episode) -> Episode:
    """The episode in the calibrated backend, if one is in force; demand keeps its share of the capacity."""
    if not _CALIBRATION:
        return episode
    params = _CALIBRATION[-1].apply(episode.params)
    ratio = params.capacity_tokens / episode.params.capacity_tokens
    return replace(episode, params=params, demand_rps=episode.demand_rps * ratio)


def train_seeds(n: int, start: int = 0) -> list[int]:
    """Seeds reserved for training (never used by evaluation, which counts from 0)."""
    return [TRAIN_SEED_OFFSET + start + i for i in range(n)]


def scenario_names(suite: str) -> tuple[str, ...]:
    """The scenario names of a suite; KeyError with the choices for an unknown suite."""
    if suite not in SUITES:
        raise KeyError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    return SUITES[suite]


def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]))


def _episode(
    name: str, seed: int, params: WorldParams, load: np.ndarray, capacity: np.ndarray, heavy: np.ndarray, request_heavy: float | None = None
) -> Episode:
    """Turn a token load (x capacity) into requests/s; `request_heavy` fixes the request count instead."""
    per_request = mean_cost(heavy if request_heavy is None else request_heavy, params.heavy_cost)
    demand = load * params.capacity_tokens / per_request
    return Episode(name, int(seed), params, demand, capacity.astype(np.float64), heavy.astype(np.float64))


def make_episode(
    name: str, seed: int, steps: int = DEFAULT_STEPS, randomize: bool = True, split: str = "eval"
) -> Episode:
    """The episode of a named scenario (or `trace:NAME`) for a seed; the same inputs give the same episode."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    seconds = int((steps + 1) * INTERVAL_S)
    rng = _rng(name, seed)
    params = sample_params(rng, randomize)
    if name.startswith(TRACE_PREFIX):
        return _calibrated(_packaged_trace_episode(name, seed, rng, params, seconds, randomize, split))
    if name not in GENERATORS:
        raise KeyError(f"unknown scenario {name!r}; choose from {', '.join(GENERATORS)} or trace:NAME")
    (load, capacity, heavy), overrides = GENERATORS[name](rng, seconds, randomize)
    request_heavy = overrides.pop("_requests_fixed_at", None)
    params = replace(params, **overrides) if overrides else params  # type: ignore[arg-type]
    return _calibrated(_episode(name, seed, params, load, capacity, heavy, request_heavy))  # type: ignore[arg-type]


def make_episodes(
    names: Iterable[str], seeds: Iterable[int], steps: int = DEFAULT_STEPS, randomize: bool = True, split: str = "eval"
) -> list[Episode]:
    """Episodes for every (name, seed), name-major: [n0 s0, n0 s1, ..., n1 s0, ...]."""
    seed_list = list(seeds)
    return [make_episode(name, seed, steps, randomize, split) for name in names for seed in seed_list]


def _rescaled(demand: np.ndarray, capacity_tokens: float, per_request: np.ndarray, peak_load: float) -> np.ndarray:
    """Demand scaled so that its 99th percentile is peak_load x capacity (in tokens/s)."""
    tokens = demand * per_request
    top = float(np.quantile(tokens, 0.99)) or float(tokens.max())
    if top <= 0:
        return demand.copy()
    return demand * peak_load * capacity_tokens / top


def _packaged_trace_episode(
    name: str, seed: int, rng: np.random.Generator, params: WorldParams, seconds: int, randomize: bool, split: str
) -> Episode:
    trace_name = name[len(TRACE_PREFIX) :]
    trace = packaged_trace(trace_name)
    cut = TRAIN_SHARE * trace.duration_s
    if split == "train":
        lo, hi = 0.0, cut
    elif split == "eval":
        lo, hi = cut, trace.duration_s
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    latest = hi - seconds
    if latest < lo:
        raise ValueError(f"trace {trace_name!r} {split} part is shorter than {seconds} s")
    start = float(np.floor(rng.uniform(lo, latest)))
    demand, _, heavy_col = trace.per_second(start, seconds)
    heavy = heavy_col if heavy_col is not None else _flat(seconds, _heavy0(rng, randomize))
    peak = float(rng.uniform(1.1, 2.0)) if randomize else 1.5
    per_request = mean_cost(heavy, params.heavy_cost)
    demand = _rescaled(demand, params.capacity_tokens, per_request, peak)
    capacity = _flat(seconds, 1.0)
    if split == "train" and randomize and rng.random() < TRACE_CAPACITY_SHARE:  # drawn last: eval windows unchanged
        (_, capacity, _), _ = CAPACITY_SHAPES[int(rng.integers(0, len(CAPACITY_SHAPES)))](rng, seconds, randomize)
    return Episode(name, int(seed), params, demand, capacity, heavy, (start, start + seconds))


def trace_episode(
    trace: Trace, seed: int, randomize: bool = False, max_steps: int = MAX_TRACE_STEPS, steps: int | None = None
) -> Episode:
    """Replay a trace file from its start.

    With a `capacity_rps` column the rates are used as they are; without one the demand is rescaled
    so that its 99th percentile is 1.5x (randomised: 1.1-2x) the world's capacity.
    """
    available = int(trace.duration_s // INTERVAL_S) - 1
    if available < 1:
        raise ValueError(f"{trace.name}: a trace must cover at least {2 * INTERVAL_S:g} s")
    steps = min(available, max_steps) if steps is None else min(steps, available)
    seconds = int((steps + 1) * INTERVAL_S)
    rng = _rng(trace.name, seed)
    params = sample_params(rng, randomize)
    demand, capacity_rps, heavy_col = trace.per_second(0.0, seconds)
    heavy = heavy_col if heavy_col is not None else _flat(seconds, _heavy0(rng, randomize))
    per_request = mean_cost(heavy, params.heavy_cost)
    if capacity_rps is not None:
        capacity_tok = capacity_rps * per_request
        nominal = float(np.median(capacity_tok)) or float(capacity_tok.max()) or 1.0
        params = replace(params, capacity_tokens=nominal, reference_rate=nominal * params.reference_rate / params.capacity_tokens)
        return _calibrated(Episode(trace.name, int(seed), params, demand, capacity_tok / nominal, heavy))
    peak = float(rng.uniform(1.1, 2.0)) if randomize else 1.5
    demand = _rescaled(demand, params.capacity_tokens, per_request, peak)
    return _calibrated(Episode(trace.name, int(seed), params, demand, _flat(seconds, 1.0), heavy))


def describe(names: Sequence[str]) -> dict[str, str]:
    """One line per scenario name (the generator's docstring)."""
    out = {}
    for name in names:
        gen = GENERATORS.get(name)
        out[name] = (gen.__doc__ or "").strip() if gen else f"a held-out window of the packaged trace {name}"
    return out
