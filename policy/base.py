"""The Policy interface and the action encoding shared by the simulator, the harness and the controller.

A policy maps an Observation to new refill rates (tokens/s, one per tier). The simulator's action
space is the same decision encoded as a bounded multiplicative change, asymmetric because cutting
is the safe direction: action a in [-1, 0] means rate_next = rate * ACTION_MAX_DOWN ** a (a = -1
divides by 4) and a in [0, 1] means rate_next = rate * ACTION_MAX_UP ** a (a = +1 doubles).

A learned policy acts in one of two action spaces (`ACTION_SPACES`, recorded in its model file):

| action space                   | anchor (what a = 0 keeps)                                     | new rate               |
|--------------------------------|---------------------------------------------------------------|------------------------|
| `RELATIVE` (log-multiplier)    | the rate in force                                              | anchor * 4**a or 2**a  |
| `ANCHORED` (capacity-anchored) | the capacity estimate when it was refreshed this interval      | anchor * 4**a or 2**a  |
|                                | (`capacity_age` 0), else the rate in force                     |                        |

The anchored space lets a policy jump to where the backend now is within one interval (the
estimate, `policy.capacity`, follows a capacity change one interval after it) instead of walking
there from the current rate by at most 2x / 4x per interval; when the estimate is stale (the
backend saturated, or too idle to read) it falls back to the relative space.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from policy.observation import CAPACITY_AGE, LN_CAPACITY_OVER_RATE, Observation

ACTION_MAX_DOWN = 4.0  # the largest cut in one control interval: a = -1 divides the rate by this
ACTION_MAX_UP = 2.0  # the largest raise in one control interval: a = +1 multiplies the rate by this
RELATIVE = f"log-multiplier:down={ACTION_MAX_DOWN:g},up={ACTION_MAX_UP:g}"  # recorded in model files
ANCHORED = f"capacity-anchored:down={ACTION_MAX_DOWN:g},up={ACTION_MAX_UP:g}"
ACTION_SPACE = RELATIVE  # the simulator's gymnasium action space, and a model file's when it names none
MIN_RATE = 1e-3  # tokens/s: no policy output goes below this, whatever it says


class Policy(ABC):
    """Chooses the next refill rate for every tier from the latest observation."""

    name: ClassVar[str] = "policy"

    def reset(self) -> None:  # noqa: B027 - stateless policies need no reset
        """Forget any internal state (a new episode, a restarted controller)."""

    @abstractmethod
    def act(self, observation: Observation) -> np.ndarray:
        """New refill rates in tokens/s, shape (n_tiers,)."""


def action_to_rate(rate: np.ndarray, action: np.ndarray) -> np.ndarray:
    """Apply a bounded multiplicative action in [-1, 1] to the current rate."""
    a = np.clip(np.nan_to_num(np.asarray(action, dtype=np.float64), nan=0.0), -1.0, 1.0)
    factor = np.where(a < 0, ACTION_MAX_DOWN**a, ACTION_MAX_UP**a)
    return np.maximum(np.asarray(rate, dtype=np.float64) * factor, MIN_RATE)


def rate_to_action(rate: np.ndarray, new_rate: np.ndarray) -> np.ndarray:
    """The action in [-1, 1] that moves `rate` as close as one interval allows to `new_rate`."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.log(np.asarray(new_rate, dtype=np.float64) / np.asarray(rate, dtype=np.float64))
        a = log_ratio / np.where(log_ratio < 0, np.log(ACTION_MAX_DOWN), np.log(ACTION_MAX_UP))
    return np.clip(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)


def action_anchor(rate: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """The ANCHORED space's anchor per tier: the capacity estimate when refreshed this interval, else `rate`.

    `vector` is `Observation.vector` (n_tiers, OBS_DIM); the estimate is rate * exp(ln_capacity_over_rate).
    """
    rate = np.asarray(rate, dtype=np.float64)
    x = np.asarray(vector, dtype=np.float64)
    fresh = x[..., CAPACITY_AGE] == 0.0
    return np.where(fresh, rate * np.exp(x[..., LN_CAPACITY_OVER_RATE]), rate)


def apply_action(action_space: str, rate: np.ndarray, vector: np.ndarray, action: np.ndarray) -> np.ndarray:
    """New rates from actions in [-1, 1] in `action_space` (one of ACTION_SPACES); ValueError for another."""
    if action_space == RELATIVE:
        return action_to_rate(rate, action)
    if action_space == ANCHORED:
        return action_to_rate(action_anchor(rate, vector), action)
    raise ValueError(f"unknown action space {action_space!r}; this build acts in {', '.join(ACTION_SPACES)}")


ACTION_SPACES = (RELATIVE, ANCHORED)
ACTION_SPACE_NAMES = {"relative": RELATIVE, "anchored": ANCHORED}  # `ratepilot train --action-space NAME`
