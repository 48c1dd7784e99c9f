"""A local MLflow store with one tiny tracked training run, shared by the registry-level tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from training.train import main as train_main

TINY_TRACKED = [
    "--iterations", "2", "--dagger-rounds", "1", "--dagger-episodes", "4", "--validation-episodes", "3",
    "--episodes-per-iteration", "2", "--n-directions", "2", "--top-directions", "1", "--episode-steps", "12",
    "--eval-every", "1", "--eval-seeds", "1", "--eval-suites", "default", "--no-eval-plots",
]  # fmt: skip


@pytest.fixture(scope="session")
def tracked_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(tracking URI, folder) of a store holding one tiny training run registered as `candidate`."""
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        code = train_main([*TINY_TRACKED, "--out", str(root / "policy.npz"), "--run-dir", str(root / "runs")])
        assert code == 0
        yield uri, root
