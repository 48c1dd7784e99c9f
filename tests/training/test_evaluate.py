"""The evaluation harness: JSON shape, reproducibility, the CLI, and the done-criteria on the default suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from policy.registry import POLICIES, make_policy
from training.evaluate import STATIC_TUNED, evaluate, main, public_report, scenario_markdown
from training.metrics import METRICS
from training.scenarios import SUITES

REPO = Path(__file__).resolve().parents[2]


def test_report_has_the_design_shape_and_tunes_static() -> None:
    report = public_report(
        evaluate({"static": STATIC_TUNED, "aimd": make_policy("aimd"), "oracle": "oracle"}, seeds=1, steps=6)
    )
    assert set(report) == {"scenarios", "summary"}
    assert [s["name"] for s in report["scenarios"]] == list(SUITES["default"])
    for scenario in report["scenarios"]:
        assert set(scenario) == {"name", "results"}
        assert set(scenario["results"]) == {"static", "aimd", "oracle"}
        for metrics in scenario["results"].values():
            assert set(METRICS) <= set(metrics)
        assert "static_factor" in scenario["results"]["static"]
    assert set(report["summary"]) == {"static", "aimd", "oracle"}
    assert report["summary"]["oracle"]["rate_tracking_error"] in (0.0, None)


def test_same_seeds_same_numbers() -> None:
    def once() -> dict:
        return public_report(evaluate({"pid": "pid", "gradient": make_policy("gradient")}, suite="default", seeds=[4, 9], steps=8))

    assert once() == once()


@pytest.mark.slow
def test_oracle_wins_every_scenario_and_no_limiter_melts() -> None:
    names = ["none", "static", "threshold", "aimd", "gradient", "pid", "oracle"]
    specs = {n: STATIC_TUNED if n == "static" else n for n in names}
    report = evaluate(specs, suite="default", seeds=3)
    for scenario in report["scenarios"]:
        goodput = {n: m["goodput_ratio"] for n, m in scenario["results"].items()}
        assert max(goodput, key=goodput.__getitem__) == "oracle", (scenario["name"], goodput)
        if scenario["name"] in ("flash_crowd", "capacity_drop"):
            assert all(goodput[n] > goodput["none"] for n in names if n != "none"), (scenario["name"], goodput)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "ratepilot.cli", "evaluate", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=240
    )


def test_cli_tiny_run_writes_json_table_and_plots(tmp_path: Path) -> None:
    trace = tmp_path / "ramp.csv"
    trace.write_text("t_s,demand_rps,capacity_rps\n" + "".join(f"{t},{10 * t},{300}\n" for t in range(0, 60, 2)))
    out = tmp_path / "out.json"
    done = _cli("--suite", "default", "--trace", str(trace), "--policies", "static,aimd,oracle", "--seeds", "1", "--steps", "4", "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [s["name"] for s in report["scenarios"]] == [*SUITES["default"], "ramp"]
    assert set(report["summary"]) == {"static", "aimd", "oracle"}
    assert "evaluation summary" in done.stdout and "oracle" in done.stdout
    plots = sorted(p.name for p in (tmp_path / "out_plots").glob("*.png"))
    assert plots == sorted(f"{name}.png" for name in [*SUITES["default"], "ramp"])


def test_cli_rejects_a_bad_trace_with_line_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("t_s,demand_rps\n0,5\n2,-1\n")
    done = _cli("--trace", str(bad), "--policies", "aimd", "--seeds", "1", "--json", str(tmp_path / "o.json"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"ratepilot evaluate: {bad}:3: demand_rps must be non-negative, got -1"]
    assert not (tmp_path / "o.json").exists()


def test_cli_bad_arguments_fail_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--policies", "nope", "--seeds", "1"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert main(["--suite", "galaxy", "--policies", "aimd"]) == 2
    assert "unknown suite 'galaxy'" in capsys.readouterr().err
    assert main(["--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_rl_without_a_registry_entry_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delitem(POLICIES, "rl", raising=False)
    assert main(["--policies", "rl,aimd", "--seeds", "1", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ratepilot evaluate: policy 'rl' is not available yet (policy/registry.py has no 'rl' entry)"


def _row(goodput: float, slo: float = 0.0, tracking: float | None = 0.1) -> dict[str, float | None]:
    return {"goodput_ratio": goodput, "slo_violation_frac": slo, "rate_tracking_error": tracking}


def test_scenario_markdown_marks_where_a_baseline_is_ahead_and_shows_the_previous_model() -> None:
    new = {
        "scenarios": [
            {"name": "calm", "results": {"rl": _row(0.95), "aimd": _row(0.90), "pid": _row(0.80), "oracle": _row(0.97)}},
            {"name": "storm", "results": {"rl": _row(0.70, 0.2, None), "aimd": _row(0.75), "pid": _row(0.60), "oracle": _row(0.90)}},
        ],
        "summary": {"rl": _row(0.825), "aimd": _row(0.825), "pid": _row(0.70), "oracle": _row(0.935)},
    }
    old = {"scenarios": [{"name": "calm", "results": {"rl": _row(0.5, tracking=0.4)}}], "summary": {"rl": _row(0.6, tracking=0.3)}}
    lines = scenario_markdown(new, old).splitlines()
    assert lines[0].count("|") == 11 and lines[1] == "|" + "---|" * 10
    assert lines[2] == "| calm | 0.950 | 0.000 | 0.100 | 0.500 | 0.400 | 0.900 (aimd) | 0.970 (0.000) | 0.979 | no |"
    assert lines[3] == "| storm | 0.700 | 0.200 | - | - | - | 0.750 (aimd) | 0.900 (0.000) | 0.778 | yes: +0.050 |"
    assert lines[4] == "| **mean** | 0.825 | 0.000 | 0.100 | 0.600 | 0.300 | 0.825 (aimd) | 0.935 (0.000) | 0.882 | no |"
    assert len(scenario_markdown(new).splitlines()[0].split("|")) == 10  # without a previous model: two columns fewer
    assert "| candidate rl goodput | candidate rl tracking |" in scenario_markdown(new, old, label="candidate")
    for scenario in new["scenarios"]:
        scenario["results"]["oracle_late"] = _row(0.85, 0.05, 0.2)
    new["summary"]["oracle_late"] = _row(0.85, 0.05, 0.2)
    with_late = scenario_markdown(new).splitlines()
    assert with_late[2] == "| calm | 0.950 | 0.000 | 0.100 | 0.900 (aimd) | 0.970 (0.000) | 0.850 / 0.050 / 0.200 | 0.979 | no |"


def test_cli_writes_the_markdown_table_and_needs_rl_and_oracle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md = tmp_path / "table.md"
    assert main(["--suite", "unseen", "--policies", "aimd", "--seeds", "1", "--markdown", str(md)]) == 2
    assert "--markdown needs the policies rl and oracle" in capsys.readouterr().err and not md.exists()
    assert main(["--suite", "unseen", "--policies", "rl,aimd,oracle", "--seeds", "1", "--steps", "3", "--no-plots", "--markdown", str(md)]) == 0
    rows = md.read_text().splitlines()
    assert [row.split(" | ")[0].lstrip("| ") for row in rows[2:]] == [*SUITES["unseen"], "**mean**"]
