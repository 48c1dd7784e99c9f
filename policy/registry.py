"""Policies by name: `make_policy("aimd", increase=0.1)`. Adding a policy is one line in POLICIES."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from policy.base import Policy
from policy.baselines import AIMD, PID, Gradient, LateOracle, NoLimit, Oracle, Static, Threshold

PolicyFactory = Callable[..., Policy]


def lazy(module: str, attribute: str) -> PolicyFactory:
    """A factory that imports `module.attribute` only when the policy is made (heavy or optional deps)."""

    def factory(**params: Any) -> Policy:
        return getattr(importlib.import_module(module), attribute)(**params)  # type: ignore[no-any-return]

    factory.__doc__ = f"{module}.{attribute}"
    return factory


POLICIES: dict[str, PolicyFactory] = {
    "static": Static,
    "none": NoLimit,
    "threshold": Threshold,
    "aimd": AIMD,
    "gradient": Gradient,
    "pid": PID,
    "oracle": Oracle,
    "oracle_late": LateOracle,
    "rl": lazy("policy.rl", "load_file"),  # spec= a policy file, else the committed default (MLflow: training.registry)
}


class UnknownPolicyError(KeyError):
    """A policy name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_policy(name: str, factory: PolicyFactory) -> None:
    """Make `name` available to make_policy (a plug-in hook; the built-ins are in POLICIES)."""
    POLICIES[name] = factory


def policy_names() -> list[str]:
    """The registered names."""
    return list(POLICIES)


def make_policy(name: str, **params: Any) -> Policy:
    """A new policy by name with its parameters; UnknownPolicyError names the choices."""
    if name not in POLICIES:
        raise UnknownPolicyError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}")
    return POLICIES[name](**params)
