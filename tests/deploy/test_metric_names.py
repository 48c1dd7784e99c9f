"""The dashboard and the rules use only metrics the project's exporters really expose, in valid PromQL."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from controller.metrics import ControllerMetrics
from limiter.metrics import BackendMetrics, LimiterMetrics
from ratepilot.servers import find_binary
from tests.deploy.promql import exposed_names, metric_names

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ratepilot.json"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Series names of the edge's and the controller's registries, built the way the services build them."""
    edge = CollectorRegistry()
    LimiterMetrics(edge)
    BackendMetrics(edge)
    controller = CollectorRegistry()
    ControllerMetrics(controller)
    return exposed_names(edge) | exposed_names(controller)


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and query variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            exprs.append(query.removeprefix("label_values(").split(",")[0])
    return exprs


def rule_expressions() -> list[str]:
    """Every expression of the alert and recording rules."""
    return [
        rule["expr"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def test_the_extractor_finds_names_and_ignores_functions_labels_and_keywords() -> None:
    expr = (
        'sum by (tier, le) (rate(a_total{tier=~"$tier", x="b_total"}[$__rate_interval])) '
        "/ on (tier) group_left (rule) c_seconds_bucket offset 5m > bool 0.5 or absent(d)"
    )
    assert metric_names(expr) == {"a_total", "c_seconds_bucket", "d"}


def test_the_exporters_expose_the_contract_names(exported: set[str]) -> None:
    assert {
        "ratepilot_decisions_total",
        "ratepilot_shadow_refusals_total",
        "token_bucket_utilization",
        "ratepilot_backend_request_seconds_bucket",
        "ratepilot_controller_last_tick_timestamp_seconds",
        "ratepilot_controller_rule_firings_total",
    } <= exported


def test_dashboard_covers_the_required_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("rate", "demand vs admitted", "p95 / p99", "bucket fill", "rule firings", "replicas (hpa)"):
        assert topic in titles
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} == {"prometheus"}


def test_dashboard_references_only_exported_metrics(exported: set[str]) -> None:
    used = set().union(*(metric_names(expr) for expr in dashboard_expressions()))
    assert used, "the dashboard has no metric at all"
    assert used - exported == set()


def test_rules_reference_only_exported_metrics(exported: set[str]) -> None:
    used = set().union(*(metric_names(expr) for expr in rule_expressions()))
    assert used - exported == set()


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule (Grafana's variables filled in)."""
    exprs = [
        expr.replace("$__rate_interval", "1m").replace("$tier", ".*") for expr in dashboard_expressions()
    ]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dash:expr{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([find_binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout
