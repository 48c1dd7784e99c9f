"""The gymnasium face: registered, passes check_env, same seed -> same episode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from policy.observation import OBS_DIM, obs_table_markdown
from training import ENV_ID, EPISODE_STEPS
from training.env import TrafficEnv
from training.scenarios import DEFAULT_STEPS


def test_registered_env_passes_check_env() -> None:
    env = gym.make(ENV_ID)
    assert env.spec is not None and env.spec.max_episode_steps == 120
    check_env(env.unwrapped)


def test_import_training_registers_the_env_as_a_plugin_package_does() -> None:
    # a fresh interpreter: nothing but `import training` has run, and training.env loads only on make
    script = (
        "import sys, gymnasium, training\n"
        "assert 'training.env' not in sys.modules\n"
        f"env = gymnasium.make({ENV_ID!r}, scenario='steady', episode_steps=3)\n"
        "obs, _ = env.reset(seed=0)\n"
        "print(type(env.unwrapped).__name__, env.spec.max_episode_steps, obs.shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["TrafficEnv", str(DEFAULT_STEPS), f"({OBS_DIM},)"]
    assert EPISODE_STEPS == DEFAULT_STEPS


def test_the_docstring_shows_the_one_observation_table() -> None:
    doc = TrafficEnv.__doc__ or ""
    assert "{obs_table}" not in doc
    for row in obs_table_markdown().splitlines():
        assert f"    {row}\n" in doc


@pytest.mark.parametrize("scenario", ["flash_crowd", "trace:azure_code"])
def test_named_scenarios_pass_check_env(scenario: str) -> None:
    check_env(TrafficEnv(scenario=scenario, episode_steps=10))


def _episode(env: gym.Env, seed: int, actions: np.ndarray) -> tuple[np.ndarray, list[float]]:
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    for a in actions:
        obs, reward, terminated, truncated, _ = env.step(np.array([a], dtype=np.float32))
        observations.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            break
    return np.stack(observations), rewards


def test_same_seed_same_episode_other_seed_other_episode() -> None:
    actions = np.sin(np.arange(30)) * 0.5
    env = gym.make(ENV_ID, episode_steps=30)
    obs_a, rew_a = _episode(env, 11, actions)
    obs_b, rew_b = _episode(gym.make(ENV_ID, episode_steps=30), 11, actions)
    obs_c, _ = _episode(env, 12, actions)
    assert np.array_equal(obs_a, obs_b) and rew_a == rew_b
    assert not np.array_equal(obs_a, obs_c)


def test_episode_truncates_at_the_registered_limit() -> None:
    env = gym.make(ENV_ID, scenario="steady")
    env.reset(seed=0)
    steps, truncated = 0, False
    while not truncated:
        _, _, terminated, truncated, info = env.step(np.zeros(1, dtype=np.float32))
        assert not terminated
        steps += 1
    assert steps == 120
    assert {"goodput_tokens", "p99_ms", "optimal_rate", "rate"} <= set(info)


def test_action_changes_the_rate_multiplicatively() -> None:
    env = TrafficEnv(scenario="steady", episode_steps=5)
    env.reset(seed=1)
    assert env.last_observation is not None
    before = float(env.last_observation.rate[0])
    _, _, _, _, info = env.step(np.array([1.0], dtype=np.float32))
    assert info["rate"] == pytest.approx(2 * before)
    _, _, _, _, info = env.step(np.array([-0.5], dtype=np.float32))
    assert info["rate"] == pytest.approx(2 * before * 4**-0.5)  # a cut goes up to 4x per interval
    _, _, _, _, info = env.step(np.array([-1.0], dtype=np.float32))
    assert info["rate"] == pytest.approx(before / 4)


def test_trace_file_replay_and_bad_arguments(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("t_s,demand_rps\n" + "".join(f"{t},{100 + 50 * (t % 7)}\n" for t in range(60)))
    env = TrafficEnv(trace=str(trace), episode_steps=200)
    env.reset(seed=0)
    assert env.sim is not None and env.sim.steps == 11  # 60 s of trace: a warm-up and 11 intervals
    with pytest.raises(ValueError, match="unknown scenario"):
        TrafficEnv(scenario="tsunami")
