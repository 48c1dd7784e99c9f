"""The demo's world replayed in the simulator, and the real loop's decisions set beside it tick by tick.

`simulate` plays a demo schedule (per-second demand and backend capacity) in `training.sim.BatchSim`
as one world shaped like the demo's backend (`demo_world`: the nominal capacity, the idle p99 of
its exponential service times, its timeout, an open-loop load that never retries) with the same
policy inside the same safety engine the demo's controller runs, and returns every tick's
observation vector next to the true figures. `read_decisions` reads what the real controller saw
and did (the run's `decisions.jsonl`, `controller/decisions.py`). `comparison_plot` draws the
observation columns of both, tick by tick, so one sees which column parts (scale, lag, smoothing).

What the simulated world does not copy (docs/evaluation.md, "The real loop"): the synthetic backend
slows every request when its capacity drops, where the simulator keeps the latency and lowers the
throughput, and its small worker pool's p99 climbs from about half load, where the simulator's
latency curve stays flat to ~85 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import orjson

from controller.settings import settings_from_mapping
from policy.base import Policy
from policy.observation import (
    ADMITTED_OVER_RATE,
    CAPACITY_AGE,
    CPU,
    LN_CAPACITY_OVER_RATE,
    OBS_FIELDS,
    P99_OVER_SLO,
    THROTTLED_OVER_RATE,
)
from policy.registry import make_policy
from policy.safety import SafePolicy, SafetyEngine, SafetyLimits
from ratepilot.demo.schedule import LoadSchedule
from ratepilot.demo.stack import StackSettings, controller_config
from ratepilot.demo.summary import recovery_seconds
from training.sim import BatchSim
from training.world import INTERVAL_S, PROFILE_PER_INTERVAL, Episode, WorldParams

LN100 = math.log(100.0)
COMPARED = (P99_OVER_SLO, CPU, ADMITTED_OVER_RATE, THROTTLED_OVER_RATE, LN_CAPACITY_OVER_RATE, CAPACITY_AGE)


@dataclass(frozen=True)
class Ticks:
    """One loop's ticks: time (s from the start of the load), the rate in force, the rate set, the observation vectors."""

    t_s: np.ndarray  # (T,)
    rate_in_force: np.ndarray  # (T,) tokens/s the observation was taken under
    rate: np.ndarray  # (T,) tokens/s set for the next interval
    vector: np.ndarray  # (T, OBS_DIM)
    rules: tuple[tuple[str, ...], ...] = ()  # the safety rules that fired per tick


@dataclass(frozen=True)
class Simulated:
    """The simulator's run of a demo schedule: its ticks and its goodput ratio (the `ratepilot evaluate` measure)."""

    ticks: Ticks
    goodput_ratio: float
    slo_violation_frac: float
    recovery_s: float  # `ratepilot.demo.summary.recovery_seconds` of the ticks' rates

    def to_dict(self) -> dict[str, float | None]:
        """The figures for the demo's JSON (NaN as null)."""
        figures = {"goodput_ratio": self.goodput_ratio, "slo_violation_frac": self.slo_violation_frac, "recovery_s": self.recovery_s}
        return {key: None if math.isnan(value) else round(value, 6) for key, value in figures.items()}


def demo_world(nominal_capacity_rps: float, slo_ms: float, mean_service_s: float, timeout_s: float, burst_s: float) -> WorldParams:
    """WorldParams of the demo's synthetic backend and load: light requests only, no retries, no autoscaling."""
    return WorldParams(
        capacity_tokens=nominal_capacity_rps,
        slo_ms=slo_ms,
        timeout_s=timeout_s,
        base_latency_ms=mean_service_s * LN100 * 1000.0,  # the idle p99 of exponential service times
        heavy_cost=1.0,
        burst_s=burst_s,
        retry_p_throttled=0.0,  # the demo's load generator is open loop: a 429 is not retried
        retry_p_error=0.0,
        reference_rate=nominal_capacity_rps,  # the static rate = the nominal capacity
        collapse=0.0,  # the worker pool refuses past its queue limit instead of thrashing
        base_error_rate=0.0,
    )


def demo_episode(schedule: LoadSchedule, params: WorldParams, seed: int = 0) -> Episode:
    """The schedule as one simulated episode (cut to whole control intervals)."""
    seconds = schedule.duration_s // PROFILE_PER_INTERVAL * PROFILE_PER_INTERVAL
    if seconds < 2 * PROFILE_PER_INTERVAL:
        raise ValueError(f"a schedule of {schedule.duration_s} s is shorter than two control intervals")
    demand = np.asarray(schedule.demand_rps[:seconds], dtype=np.float64)
    capacity = np.asarray(schedule.capacity_rps[:seconds], dtype=np.float64) / params.capacity_tokens
    return Episode(schedule.name, seed, params, demand, capacity, np.zeros(seconds))


