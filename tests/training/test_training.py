"""Training on the real simulator: a real learning signal, the CLI, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from policy.observation import OBS_DIM
from policy.rl import load
from training.scenarios import TRAIN_SEED_OFFSET
from training.train import main
from training.trainer import Args, Trainer, sample_episodes, training_names, validation_episodes

TINY = [
    "--dagger-rounds", "1", "--dagger-episodes", "4", "--validation-episodes", "3", "--episodes-per-iteration", "2",
    "--n-directions", "2", "--top-directions", "1", "--episode-steps", "12", "--eval-every", "1",
    "--eval-seeds", "1", "--eval-suites", "default", "--no-eval-plots",
]  # fmt: skip


def test_a_few_ars_iterations_beat_the_initial_policy() -> None:
    """From the do-nothing policy (zeros), 6 ARS iterations raise the validation objective clearly."""
    args = Args(dagger_rounds=0, n_directions=4, top_directions=2, episodes_per_iteration=4, episode_steps=30,
                validation_episodes=6, step_size=0.05, noise=0.05, seed=1)  # fmt: skip
    trainer = Trainer.start(args)
    before = trainer.validate()
    for _ in range(6):
        trainer.iterate()
    after = trainer.validate()
    assert after["objective"] > before["objective"] + 0.3, (before, after)
    assert trainer.best["iteration"] == 6


def test_dagger_initialisation_beats_doing_nothing() -> None:
    args = Args(dagger_rounds=2, dagger_episodes=8, episode_steps=30, validation_episodes=6, seed=3)
    zeros = Trainer.start(Args(dagger_rounds=0, episode_steps=30, validation_episodes=6)).validate()
    assert Trainer.start(args).validate()["objective"] > zeros["objective"] + 0.3


def test_training_never_uses_evaluation_seeds_nor_held_out_trace_windows() -> None:
    args = Args(episode_steps=12, validation_episodes=12)
    episodes = sample_episodes(args, np.random.default_rng(0), 40) + validation_episodes(args)
    assert all(e.seed >= TRAIN_SEED_OFFSET for e in episodes)
    assert any(e.name.startswith("trace:") for e in episodes)


def test_checkpoint_round_trip_continues_identically() -> None:
    args = Args(dagger_rounds=0, n_directions=2, top_directions=1, episodes_per_iteration=2, episode_steps=10, validation_episodes=2)
    trainer = Trainer.start(args)
    trainer.iterate()
    copy = Trainer.from_state(json.loads(json.dumps(trainer.state())))
    trainer.iterate()
    copy.iterate()
    np.testing.assert_array_equal(trainer.ars.theta, copy.ars.theta)
    np.testing.assert_array_equal(trainer.ars.obs_stat.mean, copy.ars.obs_stat.mean)


def test_validation_renews_the_curriculum_and_a_checkpoint_keeps_it() -> None:
    """Weights come from the gap to the best baseline on the validation episodes; a resumed run samples alike."""
    args = Args(dagger_rounds=0, n_directions=2, top_directions=1, episodes_per_iteration=3, episode_steps=10,
                validation_episodes=21, curriculum=0.8)  # fmt: skip
    trainer = Trainer.start(args)  # zeros: the do-nothing policy, which baselines beat in some worlds
    trainer.validate()
    names = set(training_names(args)[0]) | set(training_names(args)[1])
    assert set(trainer.weights) == names and sum(trainer.weights.values()) == pytest.approx(1.0)
    assert max(trainer.weights.values()) > 1.5 / len(names)  # skewed toward where the baselines win
    copy = Trainer.from_state(json.loads(json.dumps(trainer.state())))
    assert copy.weights == trainer.weights
    trainer.iterate()
    copy.iterate()
    np.testing.assert_array_equal(trainer.ars.theta, copy.ars.theta)
    uniform = Trainer.start(dataclasses.replace(args, curriculum=0.0))
    uniform.validate()
    assert uniform.weights == {}  # curriculum off: names are drawn uniformly


def test_train_cli_writes_a_policy_and_resumes(tmp_path: Path) -> None:
    out, runs = tmp_path / "policy.npz", tmp_path / "runs"
    common = ["--out", str(out), "--run-dir", str(runs), "--no-mlflow"]
    assert main([*TINY, *common, "--iterations", "2", "--json", str(tmp_path / "first.json")]) == 0
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["training"]["iterations"] == 2
    assert set(first["evaluation"]["default"]) >= {"rl", "static", "threshold", "aimd", "gradient", "pid", "oracle"}
    policy = load(out)
    assert policy.meta["training"]["iterations"] == 2 and out.stat().st_size < 50_000
    checkpoint = next(runs.glob("*/checkpoint.json"))
    assert (checkpoint.parent / "learning_curve.png").stat().st_size > 0
    assert main(["--resume", str(checkpoint), "--iterations", "3", *common, "--json", str(tmp_path / "second.json")]) == 0
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["training"]["iterations"] == 3
    assert [c["iteration"] for c in second["curve"]] == [0, 1, 2, 3]


def test_train_cli_refuses_bad_options(tmp_path: Path, capsys) -> None:
    bad_options = (["--n-directions", "0"], ["--top-directions", "9"], ["--trace-share", "2"], ["--eval-suites", "nope"],
                   ["--suite", "unseen"], ["--curriculum", "1.5"], ["--init-model", str(tmp_path / "none.npz")],
                   ["--action-space", "absolute"], ["--dagger-margin", "0"])  # fmt: skip
    for bad in bad_options:
        assert main([*bad, "--no-mlflow", "--out", str(tmp_path / "p.npz")]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith("ratepilot train:") and len(err.splitlines()) == 1
    result = subprocess.run(  # through the console entry point as well
        [sys.executable, "-m", "ratepilot.cli", "train", "--hidden", "-1", "--no-mlflow", "--out", str(tmp_path / "p.npz")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("ratepilot train: invalid value for --hidden")
    assert not (tmp_path / "p.npz").exists()


OLD_FEATURES = [  # the feature set of observation schema v1 (the model committed before the capacity estimate)
    "p99_over_slo", "error_rate", "cpu", "admitted_over_rate", "throttled_over_rate", "log_rate_over_ref",
    "d_p99_over_slo", "d_error_rate", "d_throttled_over_rate", "d_log_rate", "missing",
    "ln_admitted_over_rate", "ln_cpu", "p99_excess", "ln1p_throttled_over_rate",
]  # fmt: skip


def write_old_model(path: Path, names: list[str], hidden: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A policy file of an older feature set (as `policy.rl.save` wrote it then); returns theta, mean, std."""
    rng = np.random.default_rng(seed)
    theta, mean, std = rng.normal(0, 0.3, len(names) + 1), rng.normal(0, 1, len(names)), rng.uniform(0.5, 2, len(names))
    meta = {"features": names, "hidden": hidden, "obs_schema": "ratepilot-obs-v1:..."}
    np.savez(path, meta=np.array(json.dumps(meta)), theta=theta, obs_mean=mean, obs_std=std)
    return theta, mean, std


