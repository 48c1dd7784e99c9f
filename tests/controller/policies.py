"""Small real policies for controller tests (each a complete Policy, not a stand-in for a server)."""

from __future__ import annotations

import numpy as np

from policy.base import Policy
from policy.observation import OBS_FIELDS, Observation

P99 = OBS_FIELDS.index("p99_over_slo")


class LatencyFollower(Policy):
    """Cut by 30 % while p99 is over the SLO, else raise by 20 % (a one-line AIMD-like rule)."""

    name = "latency_follower"

    def act(self, observation: Observation) -> np.ndarray:
        """Next rates."""
        return observation.rate * np.where(observation.vector[:, P99] > 1.0, 0.7, 1.2)


class Raising(Policy):
    """A policy with a bug: it raises on every call."""

    name = "raising"

    def act(self, observation: Observation) -> np.ndarray:
        """Raises."""
        raise RuntimeError("policy bug: index out of range")


class NaNPolicy(Policy):
    """A policy whose output went NaN/inf (e.g. a diverged model)."""

    name = "nan"

    def act(self, observation: Observation) -> np.ndarray:
        """NaN for the first tier, +inf for the rest."""
        out = np.full(observation.n_tiers, np.inf)
        out[0] = np.nan
        return out