def simulate(episode: Episode, policy: Policy, limits: SafetyLimits) -> Simulated:
    """Play the episode with `policy` clamped by the safety engine, as the controller runs it."""
    safe = SafePolicy(policy, SafetyEngine(limits))
    safe.reset()
    sim = BatchSim([episode])
    obs = sim.reset()
    t, in_force, rates, vectors, rules, goodput, bound, violated = [], [], [], [], [], 0.0, 0.0, []
    for step in range(sim.steps):
        result = safe.decide(obs)
        t.append((step + 1) * INTERVAL_S)
        in_force.append(float(obs.rate[0]))
        rates.append(float(result.rates[0]))
        vectors.append(obs.vector[0].copy())
        rules.append(tuple(result.fired_rules(0)))
        obs, _reward, _done, info = sim.step(result.rates)
        goodput += float(info["goodput_tokens"][0])
        bound += float(info["bound_tokens"][0])
        violated.append(bool(info["slo_violated"][0]))
    ticks = Ticks(np.array(t), np.array(in_force), np.array(rates), np.array(vectors), tuple(rules))
    # the rate set at a tick is in force for the next interval's seconds
    seconds = np.arange(ticks.t_s.size * int(INTERVAL_S)) + int(INTERVAL_S)
    per_second = np.repeat(ticks.rate, int(INTERVAL_S))
    recovery = recovery_seconds(seconds, per_second, episode.capacity_factor * episode.params.capacity_tokens)
    return Simulated(ticks, goodput / bound if bound > 0 else math.nan, float(np.mean(violated)), recovery)


def simulate_demo(schedule: LoadSchedule, settings: StackSettings) -> Simulated:
    """The demo's schedule in the simulator with the demo's policy and the safety limits of its controller's config."""
    capacity = settings.nominal_capacity_rps
    mean_service_s = settings.workers / capacity  # the synthetic backend's pool serves `capacity` with `workers`
    params = demo_world(capacity, settings.slo_ms, mean_service_s, settings.backend_timeout_s, settings.burst_s)
    policy = make_policy("rl", spec=settings.model) if settings.policy == "rl" else make_policy(settings.policy)
    # the safety limits of the demo controller's own config, with one tier (the simulated world is one)
    config = controller_config("redis://127.0.0.1:6379/0", "http://127.0.0.1:9090", 1, replace(settings, two_tiers=False))
    limits = settings_from_mapping(config, env={}).safety_limits()
    return simulate(demo_episode(schedule, params, settings.seed), policy, limits)


def read_decisions(path: Path, tier: str, load_started_s: float | None = None) -> Ticks:
    """A tier's decisions from a run's decisions.jsonl, oldest first; t_s from `load_started_s` (None/NaN: the first tick)."""
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("tier") == tier]
    if not rows:
        raise ValueError(f"{path}: no decisions of tier {tier!r}")
    start = rows[0]["t"] if load_started_s is None or math.isnan(load_started_s) else load_started_s
    vectors = np.array([[math.nan if v is None else v for v in row["observation"]["vector"]] for row in rows], dtype=np.float64)
    if vectors.shape[1] != len(OBS_FIELDS):
        raise ValueError(f"{path}: observation vectors of {vectors.shape[1]} columns, this build has {len(OBS_FIELDS)}")
    return Ticks(
        np.array([row["t"] - start for row in rows]),
        np.array([row["rate_in_force"] for row in rows], dtype=np.float64),
        np.array([row["rate"] for row in rows], dtype=np.float64),
        vectors,
        tuple(tuple(row.get("rules") or ()) for row in rows),
    )


def comparison_plot(path: Path, runs: dict[str, Ticks], schedule: LoadSchedule) -> Path:
    """The rate and the compared observation columns of each run (label -> ticks), one panel per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(COMPARED) + 1, 1, figsize=(10, 2.2 * (len(COMPARED) + 1)), sharex=True)
    seconds = np.arange(schedule.duration_s)
    top = axes[0]
    top.plot(seconds, schedule.demand_rps, color="0.6", lw=1, label="demand")
    top.step(seconds, schedule.capacity_rps, where="post", color="black", ls="--", lw=1, label="capacity")
    for (label, ticks), color in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green"), strict=False):
        top.step(ticks.t_s, ticks.rate, where="post", color=color, lw=1.5, label=f"rate set ({label})")
        for ax, column in zip(axes[1:], COMPARED, strict=True):
            ax.plot(ticks.t_s, ticks.vector[:, column], marker=".", color=color, lw=1, label=label)
            ax.set_ylabel(OBS_FIELDS[column], fontsize=8)
    top.set_ylabel("req/s")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("seconds from the start of the load")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
