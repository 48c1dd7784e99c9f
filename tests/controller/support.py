"""Helpers of the controller tests: PromQL queries, waiting on a condition, settings and config files."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from controller.settings import ControllerSettings, default_config_text, settings_from_mapping

# "hot" is the tier tests inject latency into; "idle" has no traffic at all (its metrics are NaN/empty)
EXPORTED_TIERS = ["free", "pro", "internal", "hot", "idle"]
TOKEN = "test-admin-token-0123456789"
RECORDING_RULES = Path(__file__).parents[2] / "deploy" / "prometheus" / "rules" / "recording.yml"


def query(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    """Run an instant query against the test Prometheus."""
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]["result"]  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0, step_s: float = 0.2) -> None:
    """Poll until predicate() is true; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def make_settings(redis_url: str, prometheus_url: str, **changes: Any) -> ControllerSettings:
    """The packaged config with fast test timings; `changes` are dotted-path overrides (e.g. loop__mode)."""
    data = yaml.safe_load(default_config_text())
    data["redis"]["url"] = redis_url
    data["prometheus"]["url"] = prometheus_url
    data["prometheus"]["window"] = "3s"
    data["loop"].update(tick_interval_s=0.3, rate_ttl_s=10)
    data["lease"].update(lease_s=2.0, renew_deadline_s=1.5, retry_period_s=0.3)
    data["admin"]["token"] = TOKEN
    data["replica_id"] = "test-replica"
    for key, value in changes.items():
        node = data
        *path, last = key.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return settings_from_mapping(data, env={})


def write_config(path: Path, settings: ControllerSettings, **extra: Any) -> Path:
    """Dump settings (plus top-level extras) as a YAML config file."""
    data = settings.model_dump(mode="json")
    data.update(extra)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
