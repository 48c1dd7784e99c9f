"""What the demo plays: per-second demand and backend capacity, and the open-loop arrival times.

The demo plays a load scenario (`ratepilot/loadtest/scenarios/*.yaml`, the same data `ratepilot
loadtest` and its k6 export use; `demo` by default): its rates are in scenario units where the
backend's nominal capacity is the scenario's `nominal_rps`, mapped here to `NOMINAL_CAPACITY`;
`scale` turns units into the demo's requests/s (chosen so that the peak demand fits what this
machine can generate and serve, or given with `--scale`).
A trace CSV (`training.traces` format) is rescaled the same way: its nominal capacity (median
`capacity_rps`, or, without that column, its mean demand / `STEADY_LOAD`) maps to `NOMINAL_CAPACITY`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ratepilot.loadtest.scenario import Scenario, load_scenario
from training.traces import load_trace

NOMINAL_CAPACITY = 100.0  # scenario units: the backend's nominal capacity, requests/s
STEADY_LOAD = 0.6  # a trace without capacities: its mean demand is taken as this share of the capacity
PEAK_RPS_PER_CORE = 250.0  # offered requests/s per core that load generator + edge + Redis keep up with
DEFAULT_SCENARIO = "demo"  # steady -> 10x flash crowd -> backend capacity halved -> recovery
DEFAULT_DURATION_S = 180


@dataclass(frozen=True)
class LoadSchedule:
    """Per-second demand and capacity (requests/s), already scaled to the demo; `phases` label the seconds."""

    name: str
    demand_rps: np.ndarray
    capacity_rps: np.ndarray
    phases: tuple[tuple[int, str], ...]  # (first second, phase name)
    nominal_capacity_rps: float
    scenario: Scenario | None = None  # the scenario played (its client and request mixes), None for a trace

    @property
    def duration_s(self) -> int:
        """Length in seconds."""
        return int(self.demand_rps.size)

    @property
    def peak_demand_rps(self) -> float:
        """The largest per-second demand."""
        return float(self.demand_rps.max(initial=0.0))

    def phase_at(self, second: float) -> str:
        """Name of the phase a second belongs to."""
        name = self.phases[0][1] if self.phases else ""
        for start, phase in self.phases:
            if second >= start:
                name = phase
        return name


def scenario_schedule(scenario: Scenario, duration_s: int | None = None, scale: float = 1.0) -> LoadSchedule:
    """A load scenario stretched to `duration_s` (default: as written), its units mapped to the demo's."""
    played = scenario.stretched(duration_s) if duration_s is not None else scenario
    units = NOMINAL_CAPACITY / played.nominal_rps * scale
    phases = tuple((start, p.name) for start, p in zip(played.phase_starts(), played.phases, strict=True))
    return LoadSchedule(played.name, played.demand_rps(units), played.capacity_rps(units), phases,
                        NOMINAL_CAPACITY * scale, played)  # fmt: skip


def default_scenario(duration_s: int = DEFAULT_DURATION_S, scale: float = 1.0) -> LoadSchedule:
    """The `demo` scenario (steady -> 10x flash crowd -> backend capacity halved -> recovery), stretched to `duration_s`."""
    return scenario_schedule(load_scenario(DEFAULT_SCENARIO), duration_s, scale)


def trace_scenario(path: str | Path, scale: float = 1.0, duration_s: int | None = None) -> LoadSchedule:
    """A trace CSV rescaled to scenario units and then by `scale`; TraceError on a bad file."""
    trace = load_trace(path)
    seconds = max(1, math.ceil(trace.duration_s - float(trace.t_s[0])))
    if duration_s is not None:
        seconds = min(seconds, duration_s)
    demand, capacity, _heavy = trace.per_second(float(trace.t_s[0]), seconds)
    if capacity is not None and float(np.median(capacity)) > 0:
        nominal = float(np.median(capacity))
    elif float(demand.mean()) > 0:
        nominal = float(demand.mean()) / STEADY_LOAD
    else:
        raise ValueError(f"{path}: no demand in the {seconds} s played")
    units = NOMINAL_CAPACITY / nominal * scale
    capacity_rps = (capacity if capacity is not None else np.full(seconds, nominal)) * units
    return LoadSchedule(Path(path).name, demand * units, capacity_rps, ((0, Path(path).stem),), NOMINAL_CAPACITY * scale)


MAX_PEAK_OVER_NOMINAL = 10.0  # a spikier trace is not shrunk further: its peaks are clipped instead


def peak_budget_rps(cores: int, peak_rps_per_core: float = PEAK_RPS_PER_CORE) -> float:
    """Offered requests/s this machine generates and serves without the generator becoming the bottleneck."""
    return peak_rps_per_core * max(1, cores)


def auto_scale(schedule_units_peak: float, cores: int, peak_rps_per_core: float = PEAK_RPS_PER_CORE) -> float:
    """The scale at which the scenario's peak demand (in scenario units, at most 10x nominal) fits this machine."""
    if schedule_units_peak <= 0:
        return 1.0
    peak = min(schedule_units_peak, MAX_PEAK_OVER_NOMINAL * NOMINAL_CAPACITY)
    return peak_budget_rps(cores, peak_rps_per_core) / peak


def clip_demand(schedule: LoadSchedule, max_rps: float) -> LoadSchedule:
    """The schedule with its demand capped at `max_rps`."""
    return replace(schedule, demand_rps=np.minimum(schedule.demand_rps, max_rps))


def arrival_times(demand_rps: np.ndarray, seed: int) -> np.ndarray:
    """Poisson arrival offsets (s) following a per-second demand; the same seed gives the same arrivals."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(np.clip(demand_rps, 0.0, None))
    offsets = [second + np.sort(rng.random(count)) for second, count in enumerate(counts.tolist())]
    return np.concatenate(offsets) if offsets else np.empty(0)
