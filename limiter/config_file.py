"""YAML config files with environment overrides: the loading steps `limiter.yaml` and `controller.yaml` share.

A service reads its file into a mapping (`parse_mapping`), writes its environment variables over it
(`apply_env`: each variable names one path in the mapping; unset or empty means "keep the file's
value"), validates the result with its own pydantic model, and reports the first refused field in
one line (`first_error`). Each service keeps its own variable table, error type and file origin.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError


def set_path(data: dict[str, Any], path: tuple[str, ...], value: object) -> None:
    """Set data[path[0]][path[1]]... = value, creating (or replacing non-mapping) levels on the way."""
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def apply_env(data: Mapping[str, Any], overrides: Mapping[str, tuple[str, ...]], env: Mapping[str, str]) -> dict[str, Any]:
    """A deep copy of `data` with each variable of `overrides` that is set and not empty in `env` written at its path."""
    merged: dict[str, Any] = copy.deepcopy(dict(data))
    for name, path in overrides.items():
        value = env.get(name)
        if value:
            set_path(merged, path, value)
    return merged


def parse_mapping(text: str) -> dict[str, Any]:
    """The top-level mapping of YAML `text` (an empty file is an empty mapping); ValueError saying why not."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("the top level must be a mapping")
    return data


def first_error(exc: ValidationError) -> str:
    """`field.path: reason` of the first refused field, and how many more there are."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"
