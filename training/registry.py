"""MLflow tracking and model registry for the policy: where runs go, how the policy is logged and registered.

The default store is local: a sqlite database `mlruns/mlflow.db` in the project with artifacts in
`mlruns/artifacts/`; `MLFLOW_TRACKING_URI` points it anywhere else (for a sqlite URI the artifacts
go next to the database file). Training logs the policy as a pyfunc model (input: the observation
vector's fields, output: the action in [-1, 1]) and registers it as a new version of
`ratepilot-policy` with the alias `candidate`; `ratepilot promote` moves `champion`. `load_rl` is
what `rl` means to the training CLIs: a policy file or MLflow URI, else the champion, else the
committed default policy (the controller reads the registry through its own adapter,
`controller/policies.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from policy.observation import OBS_FIELDS
from policy.rl import DEFAULT_MODEL_PATH, ModelError, RLPolicy, load

REGISTERED_MODEL = "ratepilot-policy"
CANDIDATE = "candidate"
CHAMPION = "champion"
CHAMPION_URI = f"models:/{REGISTERED_MODEL}@{CHAMPION}"
ARTIFACT_NAME = "policy.npz"  # the policy file's name inside a logged model's artifacts
PROJECT_MLRUNS = Path(__file__).resolve().parents[1] / "mlruns"  # the default local MLflow store
EXPERIMENT = "ratepilot"
METRIC_KEYS = ("goodput_ratio", "slo_violation_frac", "p99_latency_ms", "throttle_frac", "error_frac", "rate_tracking_error")


def tracking_uri() -> str:
    """The MLflow tracking store: `MLFLOW_TRACKING_URI`, else a sqlite file under the project's mlruns/."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_MLRUNS / 'mlflow.db'}"


def is_mlflow_uri(spec: str) -> bool:
    """Whether a policy spec names an MLflow model or artifact rather than a file."""
    return "://" in spec or spec.startswith(("models:/", "runs:/"))


def fetch(uri: str, store: str | None = None) -> Path:
    """The policy file of an MLflow URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/PATH`),
    downloaded from `store` (default: `tracking_uri()`), which becomes the configured store."""
    store = store or tracking_uri()
    mlflow.set_tracking_uri(store)  # models:/ resolves in *this* registry, whatever MLflow's global was
    mlflow.set_registry_uri(store)
    try:
        if not uri.startswith("models:/"):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=store))
            found = [local] if local.is_file() else sorted(local.rglob(ARTIFACT_NAME))
            if not found:
                raise FileNotFoundError(f"no {ARTIFACT_NAME} in the model's artifacts")
            return found[0]
        name, at, alias = uri.removeprefix("models:/").partition("@")
        version = client().get_model_version_by_alias(name, alias) if at else client().get_model_version(*name.split("/", 1))
        return download_policy(version)
    except MlflowException as exc:
        raise ModelError(f"{uri}: cannot fetch model ({exc.message})") from None
    except FileNotFoundError as exc:
        raise ModelError(f"{uri}: {exc}") from None


def load_uri(uri: str, store: str | None = None) -> RLPolicy:
    """Load a policy from a file path or an MLflow URI (see `fetch`)."""
    return load(fetch(uri, store) if is_mlflow_uri(uri) else uri)


def policy_file(spec: str | None = None) -> Path:
    """The file `rl` means to the training CLIs: `spec` (a path, or an MLflow URI fetched) if given, else
    the registry's champion when one exists, else the committed default policy."""
    uri = tracking_uri()
    if spec:
        return fetch(spec, uri) if is_mlflow_uri(spec) else Path(spec)
    local_db = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if local_db is not None and not Path(local_db).is_file():
        return DEFAULT_MODEL_PATH  # no store yet, so no champion: don't create one just to look
    try:
        MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    except MlflowException:
        return DEFAULT_MODEL_PATH  # no champion yet
    return fetch(CHAMPION_URI, uri)  # a champion that fails to load is an error, not a silent fallback


def load_rl(spec: str | None = None) -> RLPolicy:
    """The policy `rl` means to the training CLIs (see `policy_file`)."""
    return load(policy_file(spec))


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: next to a sqlite database, else the server's default."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


