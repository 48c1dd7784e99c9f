"""The safety policy engine: clamps any policy's proposed rates and reports which rule fired.

Every rule is a small pure function over numpy arrays (one entry per tier) that returns the new
rates and a boolean mask of the tiers where it fired. The engine runs them in a fixed order, so
one piece of code guards every policy, the learned one included (the idea of Netflix
concurrency-limits' base limit that clamps to min/max, applied as a decorator):

| order | rule           | fires when                                  | does                                  |
|-------|----------------|---------------------------------------------|---------------------------------------|
| 1     | policy_error   | the policy raised or gave a wrong shape     | keeps the rate in force               |
| 2     | non_finite     | a proposed rate is NaN or infinite          | keeps the rate in force               |
| 3     | step_limit     | the change exceeds max_up/max_down per tick | moves only as far as allowed          |
| 4     | stale_hold     | metrics missing for <= hold_ticks ticks     | keeps the rate in force               |
| 5     | stale_decay    | metrics missing for longer                  | moves a share of the way to static    |
| 6     | emergency_brake| p99 or error rate far over the SLO          | cuts to brake_ratio x the rate that   |
|       |                |                                             | loaded the backend (see `brake`)      |
| 7     | tier_bounds    | outside the tier's [min, max]               | clamps                                |
| 8     | override_caps  | outside an operator's [min, max]            | clamps (operator caps replace tier's) |
| 9     | pinned         | an operator pinned the rate                 | sets it                               |
| 10    | guard          | still not finite or not in (0, MAX]         | falls back to the static rate         |

The final guard means the engine never returns a zero, negative, NaN or unlimited rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from limiter.bucket import MAX_RATE
from policy.base import Policy
from policy.observation import OBS_FIELDS, Observation

RULES = (
    "policy_error",
    "non_finite",
    "step_limit",
    "stale_hold",
    "stale_decay",
    "emergency_brake",
    "tier_bounds",
    "override_caps",
    "pinned",
    "guard",
)
OVERRIDE_RULES = frozenset({"override_caps", "pinned"})
_MISSING = OBS_FIELDS.index("missing")

Rule = tuple[np.ndarray, np.ndarray]  # (rates, fired mask)


class SafetyConfigError(ValueError):
    """Safety limits that cannot work (min > max, a ratio outside its range, ...)."""


# --- the rules: pure functions, one per row of the table above ------------------------------------


def keep_on_policy_error(proposed: np.ndarray | None, in_force: np.ndarray) -> Rule:
    """policy_error: a missing or wrongly shaped proposal keeps the rate in force."""
    if proposed is None or np.shape(proposed) != in_force.shape:
        return in_force.copy(), np.ones(in_force.shape, dtype=bool)
    return np.asarray(proposed, dtype=np.float64), np.zeros(in_force.shape, dtype=bool)


def keep_non_finite(proposed: np.ndarray, in_force: np.ndarray) -> Rule:
    """non_finite: NaN or infinite proposals keep the rate in force."""
    bad = ~np.isfinite(proposed)
    return np.where(bad, in_force, proposed), bad


def limit_step(proposed: np.ndarray, in_force: np.ndarray, max_up: np.ndarray, max_down: np.ndarray) -> Rule:
    """step_limit: rate may rise at most x max_up and fall at most to x max_down per tick."""
    low, high = in_force * max_down, in_force * max_up
    clamped = np.clip(proposed, low, high)
    return clamped, clamped != proposed


def hold_or_decay_when_stale(
    proposed: np.ndarray,
    in_force: np.ndarray,
    static: np.ndarray,
    stale_ticks: np.ndarray,
    hold_ticks: int,
    decay: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """stale_hold / stale_decay: without fresh metrics hold the rate, then close `decay` of the gap to static.

    `stale_ticks` counts consecutive ticks with missing metrics, this one included (0 = fresh).
    Returns (rates, hold mask, decay mask).
    """
    hold = (stale_ticks > 0) & (stale_ticks <= hold_ticks)
    decaying = stale_ticks > hold_ticks
    toward_static = in_force + (static - in_force) * decay
    rates = np.where(hold, in_force, np.where(decaying, toward_static, proposed))
    return rates, hold, decaying


def brake(
    proposed: np.ndarray,
    in_force: np.ndarray,
    p99_over_slo: np.ndarray,
    error_rate: np.ndarray,
    p99_limit: float,
    error_limit: float,
    ratio: float,
    previous_in_force: np.ndarray | None = None,
) -> Rule:
    """emergency_brake: p99 > p99_limit x SLO or error rate > error_limit caps the rate at ratio x the rate that loaded the backend.

    That rate is the larger of the rate in force and the one in force a tick earlier (`previous_in_force`,
    None: unknown). A backlog built under the earlier rate keeps the p99 of the interval after a cut high
    while the cut drains it; measured against the rate in force alone, the brake would cut again for
    the same backlog, tick after tick (a 1/2 x 1/2 x 1/2 spiral far below the capacity). So a cut of at
    least `ratio` already in force holds the rate there instead, and the brake cuts again only if the
    next interval, run wholly under the cut rate, is still far over the SLO. It never raises a rate.
    """
    with np.errstate(invalid="ignore"):
        firing = (np.nan_to_num(p99_over_slo, nan=0.0) > p99_limit) | (np.nan_to_num(error_rate, nan=0.0) > error_limit)
    loaded = in_force if previous_in_force is None else np.fmax(in_force, previous_in_force)
    cut = np.minimum(proposed, loaded * ratio)
    return np.where(firing, cut, proposed), firing


def clamp_between(proposed: np.ndarray, low: np.ndarray, high: np.ndarray) -> Rule:
    """tier_bounds / override_caps: clamp into [low, high]; NaN bounds mean no bound."""
    low = np.where(np.isnan(low), -np.inf, low)
    high = np.where(np.isnan(high), np.inf, high)
    clamped = np.minimum(np.maximum(proposed, low), high)
    return clamped, clamped != proposed


def pin(proposed: np.ndarray, pinned: np.ndarray) -> Rule:
    """pinned: an operator's pinned rate (NaN = none) replaces everything before it."""
    has_pin = ~np.isnan(pinned)
    return np.where(has_pin, pinned, proposed), has_pin & (pinned != proposed)


