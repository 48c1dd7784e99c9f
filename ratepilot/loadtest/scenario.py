"""Load scenarios as data: YAML files of phases, each with a rate, a duration, a client mix and a request (cost) mix.

A scenario file (the packaged ones are in `ratepilot/loadtest/scenarios/`):

    name: flash_crowd
    description: one line
    nominal_rps: 100                 # the capacity the rates are written against (scenario units)
    clients:                         # default client mix: API-key groups and their share of requests
      - {prefix: free_, count: 40, share: 0.7}
      - {prefix: pro_, count: 10, share: 0.3}
    requests:                        # default request mix: what is sent, and its share
      - {method: GET, path: /v1/items, share: 0.9}
      - {method: POST, path: /v1/infer, share: 0.1, body_bytes: 2048}
    phases:
      - {name: steady, duration_s: 30, rate_rps: 60}
      - {name: ramp, duration_s: 30, rate_rps: 60, to_rate_rps: 600}       # linear ramp
      - {name: agents, duration_s: 60, rate_rps: 40,                        # burst trains
         bursts: {every_s: 10, length_s: 2, rate_rps: 400}}
      - {name: outage, duration_s: 30, rate_rps: 60, capacity_rps: 50,      # demo backend capacity
         clients: [...], requests: [...]}                                   # per-phase mixes

Rates are requests/s in scenario units; `scale` multiplies them (and the capacity) when a scenario
is played. `capacity_rps` only drives the demo's synthetic backend; it defaults to `nominal_rps`.
The per-second demand built here is what every player uses: the built-in open-loop generator
(Poisson arrivals from it), the demo, and the k6 export.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
MAX_RATE_RPS = 1_000_000.0  # per scenario unit; a larger number is a typo, not a load test
MAX_DURATION_S = 7 * 86400
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")

# strict: a boolean or a quoted number in the YAML is an error, not 1.0
Rate = Annotated[float, Field(ge=0, le=MAX_RATE_RPS, allow_inf_nan=False, strict=True)]
Share = Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False, strict=True)]


class ScenarioError(ValueError):
    """A scenario that cannot be loaded or played; the message is one line naming the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClientGroup(_Strict):
    """`count` API keys `PREFIX0000`, `PREFIX0001`, ... sending `share` of the requests (shares are relative)."""

    prefix: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    count: int = Field(ge=1, le=100_000, strict=True)
    share: Share = 1.0


class RequestKind(_Strict):
    """One kind of request: method, path (an edge's route costs make some heavier) and an optional body size."""

    method: str = Field(default="GET", strict=True)
    path: str = Field(default="/v1/items", min_length=1, max_length=1000, pattern=r"^/[^\s]*$")
    share: Share = 1.0
    body_bytes: int = Field(default=0, ge=0, le=16 * 2**20, strict=True)

    @model_validator(mode="after")
    def _known_method(self) -> RequestKind:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        return self


class Bursts(_Strict):
    """Burst trains: every `every_s` seconds the rate is `rate_rps` for `length_s` seconds."""

    every_s: int = Field(ge=2, le=86400, strict=True)
    length_s: int = Field(ge=1, le=86400, strict=True)
    rate_rps: Rate

    @model_validator(mode="after")
    def _shorter_than_period(self) -> Bursts:
        if self.length_s >= self.every_s:
            raise ValueError(f"bursts.length_s ({self.length_s}) must be shorter than every_s ({self.every_s})")
        return self


class Phase(_Strict):
    """A stretch of the scenario; its own `clients`/`requests` replace the scenario's defaults."""

    name: str = Field(min_length=1, max_length=100, strict=True)
    duration_s: int = Field(ge=1, le=MAX_DURATION_S, strict=True)
    rate_rps: Rate
    to_rate_rps: Rate | None = None  # linear ramp from rate_rps to this over the phase
    bursts: Bursts | None = None
    capacity_rps: Rate | None = None  # the demo backend's capacity in this phase (default: nominal_rps)
    clients: tuple[ClientGroup, ...] | None = Field(default=None, min_length=1)
    requests: tuple[RequestKind, ...] | None = Field(default=None, min_length=1)


