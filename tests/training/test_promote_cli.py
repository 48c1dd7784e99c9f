"""`ratepilot promote` against a real local MLflow store: first promotion, a rejected worse candidate, --force."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np

from policy.rl import N_FEATURES, PolicyNetwork, RLPolicy, make_meta, n_params, save
from training import registry
from training.promote import main
from training.registry import load_rl

FAST = ["--seeds", "1", "--suite", "default"]


def tags(version: str) -> dict[str, str]:
    """The tags of a registered version."""
    return dict(registry.client().get_model_version(registry.REGISTERED_MODEL, version).tags)


def register_cutting_policy(root: Path) -> str:
    """A deliberately bad candidate: it cuts the rate 4x (the fastest cut) every interval."""
    theta = np.zeros(n_params(0))
    theta[-1] = -1.0
    network = PolicyNetwork(theta, np.zeros(N_FEATURES), np.ones(N_FEATURES), 0)
    path = save(RLPolicy(network, make_meta(network, "hand-made: cut 4x")), root / "cutting.npz")
    with mlflow.start_run(run_name="cutting"):
        return registry.register_candidate(registry.log_policy(path)).version


def test_promote_first_then_reject_then_force(tracked_store: tuple[str, Path], tmp_path: Path, capsys) -> None:
    uri, root = tracked_store
    registry.configure(uri)
    first = registry.version_by_alias(registry.CANDIDATE).version
    assert main([*FAST, "--json", str(tmp_path / "first.json")]) == 0
    assert registry.version_by_alias(registry.CHAMPION).version == first
    assert tags(first)["promotion.decision"] == "promoted" and tags(first)["promotion.compared_with"] == "none"
    assert load_rl().meta["training"]["iterations"] == 2  # `rl` now means the champion
    assert main(FAST) == 0 and "already the champion" in capsys.readouterr().out

    worse = register_cutting_policy(root)
    assert main([*FAST, "--json", str(tmp_path / "second.json")]) == 0
    record = json.loads((tmp_path / "second.json").read_text())
    assert record["promote"] is False and "goodput_ratio lower" in record["reason"]
    assert record["metrics"]["candidate"]["goodput_ratio"] < record["metrics"]["champion"]["goodput_ratio"]
    assert registry.version_by_alias(registry.CHAMPION).version == first
    assert tags(worse)["promotion.decision"] == "rejected" and tags(worse)["promotion.compared_with"] == str(first)
    out = capsys.readouterr().out
    assert "candidate vs champion" in out and "goodput_ratio" in out

    assert main([*FAST, "--force"]) == 0
    assert registry.version_by_alias(registry.CHAMPION).version == worse
    assert tags(worse)["promotion.decision"] == "promoted" and tags(worse)["promotion.forced"] == "True"


def test_promote_refuses_bad_seeds(capsys) -> None:
    assert main(["--seeds", "0"]) == 2
    assert "ratepilot promote: --seeds must be >= 1" in capsys.readouterr().err
