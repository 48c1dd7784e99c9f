"""Traffic simulator, offline RL training, evaluation harness and the MLflow registry.

Importing the package registers the simulator with gymnasium as `ratepilot/Traffic-v0`, as gymnasium
plugin packages do: the entry point is a string, so `training.env` loads only when an env is made.
"""

import gymnasium

ENV_ID = "ratepilot/Traffic-v0"
EPISODE_STEPS = 120  # the registration's time limit: training.scenarios.DEFAULT_STEPS (10 minutes)

gymnasium.register(id=ENV_ID, entry_point="training.env:TrafficEnv", max_episode_steps=EPISODE_STEPS)
