"""`TrafficEnv`, the gymnasium face of the simulator: BatchSim with one world.

`import training` registers it as `ratepilot/Traffic-v0` (`ENV_ID`).
"""

from __future__ import annotations

from textwrap import indent
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from policy.base import action_to_rate
from policy.observation import BIAS, OBS_DIM, OBS_HIGH, OBS_LOW, OBS_SCHEMA, Observation, obs_table_markdown
from training.scenarios import DEFAULT_STEPS, SCENARIOS, SUITES, make_episode, trace_episode
from training.sim import INTERVAL_S, REWARD, SUBSTEP_S, BatchSim, Episode
from training.traces import load_trace


class TrafficEnv(gym.Env[np.ndarray, np.ndarray]):
    """An API edge with a token-bucket limiter in front of a backend; the agent sets the refill rate.

    ## Description
    One step is one control interval of 5 s, simulated in 100 ms sub-steps: requests arrive
    (Poisson around the scenario's demand, a share of them heavy and costing more tokens); the
    token bucket (`limiter.bucket` arithmetic) admits or throttles them; throttled clients retry
    after Retry-After; the backend serves admitted work through a FIFO queue at a capacity that may
    change (node failure, degradation, autoscaling with a delay); latency rises steeply near
    saturation, requests waiting longer than the client timeout fail, and a full queue costs
    capacity (congestion collapse). The agent sees what Prometheus would report over the interval,
    with noise and a scrape lag. Physics: `training/sim.py` (the world: `training/world.py`, latency:
    `training/latency.py`); scenarios: `training/scenarios.py`.

    ## Action space
    `Box(-1, 1, (1,), float32)`: a bounded multiplicative change of the refill rate,
    `rate_next = rate * 4 ** a` for a < 0 (a = -1 divides by 4) and `rate * 2 ** a` for a >= 0
    (`policy.base.action_to_rate`: cutting, the safe direction, may go faster than raising).

    ## Observation space
    `Box(OBS_LOW, OBS_HIGH, (12,), float32)`, built by `policy.observation.ObservationBuilder`, the
    same code the controller runs in production (schema `OBS_SCHEMA`). The columns, their units and
    bounds are `policy.observation.OBS_TABLE`, the one definition, rendered below on import (see it
    with `help(TrafficEnv)`). The space's low for `bias` is 0 rather than 1: a degenerate [1, 1]
    interval only makes the checker warn.

    {obs_table}

    ## Reward
    `training.world.RewardWeights` (the one definition): goodput within the SLO as a share of
    `sum(min(demand, capacity) dt)`, minus `slo * clip(p99 / SLO - 1, 0, 1)`, minus
    `error * error_rate`, minus `churn * |log2(rate change)|`.

    ## Starting state
    A world drawn from the scenario with the reset seed (domain-randomised capacity, SLO, noise,
    lag, retries, ...), a full bucket at the operator's reference rate, an empty queue, and one
    warm-up interval at that rate which produces the first observation.

    ## Episode end
    No terminal state; truncation after `episode_steps` intervals (120 = 10 minutes by default,
    also the `max_episode_steps` of the registration).

    ## Arguments
    `gym.make("ratepilot/Traffic-v0", scenario="random", trace=None, episode_steps=120,
    randomize=True, split="eval")`: `scenario` is a name from `training.scenarios.SCENARIOS`,
    `trace:NAME` for a window of a packaged trace, or "random" (a default-suite scenario drawn per
    reset); `trace` is a CSV path to replay instead; `randomize=False` gives the nominal world;
    `split` picks the train or held-out part of packaged traces. `info` carries the true figures
    of the interval (see `training.sim`); `env.unwrapped.last_observation` is the full `Observation`.
    """

    metadata = {"render_modes": [], "render_fps": int(1 / INTERVAL_S)}
    interval_s = INTERVAL_S  # seconds per step
    substep_s = SUBSTEP_S  # seconds per physics sub-step
    obs_schema = OBS_SCHEMA
    reward_weights = REWARD

    def __init__(
        self,
        scenario: str = "random",
        trace: str | None = None,
        episode_steps: int = DEFAULT_STEPS,
        randomize: bool = True,
        split: str = "eval",
        render_mode: str | None = None,
    ) -> None:
        if scenario != "random" and scenario not in SCENARIOS and not scenario.startswith("trace:"):
            raise ValueError(f"unknown scenario {scenario!r}; choose from random, {', '.join(SCENARIOS)} or trace:NAME")
        if episode_steps < 1:
            raise ValueError("episode_steps must be >= 1")
        self.scenario = scenario
        self.trace = load_trace(trace) if trace else None
        self.episode_steps = episode_steps
        self.randomize = randomize
        self.split = split
        self.render_mode = render_mode
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        low = OBS_LOW.astype(np.float32)
        low[BIAS] = 0.0  # the bias is always 1; a degenerate [1, 1] interval only makes the checker warn
        self.observation_space = spaces.Box(low, OBS_HIGH.astype(np.float32), shape=(OBS_DIM,), dtype=np.float32)
        self.sim: BatchSim | None = None
        self.last_observation: Observation | None = None

    def _episode(self) -> Episode:
        seed = int(self.np_random.integers(0, 2**31 - 1))
        if self.trace is not None:
            return trace_episode(self.trace, seed, randomize=self.randomize, steps=self.episode_steps)
        name = self.scenario
        if name == "random":
            names = SUITES["default"]
            name = names[int(self.np_random.integers(0, len(names)))]
        return make_episode(name, seed, self.episode_steps, self.randomize, self.split)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Draw a new world (from `seed` when given) and return the first observation."""
        super().reset(seed=seed)
        episode = self._episode()
        if self.sim is None:
            self.sim = BatchSim([episode])
        obs = self.sim.reset([episode])
        self.last_observation = obs
        return obs.vector[0].astype(np.float32), {"scenario": episode.name}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Change the rate by 2**action and simulate one control interval."""
        if self.sim is None or self.last_observation is None:
            raise RuntimeError("call reset() before step()")
        rate = action_to_rate(self.last_observation.rate, np.asarray(action, dtype=np.float64).reshape(-1)[:1])
        obs, reward, done, truth = self.sim.step(rate)
        self.last_observation = obs
        info: dict[str, Any] = {k: float(v[0]) for k, v in truth.items()}
        return obs.vector[0].astype(np.float32), float(reward[0]), False, bool(done), info


TrafficEnv.__doc__ = (TrafficEnv.__doc__ or "").replace("{obs_table}", indent(obs_table_markdown(), "    ").lstrip())
