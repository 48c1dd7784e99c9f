"""The learned policy: a tiny linear map or tanh MLP over normalised observation features.

Inference is numpy only and vectorised over tiers (and, for training, over many parameter
vectors at once with `batch_actions`), so the code that trains the policy is the code that
serves it. The artifact is one `.npz` file (a few hundred bytes to a few KB) holding the weights,
the observation normaliser and a JSON `meta` record with the observation schema; `load` refuses a
file whose schema, feature set, action space or shapes do not match this build, or that is corrupt, with one
error type, `ModelError`.

Decision for one tier, x = `Observation.vector[i]`:

    phi = features(x)                         # FEATURES below, schema OBS_SCHEMA
    z   = clip((phi - obs_mean) / obs_std, -Z_CLIP, Z_CLIP) ++ [1]
    a   = clip(z @ W, -1, 1)                  # linear (hidden = 0)
    a   = clip(tanh(z @ W0) ++ [1]) @ W1      # MLP    (hidden = H)
    new rate = action_to_rate(rate, a)        # rate * 4 ** a if a < 0 else rate * 2 ** a
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from policy.base import ACTION_SPACE, Policy, action_to_rate
from policy.observation import (
    ADMITTED_OVER_RATE,
    BIAS,
    CAPACITY_AGE,
    CPU,
    LN_CAPACITY_OVER_RATE,
    OBS_DIM,
    OBS_FIELDS,
    OBS_SCHEMA,
    P99_OVER_SLO,
    THROTTLED_OVER_RATE,
    Observation,
)

FORMAT = "ratepilot-policy"
FORMAT_VERSION = 1
FEATURE_SET = "rp-feat-v2"  # v2: the capacity estimate (observation schema v2) and two features derived from it
RAW_FEATURES = slice(0, BIAS)  # the observation columns the features keep, in place: all but the bias
FEATURES = (
    *OBS_FIELDS[RAW_FEATURES],  # the bias is added after normalisation
    "ln_admitted_over_rate",
    "ln_cpu",
    "p99_excess",  # max(p99/SLO - 1, 0): how far over the SLO
    "ln1p_throttled_over_rate",
    "fresh_ln_capacity_over_rate",  # ln(capacity estimate / rate) weighted by its freshness (1 - capacity_age)
    "capacity_shortfall",  # min(ln(capacity estimate / rate), 0): the rate is above the estimated capacity
)
N_FEATURES = len(FEATURES)
# Columns of the derived features, after the raw ones (FEATURES order)
(
    LN_ADMITTED_OVER_RATE,
    LN_CPU,
    P99_EXCESS,
    LN1P_THROTTLED_OVER_RATE,
    FRESH_LN_CAPACITY_OVER_RATE,
    CAPACITY_SHORTFALL,
) = range(BIAS, N_FEATURES)
Z_CLIP = 10.0  # normalised features are clipped to this many standard deviations
LOG_FLOOR = 0.01  # ratios below this enter the logs as this
MAX_HIDDEN = 64
REGISTERED_MODEL = "ratepilot-policy"
CHAMPION_URI = f"models:/{REGISTERED_MODEL}@champion"
ARTIFACT_NAME = "policy.npz"
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "models" / "default_policy.npz"
PROJECT_MLRUNS = Path(__file__).resolve().parents[1] / "mlruns"  # the default local MLflow store


class ModelError(ValueError):
    """A policy artifact that is missing, corrupt, or built for another observation schema."""


def features(vector: np.ndarray) -> np.ndarray:
    """The policy's input features from observation vectors of shape (..., OBS_DIM)."""
    x = np.asarray(vector, dtype=np.float64)
    if x.shape[-1] != OBS_DIM:
        raise ValueError(f"observation vectors need {OBS_DIM} entries, got shape {x.shape}")
    out = np.empty(x.shape[:-1] + (N_FEATURES,))
    out[..., RAW_FEATURES] = x[..., RAW_FEATURES]
    out[..., LN_ADMITTED_OVER_RATE] = np.log(np.maximum(x[..., ADMITTED_OVER_RATE], LOG_FLOOR))
    out[..., LN_CPU] = np.log(np.maximum(x[..., CPU], LOG_FLOOR))
    out[..., P99_EXCESS] = np.maximum(x[..., P99_OVER_SLO] - 1.0, 0.0)
    out[..., LN1P_THROTTLED_OVER_RATE] = np.log1p(np.maximum(x[..., THROTTLED_OVER_RATE], 0.0))
    out[..., FRESH_LN_CAPACITY_OVER_RATE] = x[..., LN_CAPACITY_OVER_RATE] * (1.0 - x[..., CAPACITY_AGE])
    out[..., CAPACITY_SHORTFALL] = np.minimum(x[..., LN_CAPACITY_OVER_RATE], 0.0)
    return out


