"""Augmented Random Search, V2-t (Mania, Guy & Recht, "Simple random search of static linear policies
is competitive for reinforcement learning", NeurIPS 2018, arXiv:1803.07055), in numpy.

One iteration (Algorithm 2 of the paper, variant V2-t):

1. draw N directions delta_k ~ N(0, I) of the size of the flat policy parameters theta;
2. roll out theta + nu * delta_k and theta - nu * delta_k, every one on the same batch of
   scenarios and seeds (common random numbers keep the comparison fair), with the observation
   features normalised by the running mean and standard deviation of every state seen so far;
3. keep the b directions with the largest max(r+, r-), and step
   theta += alpha / (b * sigma_R) * sum_k (r+_k - r-_k) * delta_k,
   sigma_R being the standard deviation of the 2b returns kept;
4. fold the states of this iteration into the running normaliser.

The policy itself (features, normaliser, linear map or tiny MLP) is `policy.rl`; rollouts are
whatever `RolloutFn` the caller passes (`training.trainer` steps the simulator's `BatchSim`, all
2N perturbations x M scenarios in one vectorised batch), so this file has no I/O and is tested on
toy objectives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

STD_FLOOR = 1e-6  # features whose spread is below this are only centred, not scaled

# thetas (P, n_params), obs_mean, obs_std -> (returns (P,), states seen (K, n_features))
RolloutFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class ARSConfig:
    """Hyperparameters of ARS V2-t (names as in the paper)."""

    n_directions: int = 8
    """N: random directions per iteration (2N rollouts batches)"""
    top_directions: int = 4
    """b: best directions used in the update (b <= N)"""
    step_size: float = 0.01
    """alpha: step size of the parameter update"""
    noise: float = 0.03
    """nu: standard deviation of the exploration noise added to the parameters"""

    def __post_init__(self) -> None:
        if self.n_directions < 1:
            raise ValueError(f"n_directions must be >= 1, got {self.n_directions}")
        if not 1 <= self.top_directions <= self.n_directions:
            raise ValueError(f"top_directions must be in [1, n_directions], got {self.top_directions}")
        if not (self.step_size > 0 and self.noise > 0):
            raise ValueError("step_size and noise must be positive")


@dataclass
class RunningStat:
    """Running mean and variance of feature vectors (Chan et al.'s parallel form of Welford's update)."""

    count: float = 0.0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def empty(cls, dim: int) -> RunningStat:
        """No data yet."""
        return cls(0.0, np.zeros(dim), np.zeros(dim))

    def update(self, batch: np.ndarray) -> None:
        """Fold the rows of `batch` (K, dim) into the statistics."""
        batch = np.asarray(batch, dtype=np.float64).reshape(-1, self.mean.size)
        k = batch.shape[0]
        if k == 0:
            return
        batch_mean = batch.mean(axis=0)
        batch_m2 = ((batch - batch_mean) ** 2).sum(axis=0)
        total = self.count + k
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * k / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * k / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        """Standard deviation, 1 where there is no spread (so constant features are only centred)."""
        if self.count < 2:
            return np.ones_like(self.mean)
        std = np.sqrt(self.m2 / (self.count - 1))
        return np.where(std < STD_FLOOR, 1.0, std)


@dataclass
class IterationStats:
    """What one ARS iteration measured."""

    mean_return: float
    """mean return over all 2N perturbed rollouts"""
    best_return: float
    """best perturbed return"""
    return_std: float
    """sigma_R of the kept returns"""
    update_norm: float
    """Euclidean norm of the parameter step"""


def ars_step(
    theta: np.ndarray,
    deltas: np.ndarray,
    returns_plus: np.ndarray,
    returns_minus: np.ndarray,
    config: ARSConfig,
) -> tuple[np.ndarray, IterationStats]:
    """The V2-t update of `theta` from the returns of theta +/- nu * deltas (N, n_params)."""
    order = np.argsort(-np.maximum(returns_plus, returns_minus), kind="stable")[: config.top_directions]
    kept = np.concatenate([returns_plus[order], returns_minus[order]])
    sigma_r = float(kept.std())
    scale = sigma_r if sigma_r > 1e-12 else 1.0  # all returns equal: no signal, the step is 0 anyway
    step = config.step_size / (config.top_directions * scale) * ((returns_plus[order] - returns_minus[order]) @ deltas[order])
    all_returns = np.concatenate([returns_plus, returns_minus])
    stats = IterationStats(float(all_returns.mean()), float(all_returns.max()), sigma_r, float(np.linalg.norm(step)))
    return theta + step, stats


@dataclass
class ARS:
    """ARS V2-t state: parameters, running observation statistics and the noise generator."""

    theta: np.ndarray
    obs_stat: RunningStat
    config: ARSConfig
    rng: np.random.Generator
    iteration: int = 0

    def perturbations(self) -> tuple[np.ndarray, np.ndarray]:
        """Directions (N, n_params) and the 2N parameter vectors to roll out: [theta + nu d_k ..., theta - nu d_k ...]."""
        deltas = self.rng.standard_normal((self.config.n_directions, self.theta.size))
        noise = self.config.noise * deltas
        return deltas, np.concatenate([self.theta + noise, self.theta - noise])

    def iterate(self, rollout: RolloutFn) -> IterationStats:
        """One iteration: perturb, roll out with the current normaliser, update theta, then the normaliser."""
        deltas, thetas = self.perturbations()
        returns, states = rollout(thetas, self.obs_stat.mean.copy(), self.obs_stat.std)
        n = self.config.n_directions
        self.theta, stats = ars_step(self.theta, deltas, returns[:n], returns[n:], self.config)
        self.obs_stat.update(states)
        self.iteration += 1
        return stats
