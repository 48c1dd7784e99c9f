"""MLflow tracking and registry against a real local store (sqlite + file artifacts) in tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from controller.policies import fetch_rl
from policy.observation import OBS_DIM, OBS_FIELDS
from policy.rl import (
    DEFAULT_MODEL_PATH,
    N_FEATURES,
    ModelError,
    PolicyNetwork,
    RLPolicy,
    load,
    make_meta,
    n_params,
    save,
)
from training import registry
from training.registry import CHAMPION_URI, load_rl, load_uri


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh local MLflow store for this module, selected through MLFLOW_TRACKING_URI."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'db' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        registry.configure()
        yield uri


def policy_file(tmp_path: Path, seed: int) -> tuple[Path, PolicyNetwork]:
    """A saved policy with random weights."""
    rng = np.random.default_rng(seed)
    network = PolicyNetwork(rng.normal(0, 0.3, n_params(0)), np.zeros(N_FEATURES), np.ones(N_FEATURES), 0)
    return save(RLPolicy(network, make_meta(network, "test", {"seed": seed})), tmp_path / f"p{seed}.npz"), network


def register(tmp_path: Path, seed: int) -> tuple[str, PolicyNetwork]:
    """Log and register one policy in its own run; return the version and the weights."""
    path, network = policy_file(tmp_path, seed)
    with mlflow.start_run(run_name=registry.run_name("ratepilot/Traffic-v0", "ars", seed)):
        version = registry.register_candidate(registry.log_policy(path), {"seed": str(seed)})
    return version.version, network


def test_configure_puts_db_and_artifacts_in_the_chosen_folder(store: str) -> None:
    db = Path(store.removeprefix("sqlite:///"))
    assert db.is_file()
    experiment = registry.client().get_experiment_by_name(registry.EXPERIMENT)
    assert experiment is not None
    assert experiment.artifact_location == (db.parent / "artifacts").as_uri()


def test_run_name_is_cleanrl_style() -> None:
    now = datetime(2024, 1, 2, tzinfo=UTC)
    assert registry.run_name("ratepilot/Traffic-v0", "ars", 7, now) == f"ratepilot-Traffic-v0__ars__7__{int(now.timestamp())}"


def test_register_moves_candidate_and_models_uri_loads_the_same_policy(store: str, tmp_path: Path) -> None:
    first, _ = register(tmp_path, 1)
    second, network = register(tmp_path, 2)
    assert int(second) == int(first) + 1
    assert registry.version_by_alias(registry.CANDIDATE).version == second
    assert registry.version_by_alias("no-such-alias") is None
    loaded = load_uri("models:/ratepilot-policy@candidate", store)
    vectors = np.abs(np.random.default_rng(0).normal(0, 1, (5, OBS_DIM)))
    np.testing.assert_allclose(loaded.network.actions(vectors), network.actions(vectors))
    # the pyfunc flavour answers the same actions through its signature
    model = mlflow.pyfunc.load_model("models:/ratepilot-policy@candidate")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == list(OBS_FIELDS)
    actions = model.predict(pd.DataFrame(vectors, columns=list(OBS_FIELDS)))["action"].to_numpy()
    np.testing.assert_allclose(actions, network.actions(vectors))


def test_load_rl_prefers_the_champion(store: str, tmp_path: Path) -> None:
    version, network = register(tmp_path, 3)
    registry.client().set_registered_model_alias("ratepilot-policy", "champion", version)
    assert load_rl().meta["training"] == {"seed": 3}
    assert load_uri(CHAMPION_URI, store).meta["training"] == {"seed": 3}


def test_unknown_model_uri_is_a_model_error(store: str) -> None:
    with pytest.raises(ModelError, match="cannot fetch"):
        load_uri("models:/ratepilot-policy@nobody", store)


def test_log_evaluation_records_summary_metrics(store: str) -> None:
    report = {"scenarios": [], "summary": {"rl": {"goodput_ratio": 0.9, "slo_violation_frac": 0.01, "name": "x"}}}
    with mlflow.start_run() as run:
        registry.log_evaluation(report)
    logged = registry.client().get_run(run.info.run_id).data.metrics
    assert logged == {"eval/rl/goodput_ratio": 0.9, "eval/rl/slo_violation_frac": 0.01}


def test_models_uri_resolves_in_the_given_store_not_mlflows_global_one(store: str, tmp_path: Path) -> None:
    version, network = register(tmp_path, 4)
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    mlflow.set_tracking_uri(elsewhere)
    mlflow.set_registry_uri(elsewhere)
    try:
        loaded = load_uri(f"models:/ratepilot-policy/{version}", store)
        np.testing.assert_array_equal(loaded.network.theta, network.theta)
        assert not (tmp_path / "elsewhere.db").exists()
    finally:
        registry.configure(store)


def test_the_controllers_adapter_reads_the_same_registry(store: str, tmp_path: Path) -> None:
    version, network = register(tmp_path, 5)
    registry.client().set_registered_model_alias("ratepilot-policy", "champion", version)
    assert fetch_rl(None).meta["training"] == load_rl().meta["training"] == {"seed": 5}
    np.testing.assert_array_equal(fetch_rl(f"models:/ratepilot-policy/{version}").network.theta, network.theta)
    with pytest.raises(ModelError, match="cannot fetch"):
        fetch_rl("models:/ratepilot-policy@nobody")


def test_the_controllers_adapter_without_a_store_is_the_default_and_creates_nothing(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    np.testing.assert_array_equal(fetch_rl(None).network.theta, load(DEFAULT_MODEL_PATH).network.theta)
    assert not db.parent.exists()
