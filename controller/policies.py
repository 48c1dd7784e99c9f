"""Model-loading glue: build the configured policy, and swap it on reload only if the new one loads.

`rl` comes from `policy.rl` (a .npz file, an MLflow URI such as `models:/ratepilot-policy@champion`,
or by default the registry's champion / the packaged default); every other name is a baseline from
`policy.registry.make_policy`. A load that fails for any reason (corrupt file, schema mismatch,
MLflow unreachable, unknown baseline) raises `PolicyLoadError` and the policy in force stays.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from controller.settings import PolicySettings
from policy.base import Policy

INFO_KEYS = ("algorithm", "architecture", "hidden", "obs_schema", "feature_set", "format_version")


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


def load_policy(settings: PolicySettings) -> LoadedPolicy:
    """Build the policy the settings name; PolicyLoadError on any failure."""
    if settings.name == "rl":
        try:
            from policy.rl import load_rl
        except ImportError as exc:
            raise PolicyLoadError(f"rl policy unavailable: {exc}") from None
        try:
            rl = load_rl(settings.model)
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
