"""The supervisor stops what it started when a part fails; schedules and the CLI's input checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ratepilot.demo.cli import main
from ratepilot.demo.schedule import (
    NOMINAL_CAPACITY,
    auto_scale,
    clip_demand,
    default_scenario,
    trace_scenario,
)
from ratepilot.demo.supervisor import HttpPart, PartFailed, Supervisor
from ratepilot.servers import RedisServer, free_port


def test_a_part_that_fails_to_start_stops_the_others_and_names_its_log(tmp_path: Path) -> None:
    supervisor = Supervisor(ready_timeout_s=10)
    redis_server = RedisServer(workdir=tmp_path / "redis")
    supervisor.start(redis_server)
    crashing = HttpPart(
        "edge", [sys.executable, "-c", "import sys; print('boom: no backend'); sys.exit(3)"], free_port(), tmp_path
    )
    with pytest.raises(PartFailed) as failure:
        supervisor.start(crashing)
    assert failure.value.part == "edge"
    assert failure.value.log_path == tmp_path / "edge.log"
    assert "edge failed: exited with 3" in str(failure.value) and str(tmp_path / "edge.log") in str(failure.value)
    assert "boom: no backend" in failure.value.log_path.read_text()
    assert not redis_server.running
    assert supervisor.running == []


def test_a_part_that_never_gets_ready_is_stopped_too(tmp_path: Path) -> None:
    supervisor = Supervisor(ready_timeout_s=1.5)
    sleeper = HttpPart("controller", [sys.executable, "-c", "import time; time.sleep(60)"], free_port(), tmp_path)
    with pytest.raises(PartFailed, match="controller failed: did not listen on port"):
        supervisor.start(sleeper)
    assert not sleeper.running


def test_check_reports_a_part_that_died_while_running(tmp_path: Path) -> None:
    with Supervisor() as supervisor:
        redis_server = supervisor.start(RedisServer(workdir=tmp_path / "redis"))
        supervisor.check()
        assert redis_server.process is not None
        redis_server.process.kill()
        redis_server.process.wait(timeout=10)
        with pytest.raises(PartFailed, match="redis failed: exited with -9 while running"):
            supervisor.check()


def test_default_scenario_has_the_four_phases_in_order() -> None:
    schedule = default_scenario(180, scale=0.5)
    assert schedule.duration_s == 180
    assert [name for _, name in schedule.phases] == ["steady", "flash crowd x10", "capacity halved", "recovery"]
    steady, flash, halved, recovery = (schedule.phase_at(s + 1) for s, _ in schedule.phases)
    assert (steady, flash, halved, recovery) == ("steady", "flash crowd x10", "capacity halved", "recovery")
    starts = [s for s, _ in schedule.phases]
    assert schedule.demand_rps[starts[1]] == pytest.approx(10 * schedule.demand_rps[0])
    assert schedule.capacity_rps[starts[2]] == pytest.approx(schedule.capacity_rps[0] / 2)
    assert schedule.capacity_rps[-1] == pytest.approx(NOMINAL_CAPACITY * 0.5) == schedule.nominal_capacity_rps
    assert default_scenario(20).duration_s == 20


def test_trace_is_rescaled_to_the_demo_capacity(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("t_s,demand_rps,capacity_rps\n0,1000,2000\n2,3000,2000\n4,500,1000\n")
    schedule = trace_scenario(path, scale=2.0)
    assert schedule.duration_s == 6
    assert schedule.capacity_rps.tolist() == [200.0] * 4 + [100.0] * 2  # median capacity 2000 -> 100 x 2
    assert schedule.demand_rps.tolist() == [100.0, 100.0, 300.0, 300.0, 50.0, 50.0]
    assert trace_scenario(path, duration_s=3).duration_s == 3
    assert auto_scale(schedule.peak_demand_rps / 2.0, cores=2, peak_rps_per_core=150) == pytest.approx(2.0)


def test_a_demand_only_trace_keeps_the_nominal_capacity(tmp_path: Path) -> None:
    path = tmp_path / "demand.csv"
    path.write_text("t_s,demand_rps\n0,30\n1,60\n2,90\n")
    schedule = trace_scenario(path)
    assert np.all(schedule.capacity_rps == NOMINAL_CAPACITY)
    assert schedule.demand_rps[1] == pytest.approx(0.6 * NOMINAL_CAPACITY)  # the median demand is 60 % load


def test_a_spiky_trace_is_not_shrunk_below_ten_times_nominal_its_peaks_are_clipped(tmp_path: Path) -> None:
    path = tmp_path / "spiky.csv"
    path.write_text("t_s,demand_rps\n" + "".join(f"{t},{1000 if t == 5 else 1}\n" for t in range(100)))
    unit = trace_scenario(path)
    assert unit.peak_demand_rps > 50 * NOMINAL_CAPACITY
    scale = auto_scale(unit.peak_demand_rps, cores=2, peak_rps_per_core=250)
    assert scale == pytest.approx(500 / (10 * NOMINAL_CAPACITY))
    clipped = clip_demand(trace_scenario(path, scale), 500)
    assert clipped.peak_demand_rps == 500 and clipped.demand_rps[0] == trace_scenario(path, scale).demand_rps[0]
    silent = tmp_path / "silent.csv"
    silent.write_text("t_s,demand_rps\n0,0\n1,0\n")
    with pytest.raises(ValueError, match="no demand"):
        trace_scenario(silent)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--duration", "2"], "--duration must be at least 4 s"),
        (["--scale", "-1"], "must be a positive number"),
        (["--trace", "{missing}"], "missing.csv"),
        (["--trace", "{bad}"], "bad.csv:3"),
    ],
)
def test_bad_input_gets_a_one_line_error(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("t_s,demand_rps\n0,10\n0,20\n")  # t_s not increasing on line 3
    out = tmp_path / "out"
    argv = [a.format(missing=tmp_path / "missing.csv", bad=bad) for a in argv] + ["--out", str(out)]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses the value itself
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.strip().splitlines()[-1].startswith(("ratepilot demo: ", "usage:", "ratepilot demo: error:"))
    assert not out.exists(), "nothing may be started on bad input"


def test_help_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ratepilot.cli", "demo", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "--no-compare" in result.stdout and "--trace" in result.stdout