def guard(proposed: np.ndarray, static: np.ndarray) -> Rule:
    """guard: whatever is still not a finite rate in (0, MAX_RATE] becomes the static rate."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(proposed) | (proposed <= 0) | (proposed > MAX_RATE)
    return np.where(bad, static, proposed), bad


# --- configuration ---------------------------------------------------------------------------------


def _per_tier(name: str, value: object, n: int) -> np.ndarray:
    array = np.array(value, dtype=np.float64).reshape(-1)
    if array.size == 1:
        array = np.repeat(array, n)
    if array.size != n:
        raise SafetyConfigError(f"{name}: expected 1 or {n} values, got {array.size}")
    return array


@dataclass(frozen=True)
class SafetyLimits:
    """The safety engine's settings; the rate arrays hold one entry per tier (tokens/s)."""

    min_rate: np.ndarray
    max_rate: np.ndarray
    static_rate: np.ndarray  # the safe rate limiters fall back to; decay target when metrics are stale
    max_up: float | np.ndarray = 1.5  # a tick may multiply the rate by at most this
    max_down: float | np.ndarray = 0.5  # ... and by at least this
    brake_p99_over_slo: float = 3.0  # p99 above this many SLOs pulls the brake
    brake_error_rate: float = 0.2  # error rate above this pulls the brake
    brake_ratio: float = 0.5  # the brake cuts to this share of the rate in force
    stale_hold_ticks: int = 3  # ticks to hold the rate when metrics are missing
    stale_decay: float = 0.2  # then close this share of the gap to the static rate per tick

    def __post_init__(self) -> None:
        n = np.asarray(self.static_rate).size
        for name in ("min_rate", "max_rate", "static_rate", "max_up", "max_down"):
            object.__setattr__(self, name, _per_tier(name, getattr(self, name), n))
        for name in ("min_rate", "max_rate", "static_rate"):
            values = getattr(self, name)
            if np.any(~np.isfinite(values)) or np.any(values <= 0) or np.any(values > MAX_RATE):
                raise SafetyConfigError(f"{name} must be finite and in (0, {MAX_RATE:g}]")
        if np.any(self.min_rate > self.max_rate):
            raise SafetyConfigError("min_rate must not exceed max_rate")
        if np.any((self.static_rate < self.min_rate) | (self.static_rate > self.max_rate)):
            raise SafetyConfigError("static_rate must lie within [min_rate, max_rate]")
        if np.any(~np.isfinite(self.max_up)) or np.any(self.max_up < 1):
            raise SafetyConfigError("max_up must be finite and >= 1")
        if np.any(~np.isfinite(self.max_down)) or np.any((self.max_down <= 0) | (self.max_down > 1)):
            raise SafetyConfigError("max_down must be in (0, 1]")
        if not (0 < self.brake_ratio < 1):
            raise SafetyConfigError("brake_ratio must be in (0, 1)")
        if not (self.brake_p99_over_slo > 1 and np.isfinite(self.brake_p99_over_slo)):
            raise SafetyConfigError("brake_p99_over_slo must be finite and > 1")
        if not (0 < self.brake_error_rate <= 1):
            raise SafetyConfigError("brake_error_rate must be in (0, 1]")
        if self.stale_hold_ticks < 0:
            raise SafetyConfigError("stale_hold_ticks must be >= 0")
        if not (0 < self.stale_decay <= 1):
            raise SafetyConfigError("stale_decay must be in (0, 1]")

    @property
    def n_tiers(self) -> int:
        """Number of tiers."""
        return int(self.static_rate.size)