def n_params(hidden: int) -> int:
    """Length of the flat parameter vector for a network with `hidden` units (0 = linear)."""
    if hidden == 0:
        return N_FEATURES + 1
    return (N_FEATURES + 1) * hidden + hidden + 1


def batch_actions(
    thetas: np.ndarray, feats: np.ndarray, obs_mean: np.ndarray, obs_std: np.ndarray, hidden: int
) -> np.ndarray:
    """Actions in [-1, 1] of P parameter vectors (P, n_params) on features (P, T, N_FEATURES) -> (P, T)."""
    z = np.clip((feats - obs_mean) / obs_std, -Z_CLIP, Z_CLIP)
    z = np.concatenate([z, np.ones(z.shape[:-1] + (1,))], axis=-1)
    if hidden == 0:
        out = np.einsum("ptf,pf->pt", z, thetas)
    else:
        cut = (N_FEATURES + 1) * hidden
        w0 = thetas[:, :cut].reshape(-1, N_FEATURES + 1, hidden)
        h = np.tanh(np.einsum("ptf,pfh->pth", z, w0))
        out = np.einsum("pth,ph->pt", h, thetas[:, cut:-1]) + thetas[:, -1:]
    return np.clip(out, -1.0, 1.0)


@dataclass(frozen=True)
class PolicyNetwork:
    """The weights: a flat parameter vector, its shape (`hidden`) and the observation normaliser."""

    theta: np.ndarray
    obs_mean: np.ndarray
    obs_std: np.ndarray
    hidden: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, int) or not 0 <= self.hidden <= MAX_HIDDEN:
            raise ModelError(f"hidden must be an integer in [0, {MAX_HIDDEN}], got {self.hidden!r}")
        expected = {"theta": (n_params(self.hidden),), "obs_mean": (N_FEATURES,), "obs_std": (N_FEATURES,)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.shape != shape:
                got = getattr(value, "shape", type(value).__name__)
                raise ModelError(f"{name} must have shape {shape}, got {got}")
            if not np.all(np.isfinite(value)):
                raise ModelError(f"{name} has non-finite values")
        if np.any(self.obs_std <= 0):
            raise ModelError("obs_std must be positive")

    @classmethod
    def zeros(cls, hidden: int = 0) -> PolicyNetwork:
        """A network that always answers 0 (keep the rate), with an identity normaliser."""
        return cls(np.zeros(n_params(hidden)), np.zeros(N_FEATURES), np.ones(N_FEATURES), hidden)

    def actions(self, vectors: np.ndarray) -> np.ndarray:
        """Actions in [-1, 1] for observation vectors of shape (n_tiers, OBS_DIM) -> (n_tiers,)."""
        z = np.clip((features(vectors) - self.obs_mean) / self.obs_std, -Z_CLIP, Z_CLIP)
        if self.hidden == 0:  # the same arithmetic as batch_actions for P = 1, without its batching overhead
            out = z @ self.theta[:-1] + self.theta[-1]
        else:
            cut = (N_FEATURES + 1) * self.hidden
            w0 = self.theta[:cut].reshape(N_FEATURES + 1, self.hidden)
            out = np.tanh(z @ w0[:-1] + w0[-1]) @ self.theta[cut:-1] + self.theta[-1]
        return np.clip(out, -1.0, 1.0)


@dataclass
class RLPolicy(Policy):
    """The learned policy: observation vector -> action in [-1, 1] -> new refill rate per tier."""

    name: ClassVar[str] = "rl"
    network: PolicyNetwork
    meta: dict[str, Any] = field(default_factory=dict)

    def act(self, observation: Observation) -> np.ndarray:
        """New refill rates in tokens/s, shape (n_tiers,)."""
        return action_to_rate(observation.rate, self.network.actions(observation.vector))

    def action(self, observation: Observation) -> np.ndarray:
        """The raw action in [-1, 1] per tier (what the simulator's action space takes)."""
        return self.network.actions(observation.vector)


def make_meta(network: PolicyNetwork, algorithm: str, training: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON record stored next to the weights."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "obs_schema": OBS_SCHEMA,
        "feature_set": FEATURE_SET,
        "action_space": ACTION_SPACE,
        "features": list(FEATURES),
        "architecture": "linear" if network.hidden == 0 else "mlp",
        "hidden": network.hidden,
        "algorithm": algorithm,
        "training": training or {},
    }


def save(policy: RLPolicy, path: str | Path) -> Path:
    """Write the policy atomically to `path` (.npz) and return the path."""
    path = Path(path)
    meta = dict(policy.meta) or make_meta(policy.network, "unknown")
    meta.update(obs_schema=OBS_SCHEMA, feature_set=FEATURE_SET, format=FORMAT, format_version=FORMAT_VERSION)
    meta["action_space"] = ACTION_SPACE
    meta["hidden"] = policy.network.hidden
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        meta=np.array(json.dumps(meta, sort_keys=True)),
        theta=policy.network.theta.astype(np.float64),
        obs_mean=policy.network.obs_mean.astype(np.float64),
        obs_std=policy.network.obs_std.astype(np.float64),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is meant to be read by services
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path) -> RLPolicy:
    """Read a policy file; ModelError if it is missing, corrupt or built for another schema."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such policy file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in ("meta", "theta", "obs_mean", "obs_std")}
    except KeyError as exc:
        raise ModelError(f"{path}: not a ratepilot policy (missing {exc})") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ModelError(f"{path}: corrupt policy file ({exc})") from None
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: corrupt meta record ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{path}: not a ratepilot policy file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: format version {meta.get('format_version')!r}, this build reads {FORMAT_VERSION}")
    if meta.get("obs_schema") != OBS_SCHEMA:
        raise ModelError(
            f"{path}: observation schema mismatch: model has {meta.get('obs_schema')!r}, this build has {OBS_SCHEMA!r}"
        )
    if meta.get("feature_set") != FEATURE_SET:
        raise ModelError(f"{path}: feature set {meta.get('feature_set')!r}, this build has {FEATURE_SET!r}")
    if meta.get("action_space") != ACTION_SPACE:  # same weights, other action space: other rates
        raise ModelError(
            f"{path}: trained for action space {meta.get('action_space')!r}, this build acts in {ACTION_SPACE!r}"
        )
    try:
        network = PolicyNetwork(
            arrays["theta"].astype(np.float64),
            arrays["obs_mean"].astype(np.float64),
            arrays["obs_std"].astype(np.float64),
            meta.get("hidden"),  # type: ignore[arg-type]
        )
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{path}: {exc}") from None
    return RLPolicy(network, meta)


def load_uri(uri: str, tracking_uri: str | None = None) -> RLPolicy:
    """Load a policy from a file path or an MLflow URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/PATH`)."""
    if "://" not in uri and not uri.startswith(("models:/", "runs:/")):
        return load(uri)
    import mlflow.artifacts  # lazy: only MLflow URIs need it
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        source = uri
        if uri.startswith("models:/"):  # resolve in *this* registry (MLflow's global default may be another store)
            client = MlflowClient(tracking_uri, tracking_uri)
            name, at, alias = uri.removeprefix("models:/").partition("@")
            if at:
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, _, number = name.partition("/")
                version = client.get_model_version(name, number)
            source = client.get_model_version_download_uri(version.name, version.version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri))
    except MlflowException as exc:
        raise ModelError(f"{uri}: cannot fetch model ({exc.message})") from None
    candidates = [local] if local.is_file() else sorted(local.rglob(ARTIFACT_NAME))
    if not candidates:
        raise ModelError(f"{uri}: no {ARTIFACT_NAME} in the model's artifacts")
    return load(candidates[0])


def tracking_uri() -> str:
    """The MLflow tracking store: `MLFLOW_TRACKING_URI`, else a sqlite file under the project's mlruns/."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_MLRUNS / 'mlflow.db'}"


def load_rl(spec: str | None = None) -> RLPolicy:
    """`rl` as the CLIs mean it: `spec` (path or MLflow URI) if given, else the registry's champion
    when one exists, else the committed default policy."""
    if spec:
        return load_uri(spec, tracking_uri())
    uri = tracking_uri()
    local_db = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if local_db is not None and not Path(local_db).is_file():
        return load(DEFAULT_MODEL_PATH)  # no store yet, so no champion: don't create one just to look
    from mlflow import MlflowClient  # lazy: only the registry needs it
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(REGISTERED_MODEL, "champion")
    except MlflowException:
        return load(DEFAULT_MODEL_PATH)  # no champion yet
    return load_uri(CHAMPION_URI, uri)  # a champion that fails to load is an error, not a silent fallback