class Scenario(_Strict):
    """A named sequence of phases with default client and request mixes."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    nominal_rps: float = Field(default=100.0, gt=0, le=MAX_RATE_RPS, allow_inf_nan=False, strict=True)
    clients: tuple[ClientGroup, ...] = Field(default=(ClientGroup(prefix="load_", count=50),), min_length=1)
    requests: tuple[RequestKind, ...] = Field(default=(RequestKind(),), min_length=1)
    phases: tuple[Phase, ...] = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _some_load(self) -> Scenario:
        if self.duration_s > MAX_DURATION_S:
            raise ValueError(f"phases last {self.duration_s} s in all, more than {MAX_DURATION_S}")
        if not any(p.rate_rps > 0 or (p.to_rate_rps or 0) > 0 or (p.bursts and p.bursts.rate_rps > 0) for p in self.phases):
            raise ValueError("every phase has a zero rate: nothing to send")
        return self

    @property
    def duration_s(self) -> int:
        """Length in seconds as written."""
        return sum(p.duration_s for p in self.phases)

    def stretched(self, duration_s: int) -> Scenario:
        """The same phases with durations scaled to `duration_s` in all (each at least 1 s, bursts unchanged)."""
        if duration_s < len(self.phases):
            raise ScenarioError(f"{self.name}: a duration of {duration_s} s is shorter than its {len(self.phases)} phases")
        bounds = np.round(np.cumsum([0, *(p.duration_s for p in self.phases)]) * duration_s / self.duration_s).astype(int)
        lengths = np.maximum(np.diff(bounds), 1)
        lengths[-1] = max(1, duration_s - int(lengths[:-1].sum()))
        phases = tuple(p.model_copy(update={"duration_s": int(n)}) for p, n in zip(self.phases, lengths, strict=True))
        return self.model_copy(update={"phases": phases})

    def phase_starts(self) -> list[int]:
        """The first second of each phase."""
        return np.cumsum([0, *(p.duration_s for p in self.phases[:-1])]).astype(int).tolist()

    def demand_rps(self, scale: float = 1.0) -> np.ndarray:
        """Offered requests/s for each second, times `scale` (a ramp takes each second's midpoint)."""
        parts = []
        for phase in self.phases:
            t = np.arange(phase.duration_s, dtype=np.float64)
            if phase.to_rate_rps is None:
                rate = np.full(phase.duration_s, phase.rate_rps)
            else:
                rate = phase.rate_rps + (phase.to_rate_rps - phase.rate_rps) * (t + 0.5) / phase.duration_s
            if phase.bursts is not None:
                rate = np.where(t % phase.bursts.every_s < phase.bursts.length_s, phase.bursts.rate_rps, rate)
            parts.append(rate)
        return np.concatenate(parts) * scale

    def capacity_rps(self, scale: float = 1.0) -> np.ndarray:
        """The demo backend's capacity for each second, times `scale`."""
        return np.concatenate(
            [np.full(p.duration_s, self.nominal_rps if p.capacity_rps is None else p.capacity_rps) for p in self.phases]
        ) * scale  # fmt: skip

    def mixes(self) -> list[tuple[tuple[ClientGroup, ...], tuple[RequestKind, ...]]]:
        """Each phase's client and request mixes (its own, else the scenario's)."""
        return [(p.clients or self.clients, p.requests or self.requests) for p in self.phases]


def scenario_names() -> list[str]:
    """The packaged scenarios."""
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A packaged scenario by name, or a YAML file by path; ScenarioError (one line) on a bad one."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.exists()):
        if text not in scenario_names():
            raise ScenarioError(f"no scenario {text!r}: give a YAML file or one of {', '.join(scenario_names())}")
        path = SCENARIO_DIR / f"{text}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: expected a mapping with name and phases, got {type(data).__name__}")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "scenario"
        raise ScenarioError(f"{path}: {where}: {error['msg']}") from None


def check_scale(scale: float) -> float:
    """`scale` if it is a positive finite number; ScenarioError otherwise."""
    if not (math.isfinite(scale) and scale > 0):
        raise ScenarioError(f"scale must be a positive number, got {scale!r}")
    return scale
