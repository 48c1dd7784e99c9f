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
    new rate = apply_action(space, rate, x, a)  # anchor * 4 ** a if a < 0 else anchor * 2 ** a

The anchor is the rate in force (action space `policy.base.RELATIVE`) or, for a model trained in
`policy.base.ANCHORED`, the capacity estimate when it was refreshed this interval (else the rate in
force); the model file names its action space and `load` reads either.
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

from policy.base import ACTION_SPACE, ACTION_SPACES, Policy, apply_action
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
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "models" / "default_policy.npz"


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

    @property
    def action_space(self) -> str:
        """The action space the weights were trained in (`policy.base.ACTION_SPACES`), from `meta`."""
        return str(self.meta.get("action_space", ACTION_SPACE))

    def act(self, observation: Observation) -> np.ndarray:
        """New refill rates in tokens/s, shape (n_tiers,)."""
        vector = observation.vector
        return apply_action(self.action_space, observation.rate, vector, self.network.actions(vector))

    def action(self, observation: Observation) -> np.ndarray:
        """The raw action in [-1, 1] per tier (what the simulator's action space takes)."""
        return self.network.actions(observation.vector)


def make_meta(
    network: PolicyNetwork, algorithm: str, training: dict[str, Any] | None = None, action_space: str = ACTION_SPACE
) -> dict[str, Any]:
    """The JSON record stored next to the weights."""
    if action_space not in ACTION_SPACES:
        raise ValueError(f"unknown action space {action_space!r}; choose from {', '.join(ACTION_SPACES)}")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "obs_schema": OBS_SCHEMA,
        "feature_set": FEATURE_SET,
        "action_space": action_space,
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
    meta["action_space"] = policy.action_space
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


MEMBERS = ("meta", "theta", "obs_mean", "obs_std")  # the arrays of a policy file


def _read_members(path: Path) -> dict[str, np.ndarray]:
    """The policy arrays of an .npz file, read without pickle; ModelError saying in plain words what is wrong."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        size = path.stat().st_size
        what = "an empty file" if size == 0 else f"{size} bytes that are not a complete ZIP archive (truncated, or another kind of file)"
        raise ModelError(f"{path}: not a policy file: a policy is an .npz (ZIP) archive, this is {what}") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the policy file ({exc.strerror})") from None
    with archive:
        held = {name.removesuffix(".npy") for name in archive.namelist()}
        missing = [name for name in MEMBERS if name not in held]
        if missing:
            raise ModelError(
                f"{path}: not a ratepilot policy: the archive has no {', '.join(repr(m) for m in missing)} "
                f"(it holds {', '.join(sorted(held)) or 'nothing'}; a policy holds {', '.join(MEMBERS)})"
            )
        arrays = {}
        for name in MEMBERS:
            try:
                with archive.open(f"{name}.npy") as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError):  # a CRC or inflate error: damaged bytes
                raise ModelError(f"{path}: the policy file is damaged: its {name!r} array does not decompress intact") from None
            except ValueError as exc:
                reason = (
                    "holds Python objects, not numbers (refused: reading it would mean unpickling)"
                    if "pickle" in str(exc).lower()
                    else "is not a numpy array"
                )
                raise ModelError(f"{path}: the policy file's {name!r} member {reason}") from None
    for name in MEMBERS[1:]:
        if arrays[name].dtype.kind not in "fiu":
            raise ModelError(f"{path}: the policy file's {name!r} array holds {arrays[name].dtype} values, not numbers")
    return arrays


def load(path: str | Path) -> RLPolicy:
    """Read a policy file; ModelError if it is missing, corrupt or built for another schema."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not a policy file")
    if not path.is_file():
        raise ModelError(f"{path}: no such policy file")
    arrays = _read_members(path)
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: corrupt meta record: not JSON ({exc.msg} at character {exc.pos})") from None
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
    if meta.get("action_space") not in ACTION_SPACES:  # same weights, other action space: other rates
        raise ModelError(
            f"{path}: trained for action space {meta.get('action_space')!r}, this build acts in {' or '.join(map(repr, ACTION_SPACES))}"
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


def load_file(spec: str | Path | None = None) -> RLPolicy:
    """`make_policy("rl", spec=FILE)`: the policy file `spec`, else the committed default policy."""
    return load(spec or DEFAULT_MODEL_PATH)
