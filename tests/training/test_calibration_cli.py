"""`ratepilot train --calibration` and `ratepilot evaluate --calibration`: the calibrated worlds are used,
logged to MLflow with the model, and a bad file is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from policy.rl import load
from tests.training.test_calibration import known
from training.calibrate import write_calibration
from training.evaluate import main as evaluate_main
from training.train import main as train_main

TINY = [
    "--iterations", "1", "--dagger-rounds", "1", "--dagger-episodes", "2", "--validation-episodes", "2",
    "--episodes-per-iteration", "2", "--n-directions", "2", "--top-directions", "1", "--episode-steps", "8",
    "--eval-every", "1", "--eval-seeds", "1", "--eval-suites", "default", "--no-eval-plots",
]  # fmt: skip


def test_training_on_a_calibration_logs_it_with_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calibration = write_calibration(known(), tmp_path / "cal.json")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "policy.npz"
    code = train_main([*TINY, "--calibration", str(calibration), "--out", str(out), "--run-dir", str(tmp_path / "runs")])
    assert code == 0
    info = load(out).meta["training"]["calibration"]
    assert info["capacity_tps"] == known().capacity_tps and info["path"] == str(calibration)
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["ratepilot"], output_format="list")[0]
    assert float(run.data.params["calibration.knee_a"]) == known().knee_a
    artifacts = mlflow.MlflowClient().list_artifacts(run.info.run_id, "calibration")
    assert [Path(a.path).name for a in artifacts] == ["cal.json"]


def test_evaluate_in_calibrated_worlds(tmp_path: Path) -> None:
    calibration = write_calibration(known(), tmp_path / "cal.json")
    report = tmp_path / "report.json"
    argv = ["--suite", "default", "--policies", "static,oracle", "--seeds", "1", "--steps", "6", "--no-plots", "--json", str(report)]
    assert evaluate_main([*argv, "--calibration", str(calibration)]) == 0
    calibrated = json.loads(report.read_text())["summary"]
    assert evaluate_main(argv) == 0
    assert json.loads(report.read_text())["summary"] != calibrated  # other worlds, other figures


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_bad_calibration_file_is_refused_before_any_work(tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "cal.json"
    bad.write_text(json.dumps({"schema": "ratepilot.calibration", "version": 1, "model": {"capacity_tps": 5}}))
    if command == "train":
        code = train_main([*TINY, "--calibration", str(bad), "--out", str(tmp_path / "p.npz"), "--run-dir", str(tmp_path / "runs"), "--no-mlflow"])
    else:
        code = evaluate_main(["--calibration", str(bad), "--seeds", "1", "--steps", "2", "--no-plots"])
    assert code == 2
    assert "missing field" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "p.npz").exists()
