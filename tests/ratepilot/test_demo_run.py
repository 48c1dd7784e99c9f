"""A short real `ratepilot demo` run, and a demo whose controller cannot start: everything is stopped."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policy.rl import DEFAULT_MODEL_PATH

METRICS = ("goodput_rps", "p99_latency_ms", "throttle_frac", "error_frac", "slo_violation_frac")


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (the demo puts its output folder in each)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        if cmdline.parent.name == str(os.getpid()):
            continue
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


def run_demo(*args: str, timeout_s: float = 150, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`ratepilot demo ARGS` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "ratepilot.cli", "demo", *args], capture_output=True, text=True, timeout=timeout_s, cwd=cwd
    )


# The committed default policy when it is there (what `make demo` runs), else a baseline drives the same loop.
POLICY = "rl" if DEFAULT_MODEL_PATH.is_file() else "aimd"


def test_short_demo_runs_the_closed_loop_and_stops_everything(tmp_path: Path) -> None:
    """Without --out, as `make demo` runs it: the output goes to demo-output/run-TIME under the working
    directory (a relative folder the parts, each started in its own folder, must still find; so must
    the controller a relative --model)."""
    report = tmp_path / "demo.json"
    model = []
    if POLICY == "rl":
        shutil.copy(DEFAULT_MODEL_PATH, tmp_path / "policy.npz")
        model = ["--model", "policy.npz"]
    result = run_demo(
        "--duration", "20", "--no-compare", "--scale", "0.5", "--policy", POLICY, *model, "--json", "demo.json",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (out,) = (tmp_path / "demo-output").iterdir()
    data = json.loads(report.read_text())
    assert set(data) == {"adaptive", "meta", "tiers"}
    assert set(data["tiers"]["adaptive"]) == {"gold", "demo"}  # two tiers of different priority share the backend
    for tier in data["tiers"]["adaptive"].values():
        assert 0 <= tier["served_within_slo"] <= 1 and tier["requests"] > 0
    adaptive = data["adaptive"]
    for key in METRICS:
        assert isinstance(adaptive[key], float) and math.isfinite(adaptive[key]), key
    assert adaptive["requests"] > 100
    assert 0 < adaptive["goodput_rps"] <= 10 * 0.5 * 60  # at most the peak demand
    assert 0 <= adaptive["throttle_frac"] <= 1 and 0 <= adaptive["error_frac"] <= 1
    assert adaptive["throttle_frac"] > 0  # a 10x flash crowd over a rate at capacity must be throttled
    # default scenario at scale 0.5: min(demand, capacity) is 30, 50, 25 and 30 req/s over 20/20/30/30 % of the run
    assert adaptive["upper_bound_rps"] == pytest.approx(0.5 * (0.2 * 60 + 0.2 * 100 + 0.3 * 50 + 0.3 * 60))
    assert adaptive["goodput_ratio"] == pytest.approx(adaptive["goodput_rps"] / adaptive["upper_bound_rps"], rel=1e-4)
    png = Path(data["meta"]["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png}" in result.stdout
    # the run's capacity cut (second 8 of 20) and the rate's recovery from it, measured from the per-second samples
    assert adaptive["recovery_s"] is None or 0 <= adaptive["recovery_s"] < 6
    # the controller's decisions, read back from its stream, beside the same schedule in the simulator
    decisions = [json.loads(line) for line in (out / "adaptive" / "decisions.jsonl").read_text().splitlines()]
    assert {row["tier"] for row in decisions} == {"gold", "demo"} and len(decisions) >= 4
    assert all(len(row["observation"]["vector"]) == len(decisions[0]["observation"]["vector"]) for row in decisions)
    simulated = data["meta"]["simulated"]
    assert set(simulated) == {"goodput_ratio", "slo_violation_frac", "recovery_s"} and 0 < simulated["goodput_ratio"] <= 1.1
    assert (out / "sim-vs-real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for log in ("redis/redis-server.log", "edge.log", "prometheus/prometheus.log", "controller.log"):
        assert (out / "adaptive" / log).is_file(), log
    assert "(controller; " in result.stdout  # the live lines show the controller's rate in force
    assert processes_mentioning(str(out)) == []


def test_ctrl_c_stops_every_part(tmp_path: Path) -> None:
    out = tmp_path / "out"
    demo = subprocess.Popen(
        [sys.executable, "-m", "ratepilot.cli", "demo", "--duration", "60", "--no-compare", "--scale", "0.2",
         "--policy", POLICY, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not (out / "adaptive" / "controller.yaml").exists():  # written once redis, edge, prometheus run
            assert demo.poll() is None, demo.communicate()
            assert time.monotonic() < deadline, "the demo did not get to its controller"
            time.sleep(0.2)
        assert processes_mentioning(str(out)), "nothing running to stop"
        demo.send_signal(signal.SIGINT)
        _, stderr = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, stderr
    assert "interrupted; every part the demo started has been stopped" in stderr
    assert processes_mentioning(str(out)) == []


def test_a_controller_that_cannot_start_is_named_and_nothing_is_left_running(tmp_path: Path) -> None:
    out = tmp_path / "out"
    missing_model = tmp_path / "no-such-model.npz"
    result = run_demo("--duration", "10", "--no-compare", "--scale", "0.2", "--out", str(out), "--model", str(missing_model))
    assert result.returncode == 1
    log = out / "adaptive" / "controller.log"
    assert "controller failed: exited with 2" in result.stderr
    assert f"log: {log}" in result.stderr
    assert "no-such-model.npz" in log.read_text()
    assert "every part the demo started has been stopped" in result.stderr
    assert (out / "adaptive" / "edge.log").exists()  # the parts before it did start ...
    assert processes_mentioning(str(out)) == []  # ... and were stopped