@dataclass(frozen=True)
class OperatorCaps:
    """Operator overrides per tier; NaN where a tier has none."""

    min_rate: np.ndarray
    max_rate: np.ndarray
    pinned: np.ndarray

    @classmethod
    def none(cls, n: int) -> OperatorCaps:
        """No override for any of n tiers."""
        empty = np.full(n, np.nan)
        return cls(empty, empty.copy(), empty.copy())


@dataclass(frozen=True)
class SafetyResult:
    """The clamped rates and what the engine did to get them."""

    rates: np.ndarray  # the rates to write, tokens/s
    proposed: np.ndarray  # what the policy asked for (NaN where it gave nothing usable)
    fired: dict[str, np.ndarray]  # rule -> mask of tiers where it fired
    stale_ticks: np.ndarray  # pass back in on the next tick
    before_caps: np.ndarray | None = None  # after rules 1-6, before the per-tier caps (policy.priority divides these)
    in_force: np.ndarray | None = None  # the rate in force the result was decided from; pass back in on the next tick

    @property
    def deciding_rule(self) -> list[str]:
        """Per tier, the last rule in the order that fired ('none' when the policy's rate stood)."""
        labels = np.full(self.rates.shape, "none", dtype=object)
        for rule in RULES:
            labels[self.fired[rule]] = rule
        return [str(label) for label in labels]

    @property
    def source(self) -> list[str]:
        """Per tier, 'override' when an operator override set or bounded the rate, else 'controller'."""
        by_override = self.fired["override_caps"] | self.fired["pinned"]
        return ["override" if flag else "controller" for flag in by_override]

    def fired_rules(self, tier_index: int) -> list[str]:
        """All rules that fired for one tier, in order."""
        return [rule for rule in RULES if self.fired[rule][tier_index]]


@dataclass
class SafetyEngine:
    """Runs the rules in order over a policy's proposal; stateless apart from what the caller passes in."""

    limits: SafetyLimits

    def apply(
        self,
        observation: Observation,
        proposed: np.ndarray | None,
        caps: OperatorCaps | None = None,
        stale_ticks: np.ndarray | None = None,
        previous_in_force: np.ndarray | None = None,
    ) -> SafetyResult:
        """Clamp `proposed` (None when the policy failed) given the observation and operator caps.

        `stale_ticks` and `previous_in_force` are the last result's `stale_ticks` and `in_force` (None on the first tick).
        """
        limits = self.limits
        n = limits.n_tiers
        if observation.n_tiers != n:
            raise SafetyConfigError(f"observation has {observation.n_tiers} tiers, the limits {n}")
        caps = caps or OperatorCaps.none(n)
        previous_stale = np.zeros(n, dtype=np.int64) if stale_ticks is None else np.asarray(stale_ticks, dtype=np.int64)
        in_force = np.asarray(observation.rate, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            usable = np.isfinite(in_force) & (in_force > 0) & (in_force <= MAX_RATE)
        in_force = np.where(usable, in_force, limits.static_rate)
        missing = observation.vector[:, _MISSING] > 0
        stale = np.where(missing, previous_stale + 1, 0)
        fired: dict[str, np.ndarray] = {}

        rates, fired["policy_error"] = keep_on_policy_error(proposed, in_force)
        raw = rates.copy() if not fired["policy_error"].all() else np.full(n, np.nan)
        rates, fired["non_finite"] = keep_non_finite(rates, in_force)
        rates, fired["step_limit"] = limit_step(rates, in_force, np.asarray(limits.max_up), np.asarray(limits.max_down))
        rates, fired["stale_hold"], fired["stale_decay"] = hold_or_decay_when_stale(
            rates, in_force, limits.static_rate, stale, limits.stale_hold_ticks, limits.stale_decay
        )
        m = observation.metrics
        with np.errstate(divide="ignore", invalid="ignore"):
            p99_over_slo = np.asarray(m.p99_latency_ms, dtype=np.float64) / observation.slo_ms
        rates, fired["emergency_brake"] = brake(
            rates,
            in_force,
            p99_over_slo,
            np.asarray(m.error_rate, dtype=np.float64),
            limits.brake_p99_over_slo,
            limits.brake_error_rate,
            limits.brake_ratio,
            None if previous_in_force is None else np.asarray(previous_in_force, dtype=np.float64),
        )
        capped_rates, capped = apply_caps(rates, limits, caps)
        return SafetyResult(
            rates=capped_rates, proposed=raw, fired={**fired, **capped}, stale_ticks=stale, before_caps=rates, in_force=in_force
        )


def apply_caps(rates: np.ndarray, limits: SafetyLimits, caps: OperatorCaps) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rules 7-10 (tier_bounds, override_caps, pinned, guard): the per-tier caps, and where each fired."""
    fired: dict[str, np.ndarray] = {}
    has_cap_min, has_cap_max = ~np.isnan(caps.min_rate), ~np.isnan(caps.max_rate)
    tier_low = np.where(has_cap_min, np.nan, limits.min_rate)
    tier_high = np.where(has_cap_max, np.nan, limits.max_rate)
    rates, fired["tier_bounds"] = clamp_between(rates, tier_low, tier_high)
    rates, fired["override_caps"] = clamp_between(rates, caps.min_rate, caps.max_rate)
    rates, fired["pinned"] = pin(rates, caps.pinned)
    rates, fired["guard"] = guard(rates, limits.static_rate)
    return rates, fired


def propose(policy: Policy, observation: Observation) -> tuple[np.ndarray | None, str | None]:
    """The policy's proposed rates and what was wrong with them (None when all is well).

    A policy that raises or answers the wrong shape proposes None (rule policy_error keeps the rates
    in force); NaN or infinite entries are passed on (rule non_finite keeps those tiers).
    """
    try:
        proposed = np.asarray(policy.act(observation), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - any policy failure must leave a safe rate
        return None, f"{type(exc).__name__}: {exc}"
    if proposed.shape != (observation.n_tiers,):
        return None, f"returned shape {proposed.shape}, expected ({observation.n_tiers},)"
    bad = int((~np.isfinite(proposed)).sum())
    return proposed, (f"returned NaN/inf for {bad} tier(s)" if bad else None)


@dataclass
class SafePolicy(Policy):
    """Any policy wrapped by the safety engine (the simulator, the harness, the controller's tick); remembers stale ticks."""

    inner: Policy
    engine: SafetyEngine
    caps: OperatorCaps | None = None
    last_result: SafetyResult | None = field(default=None, init=False)
    last_error: str | None = field(default=None, init=False)  # what was wrong with the last proposal

    name = "safe"

    def reset(self) -> None:
        """Reset the wrapped policy and forget the stale-tick counters."""
        self.inner.reset()
        self.last_result = None

    def act(self, observation: Observation) -> np.ndarray:
        """The inner policy's rates, clamped; a policy that raises keeps the rates in force."""
        return self.decide(observation).rates

    def decide(self, observation: Observation) -> SafetyResult:
        """`act` with the whole result: rates, the proposal, the rules that fired (also kept as `last_result`)."""
        proposed, self.last_error = propose(self.inner, observation)
        last = self.last_result
        stale, in_force = (None, None) if last is None else (last.stale_ticks, last.in_force)
        self.last_result = self.engine.apply(observation, proposed, self.caps, stale, in_force)
        return self.last_result
