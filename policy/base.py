"""The Policy interface and the action encoding shared by the simulator, the harness and the controller.

A policy maps an Observation to new refill rates (tokens/s, one per tier). The simulator's action
space is the same decision encoded as a bounded multiplicative change, asymmetric because cutting
is the safe direction: action a in [-1, 0] means rate_next = rate * ACTION_MAX_DOWN ** a (a = -1
divides by 4) and a in [0, 1] means rate_next = rate * ACTION_MAX_UP ** a (a = +1 doubles).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from policy.observation import Observation

ACTION_MAX_DOWN = 4.0  # the largest cut in one control interval: a = -1 divides the rate by this
ACTION_MAX_UP = 2.0  # the largest raise in one control interval: a = +1 multiplies the rate by this
ACTION_SPACE = f"log-multiplier:down={ACTION_MAX_DOWN:g},up={ACTION_MAX_UP:g}"  # recorded in model files
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
