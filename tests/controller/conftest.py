"""Controller test fixtures: one real Prometheus scraping a synthetic exporter every second, settings helpers."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.exporter import SyntheticExporter
from controller.settings import ControllerSettings, default_config_text, settings_from_mapping
from ratepilot.servers import PrometheusServer

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


@pytest.fixture(scope="package")
def exporter() -> Iterator[SyntheticExporter]:
    """The synthetic edge/limiter metrics: healthy traffic on every tier but `idle`."""
    exp = SyntheticExporter(EXPORTED_TIERS)
    exp.set("idle", request_rps=0.0, admitted_tps=0.0)
    exp.start()
    yield exp
    exp.stop()


@pytest.fixture(scope="package")
def prometheus(exporter: SyntheticExporter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """A real Prometheus scraping the exporter every second with the deploy's recording rules, once it has data for a rate window."""
    server = PrometheusServer([exporter.target], workdir=tmp_path_factory.mktemp("prom-controller"), scrape_interval_s=1.0,
                              rule_files=[RECORDING_RULES])  # fmt: skip
    server.start()
    expr = 'sum by (tier) (rate(ratepilot_decision_tokens_total{outcome="allowed"}[3s]))'

    def steady() -> bool:
        result = query(server.url, expr)
        return len(result) >= 4 and all(abs(float(s["value"][1]) - 50.0) < 2.5 for s in result if s["metric"]["tier"] != "idle")

    wait_for(steady, timeout_s=40)
    yield server
    server.stop()


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