def configure(uri: str | None = None) -> str:
    """Point MLflow (tracking and registry) at `uri` or the default store; make the experiment; return the URI."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT, artifact_location=artifact_root(uri))
    mlflow.set_experiment(EXPERIMENT)
    return uri


def client() -> MlflowClient:
    """A client of the configured store."""
    uri = mlflow.get_tracking_uri()
    return MlflowClient(uri, mlflow.get_registry_uri() or uri)


def run_name(env_id: str, algorithm: str, seed: int, now: datetime | None = None) -> str:
    """CleanRL-style run name `{env}__{algo}__{seed}__{time}` (unix seconds)."""
    stamp = int((now or datetime.now(UTC)).timestamp())
    return f"{env_id.replace('/', '-')}__{algorithm}__{seed}__{stamp}"


def log_args(args: Any) -> None:
    """Log every field of an Args dataclass as an MLflow parameter."""
    mlflow.log_params({f.name: getattr(args, f.name) for f in dataclasses.fields(args)})


def log_json(obj: Any, artifact_file: str) -> None:
    """Log a JSON-serialisable object as an artifact of the active run."""
    mlflow.log_dict(obj, artifact_file)


def log_evaluation(report: dict[str, Any], prefix: str = "eval") -> None:
    """Log the harness report: the JSON as an artifact, the summary as metrics `{prefix}/{policy}/{metric}`."""
    log_json(report, f"{prefix}/evaluation.json")
    metrics = {
        f"{prefix}/{policy}/{key}": float(value)
        for policy, values in report.get("summary", {}).items()
        for key, value in values.items()
        if isinstance(value, int | float) and np.isfinite(value)
    }
    mlflow.log_metrics(metrics)


def policy_signature() -> ModelSignature:
    """Input: the observation vector's fields (doubles); output: the action."""
    return ModelSignature(
        inputs=Schema([ColSpec("double", name) for name in OBS_FIELDS]), outputs=Schema([ColSpec("double", "action")])
    )


def log_policy(policy_path: Path) -> str:
    """Log the policy file as a pyfunc model of the active run; return its model URI."""
    staging = Path(tempfile.mkdtemp(prefix="ratepilot-policy-"))
    staged = staging / ARTIFACT_NAME  # the loaders look for this name inside the model's artifacts
    shutil.copyfile(policy_path, staged)
    info = mlflow.pyfunc.log_model(
        name="policy",
        python_model=str(Path(__file__).with_name("policy_pyfunc.py")),
        artifacts={"policy": str(staged)},
        signature=policy_signature(),
        input_example=pd.DataFrame([dict.fromkeys(OBS_FIELDS, 0.0) | {"bias": 1.0}]),
        pip_requirements=["numpy", "pandas", "mlflow"],
    )
    shutil.rmtree(staging, ignore_errors=True)
    return str(info.model_uri)


def register_candidate(model_uri: str, tags: dict[str, str] | None = None) -> ModelVersion:
    """Register `model_uri` as a new version of ratepilot-policy and point the `candidate` alias at it."""
    version = mlflow.register_model(model_uri, REGISTERED_MODEL, tags=tags or {})
    client().set_registered_model_alias(REGISTERED_MODEL, CANDIDATE, version.version)
    return version


def version_by_alias(alias: str) -> ModelVersion | None:
    """The model version an alias points at, or None when the alias (or the model) does not exist."""
    try:
        return client().get_model_version_by_alias(REGISTERED_MODEL, alias)
    except MlflowException:
        return None


def download_policy(version: ModelVersion) -> Path:
    """The policy file of a registered version (of the configured store), downloaded to a temporary folder."""
    target = Path(tempfile.mkdtemp(prefix="ratepilot-model-"))
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}",
            dst_path=str(target),
            tracking_uri=mlflow.get_tracking_uri(),
            registry_uri=mlflow.get_registry_uri(),
        )
    )
    found = sorted(local.rglob(ARTIFACT_NAME))
    if not found:
        raise FileNotFoundError(f"version {version.version} of {version.name} has no {ARTIFACT_NAME}")
    return found[0]


def set_version_tags(version: str, tags: dict[str, Any]) -> None:
    """Set tags on a registered version (values stored as strings, dicts as JSON)."""
    c = client()
    for key, value in tags.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
        c.set_model_version_tag(REGISTERED_MODEL, version, key, text)
