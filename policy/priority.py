"""Priority across tiers that share one backend: the policy's capacity estimate, divided by priority.

The policy proposes one rate per tier. For the tiers of one backend group their sum is the policy's
estimate of what that backend can take this interval. `PrioritySafePolicy` lets the safety engine's
rate rules (step limit, stale hold/decay, emergency brake) act on those proposals first, so the total
moves no faster than they allow, and takes C = the sum of the group's rates after them. `allocate`
divides C again against each tier's demand D (admitted + throttled tokens/s of the last interval):
higher priorities keep their demand served first and lower ones absorb the cut. The total is not
changed, so the backend sees the load the policy (as the safety engine moderated it) chose; only its
split moves. The per-tier caps (tier bounds, operator caps, pins, the final guard) then apply to the
divided rates, so they keep the last word. When the policy failed (rule policy_error) nothing is
divided: the rates in force stand. A tier may thus move further in one tick than the step
limit allows a single tier: the brake's cut of the total lands on the lowest priority instead of on
every tier alike.

| step | rule             | does                                                                                   |
|------|------------------|----------------------------------------------------------------------------------------|
| 1    | skip             | a proposal or a demand is NaN/inf/negative, or C <= 0: the group's proposals stand     |
| 2    | reserve          | tiers below the top priority together may get at most (1 - reserve) x C                |
| 3    | fill             | priority levels, highest first, share the budget left by weighted max-min: tier i of a |
|      |                  | level gets min(D_i, w_i x L), L the largest water level that fits the level's budget    |
| 4    | surplus          | C left after every demand is met goes back to the tiers whose proposal exceeded what    |
|      |                  | step 3 gave them, in proportion to that excess (the policy's own headroom)             |
| 5    | reserve_surplus  | surplus that would lift the lower tiers past (1 - reserve) x C goes to the top level,  |
|      |                  | by weight (headroom kept for the top tier's bursts, as Stripe reserves capacity)       |

Outcome of a group (`GroupAllocation.outcome`):

* `skipped`: step 1; `proposed`: every rate already covered its tier's demand (the result is
  exactly the rates given);
* `reallocated`: C covered the total demand but some tier was proposed less than its demand: it is
  raised to its demand, paid for from the other tiers' excess;
* `overload`: the total demand exceeds C; the lowest priorities were cut (`cut` > 0).

Pure numpy, no I/O; tests assert exact allocations (`tests/policy/test_priority.py`).
"""

from __future__ import annotations

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
    capacity: float  # C = sum of the proposals, tokens/s
    demand: np.ndarray  # D, tokens/s
    proposed: np.ndarray  # the rates before the division (the policy's, after the safety engine's rate rules)
    rates: np.ndarray  # the allocation (sums to C unless skipped)
    tiers: np.ndarray  # the group's tier indices (PriorityGroup.tiers)

    @property
    def cut(self) -> np.ndarray:
        """Demand not given a rate, tokens/s (0 where the demand is covered)."""
        return np.maximum(self.demand - self.rates, 0.0)


# --- the steps: pure functions, one per row of the table above ------------------------------------


def usable(proposed: np.ndarray, demand: np.ndarray) -> bool:
    """skip: True when every proposal and demand is a finite non-negative number and C > 0."""
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


def fill_by_priority(demand: np.ndarray, group: PriorityGroup, capacity: float) -> np.ndarray:
    """reserve + fill: levels from the highest priority down share C; lower levels stay within (1 - reserve) C."""
    given = np.zeros_like(demand)
    left = capacity
    lower_left = (1.0 - group.reserve) * capacity  # what the tiers below the top may still take
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


def share_surplus(given: np.ndarray, proposed: np.ndarray, capacity: float) -> np.ndarray:
    """surplus: C - sum(given) back to the tiers proposed above what they got, in proportion to that excess."""
    surplus = capacity - given.sum()
    excess = np.maximum(proposed - given, 0.0)
    if surplus <= _TOLERANCE * capacity or excess.sum() <= 0:
        return given
    return given + excess * (surplus / excess.sum())


def keep_reserve(rates: np.ndarray, group: PriorityGroup, capacity: float, given: np.ndarray) -> np.ndarray:
    """reserve_surplus: surplus lifting the lower tiers past (1 - reserve) C moves to the top level by weight."""
    top = group.top
    over = rates[~top].sum() - (1.0 - group.reserve) * capacity
    if group.reserve <= 0 or over <= _TOLERANCE * capacity:
        return rates
    extra = np.where(top, 0.0, rates - given)  # the lower tiers' share of the surplus (step 3 kept within)
    rates = rates - extra * (over / extra.sum())
    return rates + np.where(top, group.weight, 0.0) * (over / group.weight[top].sum())


def allocate(proposed: np.ndarray, demand: np.ndarray, group: PriorityGroup) -> GroupAllocation:
    """Divide one group's C = sum(proposed) against its demand by priority (the table above)."""
    proposed = np.asarray(proposed, dtype=np.float64)
    demand = np.asarray(demand, dtype=np.float64)
    if not usable(proposed, demand):
        return GroupAllocation("skipped", float(np.nansum(proposed)), demand, proposed, proposed.copy(), group.tiers)
    capacity = float(proposed.sum())
    given = fill_by_priority(demand, group, capacity)
    rates = keep_reserve(share_surplus(given, proposed, capacity), group, capacity, given)
    if demand.sum() > capacity * (1 + _TOLERANCE):
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
