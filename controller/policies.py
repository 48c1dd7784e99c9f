"""Model-loading glue: build the configured policy, and swap it on reload only if the new one loads.

`rl` is a policy file read by `policy.rl.load`: the `.npz` path given, or one fetched from the MLflow
registry by this module's small adapter (`fetch_rl`: an MLflow URI such as
`models:/ratepilot-policy@champion`, or by default the registry's champion, else the packaged
default policy); every other name is a baseline from `policy.registry.make_policy`. A load that fails for any reason (corrupt file, schema mismatch,
MLflow unreachable, unknown baseline) raises `PolicyLoadError` and the policy in force stays.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.settings import PolicySettings
from policy.base import Policy
from policy.rl import DEFAULT_MODEL_PATH, ModelError, RLPolicy, load

INFO_KEYS = ("algorithm", "architecture", "hidden", "obs_schema", "feature_set", "format_version")
# What `ratepilot train` registers and `ratepilot promote` moves (training/registry.py; docs/contracts.md)
CHAMPION_MODEL, CHAMPION_ALIAS = "ratepilot-policy", "champion"
CHAMPION_URI = f"models:/{CHAMPION_MODEL}@{CHAMPION_ALIAS}"
POLICY_ARTIFACT = "policy.npz"  # the policy file inside a registered model's artifacts
DEFAULT_STORE = f"sqlite:///{Path(__file__).resolve().parents[1] / 'mlruns' / 'mlflow.db'}"  # as training's default


class PolicyLoadError(RuntimeError):
    """The policy could not be built or loaded; the message says which and why."""


@dataclass(frozen=True)
class LoadedPolicy:
    """A policy in force and where it came from."""

    policy: Policy
    name: str
    model: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        """JSON-able description for /status and the logs."""
        return {"name": self.name, "model": self.model, "info": self.info, "loaded_at": self.loaded_at}


def fetch_rl(model: str | None) -> RLPolicy:
    """The `rl` policy: the file or MLflow URI `model`, else the registry's champion when there is one,
    else the packaged default. The store is `MLFLOW_TRACKING_URI`, else the project's sqlite file."""
    if model and "://" not in model and not model.startswith(("models:/", "runs:/")):
        return load(model)
    store = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    if not model and not _has_champion(store):
        return load(DEFAULT_MODEL_PATH)
    return load(_download(model or CHAMPION_URI, store))  # a champion that fails to load is an error


def _has_champion(store: str) -> bool:
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        return False  # no store, so no champion (and looking would create an empty store)
    from mlflow import MlflowClient  # lazy: only registry look-ups need MLflow
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(store, store).get_model_version_by_alias(CHAMPION_MODEL, CHAMPION_ALIAS)
    except MlflowException:
        return False
    return True


def _download(uri: str, store: str) -> Path:
    """The policy file of a registered model or run artifact, resolved in `store` (not MLflow's global default)."""
    import mlflow.artifacts  # lazy: only registry look-ups need MLflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        source = uri
        if uri.startswith("models:/"):  # models:/NAME@ALIAS or models:/NAME/VERSION, looked up in `store`
            registry = MlflowClient(store, store)
            name, at, alias = uri.removeprefix("models:/").partition("@")
            found_version = registry.get_model_version_by_alias(name, alias) if at else registry.get_model_version(*name.split("/", 1))
            source = registry.get_model_version_download_uri(found_version.name, found_version.version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=store))
    except MlflowException as exc:
        raise ModelError(f"{uri}: cannot fetch model ({exc.message})") from None
    found = [local] if local.is_file() else sorted(local.rglob(POLICY_ARTIFACT))
    if not found:
        raise ModelError(f"{uri}: no {POLICY_ARTIFACT} in the model's artifacts")
    return found[0]


def pin_alias(uri: str) -> str:
    """`models:/NAME@ALIAS` as `models:/NAME/VERSION`, the version the alias points at now (so what was
    loaded is known exactly); any other spec unchanged. PolicyLoadError when the alias cannot be resolved."""
    if not uri.startswith("models:/") or "@" not in uri:
        return uri
    store = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        raise PolicyLoadError(f"{uri}: no MLflow store at {store}")
    from mlflow import MlflowClient  # lazy: only registry look-ups need MLflow
    from mlflow.exceptions import MlflowException

    name, _, alias = uri.removeprefix("models:/").partition("@")
    try:
        version = MlflowClient(store, store).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise PolicyLoadError(f"{uri}: cannot resolve the alias ({exc.message})") from None
    return f"models:/{name}/{version.version}"


def load_policy(settings: PolicySettings) -> LoadedPolicy:
    """Build the policy the settings name; PolicyLoadError on any failure."""
    if settings.name == "rl":
        try:
            rl = fetch_rl(settings.model)
        except Exception as exc:  # noqa: BLE001 - ModelError, MLflow, I/O: all mean "keep the old one"
            raise PolicyLoadError(f"rl model {settings.model or '(champion or default)'}: {exc}") from None
        meta = getattr(rl, "meta", {}) or {}
        info = {key: meta[key] for key in INFO_KEYS if key in meta}
        return LoadedPolicy(rl, "rl", settings.model, info)
    try:
        from policy.registry import make_policy
    except ImportError as exc:
        raise PolicyLoadError(f"baseline policies unavailable: {exc}") from None
    try:
        baseline = make_policy(settings.name, **settings.params)
    except Exception as exc:  # noqa: BLE001 - unknown name or bad params
        raise PolicyLoadError(f"policy {settings.name!r}: {exc}") from None
    return LoadedPolicy(baseline, settings.name, None, {"params": dict(settings.params)})


class PolicyHolder:
    """The policy in force; `reload` replaces it atomically or not at all."""

    def __init__(self, initial: LoadedPolicy, settings: PolicySettings):
        self._current = initial
        self.settings = settings
        self.last_error: str | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> LoadedPolicy:
        """The policy in force."""
        return self._current

    def reload(self, settings: PolicySettings | None = None) -> LoadedPolicy:
        """Load `settings` (default: the current ones again); on failure raise and keep the policy in force."""
        wanted = settings or self.settings
        with self._lock:
            try:
                loaded = load_policy(wanted)
            except PolicyLoadError as exc:
                self.last_error = str(exc)
                raise
            self._current, self.settings, self.last_error = loaded, wanted, None
            return loaded
