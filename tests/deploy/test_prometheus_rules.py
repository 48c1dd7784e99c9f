"""The Prometheus config and rules under deploy/ pass promtool's checks and their unit tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from ratepilot.servers import find_binary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*_test.yml"))


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool and return the finished process (output captured as text)."""
    return subprocess.run([find_binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_there_are_rule_files_and_tests() -> None:
    assert [p.name for p in RULE_FILES] == ["alerts.yml", "recording.yml"]
    assert [p.name for p in RULE_TESTS] == ["alerts_test.yml", "recording_test.yml"]


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests(path: Path) -> None:
    result = promtool("test", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_config() -> None:
    result = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_every_alert_is_unit_tested() -> None:
    alerts = {
        rule["alert"]
        for rule_file in RULE_FILES
        for group in yaml.safe_load(rule_file.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tested = {
        case["alertname"]
        for test_file in RULE_TESTS
        for test in yaml.safe_load(test_file.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert alerts == tested
    assert {
        "RatepilotBucketSaturated",
        "RatepilotHighThrottleRate",
        "RatepilotRateTableStale",
        "RatepilotControllerNotTicking",
        "RatepilotRedisErrors",
    } <= alerts


def test_every_recording_rule_is_unit_tested() -> None:
    recorded = {
        rule["record"]
        for group in yaml.safe_load((PROMETHEUS / "rules" / "recording.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    tested_exprs = " ".join(
        case["expr"]
        for test in yaml.safe_load((PROMETHEUS / "tests" / "recording_test.yml").read_text())["tests"]
        for case in test.get("promql_expr_test", [])
    )
    assert {name for name in recorded if name not in tested_exprs} == set()


def test_a_broken_rule_file_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(rate(foo[5m]) > \n")
    result = promtool("check", "rules", broken)
    assert result.returncode != 0
