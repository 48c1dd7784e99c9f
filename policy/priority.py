"""Priority across tiers that share one backend: the load the policy admits, divided by priority.

The policy proposes one rate per tier. For the tiers of one backend group the load those rates
admit, C = sum of min(rate_i, D_i) with D_i the tier's demand (admitted + throttled tokens/s of the
last interval), is the policy's estimate of what that backend can take this interval: a rate above
its tier's demand is headroom, not load the backend has shown it can take. `allocate` divides C
again against the demands, higher priorities first, so the lowest priorities absorb the cut.

`PrioritySafePolicy` divides the rates the safety engine's rate rules (step limit, stale hold/decay,
emergency brake) left, so the load moves no faster than they allow, and then applies the per-tier
caps (tier bounds, operator caps, pins, the final guard) to the divided rates, so they keep the last
word. A tier may move further in one tick than the step limit allows a single tier: the brake's cut
of the load lands on the lowest priority instead of on every tier alike. When the policy failed
(rule policy_error) nothing is divided: the rates in force stand.

| step | rule      | does                                                                                  |
|------|-----------|---------------------------------------------------------------------------------------|
| 1    | skip      | a rate or a demand is NaN/inf/negative, or every rate is 0: the group's rates stand    |
| 2    | load      | C = sum of min(rate_i, D_i): the load the rates admit                                  |
| 3    | reserve   | tiers below the top priority together may get at most (1 - reserve) x the group's     |
|      |           | total rate (the policy's whole estimate, headroom included)                           |
| 4    | fill      | priority levels, highest first, share what is left of C by weighted max-min: tier i of|
|      |           | a level gets min(D_i, w_i x L), L the largest water level that fits the level's budget |
| 5    | top       | C left over (only when the reserve held the lower tiers back) goes to the top level,  |
|      |           | by weight: capacity kept for the top tier's bursts, as Stripe reserves it             |
| 6    | headroom  | a tier given its whole demand gets back what its rate had above that demand           |

So the load the divided rates admit is C again (never more than the policy's), and where every
rate covers its demand the rates stand unchanged. Outcome of a group (`GroupAllocation.outcome`):
`skipped` (step 1), `proposed` (the rates stand), `reallocated` (changed, every demand met: the
top level got the reserve's leftover), `overload` (some tier is left below its demand; `cut` > 0).

Pure numpy, no I/O; tests assert exact allocations (`tests/policy/test_priority.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from policy.observation import Observation
from policy.safety import RULES, OperatorCaps, SafePolicy, SafetyResult, apply_caps

OUTCOMES = ("skipped", "proposed", "reallocated", "overload")
MAX_RESERVE = 0.9  # the lower tiers always keep at least a tenth of the backend
_TOLERANCE = 1e-9  # relative: sums of floats that agree to this are equal


class PriorityConfigError(ValueError):
    """A backend group that cannot work (weights not positive, a reserve out of range, ...)."""


@dataclass(frozen=True)
class PriorityGroup:
    """Tiers sharing one backend: their indices in the tier order, with priority, weight and reserve."""

    name: str
    tiers: np.ndarray  # int indices into the per-tier arrays
    priority: np.ndarray  # int, higher is served first
    weight: np.ndarray  # > 0, shares within one priority level
    reserve: float = 0.0  # share of C the tiers below the top priority may never take

    def __post_init__(self) -> None:
        tiers = np.asarray(self.tiers, dtype=np.int64).reshape(-1)
        priority = np.asarray(self.priority, dtype=np.int64).reshape(-1)
        weight = np.asarray(self.weight, dtype=np.float64).reshape(-1)
        object.__setattr__(self, "tiers", tiers)
        object.__setattr__(self, "priority", priority)
        object.__setattr__(self, "weight", weight)
        if tiers.size == 0 or priority.size != tiers.size or weight.size != tiers.size:
            raise PriorityConfigError(f"group {self.name}: tiers, priority and weight need one entry per tier")
        if np.unique(tiers).size != tiers.size or tiers.min() < 0:
            raise PriorityConfigError(f"group {self.name}: tier indices must be distinct and >= 0")
        if np.any(~np.isfinite(weight)) or np.any(weight <= 0):
            raise PriorityConfigError(f"group {self.name}: weights must be finite and > 0")
        if not (np.isfinite(self.reserve) and 0 <= self.reserve <= MAX_RESERVE):
            raise PriorityConfigError(f"group {self.name}: reserve must be in [0, {MAX_RESERVE:g}]")

    @property
    def top(self) -> np.ndarray:
        """Mask (over the group's tiers) of the top priority level."""
        return self.priority == self.priority.max()


@dataclass(frozen=True)
class GroupAllocation:
    """What `allocate` did to one group; arrays over the group's tiers."""

    outcome: str  # one of OUTCOMES
    capacity: float  # C = sum of min(rate, demand): the load the rates admit, tokens/s (NaN when skipped)
    demand: np.ndarray  # D, tokens/s
    proposed: np.ndarray  # the rates before the division (the policy's, after the safety engine's rate rules)
    rates: np.ndarray  # the divided rates (admitting C again unless skipped)
    tiers: np.ndarray  # the group's tier indices (PriorityGroup.tiers)

    @property
    def cut(self) -> np.ndarray:
        """Demand not given a rate, tokens/s (0 where the demand is covered)."""
        return np.maximum(self.demand - self.rates, 0.0)


# --- the steps: pure functions, one per row of the table above ------------------------------------


def usable(proposed: np.ndarray, demand: np.ndarray) -> bool:
    """skip: True when every rate and demand is a finite non-negative number and some rate is > 0."""
    values = np.concatenate([proposed, demand])
    return bool(np.all(np.isfinite(values)) and np.all(values >= 0) and proposed.sum() > 0)


def water_fill(demand: np.ndarray, weight: np.ndarray, budget: float) -> np.ndarray:
    """fill (one level): weighted max-min; tier i gets min(D_i, w_i L) with sum = min(budget, sum D)."""
    if budget >= demand.sum():
        return demand.copy()
    given = np.zeros_like(demand)
    order = np.argsort(demand / weight, kind="stable")  # the tier whose demand the water reaches first
    left, weight_left = max(budget, 0.0), weight.sum()
    for i in order:
        level = left / weight_left
        if demand[i] <= weight[i] * level:
            given[i] = demand[i]
        else:
            given[i] = weight[i] * level
        left -= given[i]
        weight_left -= weight[i]
    return given


def fill_by_priority(demand: np.ndarray, group: PriorityGroup, capacity: float, total_rate: float) -> np.ndarray:
    """reserve + fill: levels from the highest priority down share C; lower levels stay within (1 - reserve) x total rate."""
    given = np.zeros_like(demand)
    left = capacity
    lower_left = (1.0 - group.reserve) * total_rate  # what the tiers below the top may still take
    top_priority = group.priority.max()
    for level in sorted(set(group.priority.tolist()), reverse=True):
        members = group.priority == level
        budget = left if level == top_priority else min(left, lower_left)
        given[members] = water_fill(demand[members], group.weight[members], budget)
        spent = float(given[members].sum())
        left -= spent
        if level != top_priority:
            lower_left -= spent
    return given


def give_leftover_to_top(given: np.ndarray, group: PriorityGroup, capacity: float) -> np.ndarray:
    """top: C not given by `fill_by_priority` goes to the top priority level, by weight."""
    leftover = capacity - given.sum()
    if leftover <= _TOLERANCE * capacity:
        return given
    top_weight = np.where(group.top, group.weight, 0.0)
    return given + top_weight * (leftover / top_weight.sum())


def demand_met(rates: np.ndarray, demand: np.ndarray, scale: float) -> np.ndarray:
    """Per tier: the rate covers the demand (to float rounding of sums as large as `scale`)."""
    return rates >= demand - _TOLERANCE * scale


def give_back_headroom(given: np.ndarray, proposed: np.ndarray, demand: np.ndarray) -> np.ndarray:
    """headroom: a tier given its whole demand keeps what its rate had above the demand."""
    met = demand_met(given, demand, float(proposed.sum() + demand.sum()))
    return given + np.where(met, np.maximum(proposed - demand, 0.0), 0.0)


def allocate(proposed: np.ndarray, demand: np.ndarray, group: PriorityGroup) -> GroupAllocation:
    """Divide the load C = sum(min(rate, demand)) of one group against its demand by priority (the table above)."""
    proposed = np.asarray(proposed, dtype=np.float64)
    demand = np.asarray(demand, dtype=np.float64)
    if not usable(proposed, demand):
        return GroupAllocation("skipped", math.nan, demand, proposed, proposed.copy(), group.tiers)
    capacity = float(np.minimum(proposed, demand).sum())
    given = give_leftover_to_top(fill_by_priority(demand, group, capacity, float(proposed.sum())), group, capacity)
    rates = give_back_headroom(given, proposed, demand)
    if not demand_met(rates, demand, float(proposed.sum() + demand.sum())).all():
        outcome = "overload"
    elif np.allclose(rates, proposed, rtol=_TOLERANCE, atol=0.0):
        outcome, rates = "proposed", proposed.copy()
    else:
        outcome = "reallocated"
    return GroupAllocation(outcome, capacity, demand, proposed, rates, group.tiers)


def demand_of(observation: Observation) -> np.ndarray:
    """Per tier demand of the last interval, tokens/s: admitted + throttled (NaN where missing)."""
    m = observation.metrics
    return np.asarray(m.admitted_rps, dtype=np.float64) + np.asarray(m.throttled_rps, dtype=np.float64)


@dataclass(frozen=True)
class PriorityResult:
    """All groups' allocations for one decision, and the per-tier rates (tiers in no group keep the proposal)."""

    rates: np.ndarray
    proposed: np.ndarray
    groups: dict[str, GroupAllocation]


def allocate_groups(proposed: np.ndarray, demand: np.ndarray, groups: Sequence[PriorityGroup]) -> PriorityResult:
    """Run `allocate` for every group over the full per-tier arrays."""
    proposed = np.asarray(proposed, dtype=np.float64)
    rates = proposed.copy()
    done: dict[str, GroupAllocation] = {}
    for group in groups:
        result = allocate(proposed[group.tiers], np.asarray(demand, dtype=np.float64)[group.tiers], group)
        rates[group.tiers] = result.rates
        done[group.name] = result
    return PriorityResult(rates, proposed, done)


@dataclass
class PrioritySafePolicy(SafePolicy):
    """`SafePolicy` whose backend groups are divided by priority between the rate rules and the per-tier caps."""

    groups: Sequence[PriorityGroup] = ()
    last_division: PriorityResult | None = field(default=None, init=False)  # None without groups or usable rates

    def reset(self) -> None:
        """Reset the wrapped policy, the stale counters and the last division."""
        super().reset()
        self.last_division = None

    def decide(self, observation: Observation) -> SafetyResult:
        """The safety engine's result with each group's rates divided by priority and capped again."""
        result = super().decide(observation)
        self.last_division = None
        if not self.groups or result.fired["policy_error"].any():
            return result  # a failed policy keeps the rates in force, undivided
        before_caps = result.rates if result.before_caps is None else result.before_caps
        division = allocate_groups(before_caps, demand_of(observation), self.groups)
        rates, capped = apply_caps(division.rates, self.engine.limits, self.caps or OperatorCaps.none(observation.n_tiers))
        fired = {rule: capped[rule] if rule in capped else result.fired[rule] for rule in RULES}
        self.last_division = division
        self.last_result = replace(result, rates=rates, fired=fired)
        return self.last_result