def test_warm_start_acts_exactly_as_the_older_policy_and_gives_new_features_weight_zero(tmp_path: Path) -> None:
    from policy.rl import FEATURES, Z_CLIP, PolicyNetwork, features
    from training.trainer import warm_start

    theta, mean, std = write_old_model(tmp_path / "old.npz", OLD_FEATURES)
    args = Args(init_model=str(tmp_path / "old.npz"), dagger_episodes=3, episode_steps=6)
    new_theta, stat = warm_start(args, np.random.default_rng(0))
    index = [FEATURES.index(name) for name in OLD_FEATURES]
    assert set(np.flatnonzero(new_theta[:-1])) <= set(index) and new_theta[-1] == theta[-1]
    np.testing.assert_allclose(stat.mean[index], mean)
    np.testing.assert_allclose(stat.std[index], std)
    network = PolicyNetwork(new_theta, stat.mean, stat.std)
    vectors = np.abs(np.random.default_rng(1).normal(0.5, 1.0, (50, OBS_DIM)))
    old_z = np.clip((features(vectors)[:, index] - mean) / std, -Z_CLIP, Z_CLIP)
    expected = np.clip(old_z @ theta[:-1] + theta[-1], -1, 1)
    np.testing.assert_allclose(network.actions(vectors), expected, atol=1e-12)
    others = [i for i in range(len(FEATURES)) if i not in index]
    assert np.all(stat.std[others] > 0) and stat.count > 0  # new features normalised by the states visited


def test_warm_start_refuses_what_it_cannot_carry_over(tmp_path: Path) -> None:
    from training.trainer import warm_start

    write_old_model(tmp_path / "alien.npz", [*OLD_FEATURES[:3], "telepathy"])
    write_old_model(tmp_path / "mlp.npz", OLD_FEATURES, hidden=4)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name, message in (("alien", "lacks"), ("mlp", "linear"), ("junk", "not a policy file")):
        with pytest.raises(ValueError, match=message):
            warm_start(Args(init_model=str(tmp_path / f"{name}.npz"), dagger_episodes=1, episode_steps=4), np.random.default_rng(0))
