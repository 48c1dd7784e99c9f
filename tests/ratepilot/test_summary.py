"""The demo's upper bound and goodput ratio: the same measure `ratepilot evaluate` reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ratepilot.demo.loadgen import RunRecord
from ratepilot.demo.report import comparison_table, write_json
from ratepilot.demo.run import RunResult, Samples
from ratepilot.demo.schedule import default_scenario
from ratepilot.demo.summary import capacity_cut, recovery_seconds, summarize, upper_bound_rps


def record_of(status: list[int], latency_s: list[float], offsets_s: list[float]) -> RunRecord:
    """A finished run record with the given outcomes."""
    record = RunRecord(np.asarray(offsets_s, dtype=float))
    record.status[:] = status
    record.latency_s[:] = latency_s
    record.lag_s[:] = 0.0
    return record


def test_upper_bound_is_the_mean_of_min_demand_and_capacity_per_second() -> None:
    assert upper_bound_rps(np.array([10.0, 50.0, 30.0, 0.0]), np.array([20.0, 20.0, 40.0, 5.0])) == pytest.approx(15.0)


def test_upper_bound_of_the_default_scenario_follows_its_phases() -> None:
    """steady 60 of 100 for 20 %, flash 600 of 100 for 20 %, 60 of 50 for 30 %, 60 of 100 for 30 %."""
    schedule = default_scenario(duration_s=100, scale=0.5)
    expected = 0.5 * (0.2 * 60 + 0.2 * 100 + 0.3 * 50 + 0.3 * 60)
    assert upper_bound_rps(schedule.demand_rps, schedule.capacity_rps) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("demand", "capacity"),
    [([1.0, 2.0], [1.0]), ([], []), ([1.0, math.nan], [1.0, 1.0]), ([1.0, -1.0], [1.0, 1.0]), ([1.0], [math.inf])],
)
def test_upper_bound_refuses_schedules_it_cannot_average(demand: list[float], capacity: list[float]) -> None:
    with pytest.raises(ValueError, match="demand and capacity"):
        upper_bound_rps(np.array(demand), np.array(capacity))


def test_goodput_ratio_is_goodput_within_slo_over_the_upper_bound() -> None:
    # 2 s run: 3 served within the 100 ms SLO, 1 served late, 1 throttled, 1 error
    record = record_of([200, 200, 200, 200, 429, 503], [0.01, 0.02, 0.05, 0.5, 0.001, 0.01], [0.0, 0.3, 1.1, 1.2, 1.5, 1.9])
    summary = summarize(record, duration_s=2.0, slo_ms=100.0, error_budget=0.01, upper_bound=2.0)
    assert summary.goodput_rps == pytest.approx(1.5)
    assert summary.upper_bound_rps == 2.0
    assert summary.goodput_ratio == pytest.approx(0.75)


def test_goodput_ratio_is_unknown_without_a_bound_and_written_as_null(tmp_path: Path) -> None:
    record = record_of([200], [0.01], [0.0])
    unknown = summarize(record, duration_s=1.0, slo_ms=100.0, error_budget=0.01)
    assert math.isnan(unknown.goodput_ratio) and math.isnan(unknown.upper_bound_rps)
    assert math.isnan(summarize(record, 1.0, 100.0, 0.01, upper_bound=0.0).goodput_ratio)  # nothing could be served
    with pytest.raises(ValueError, match="upper_bound"):
        summarize(record, 1.0, 100.0, 0.01, upper_bound=-1.0)
    path = tmp_path / "demo.json"
    write_json(path, [RunResult("adaptive", record, unknown, Samples(), tmp_path)], {})
    data = json.loads(path.read_text())
    assert data["adaptive"]["goodput_ratio"] is None and data["adaptive"]["goodput_rps"] == 1.0


def test_json_and_table_report_the_bound_and_the_ratio_of_every_run(tmp_path: Path) -> None:
    record = record_of([200, 200, 429, 200], [0.01, 0.02, 0.001, 0.03], [0.0, 0.5, 1.0, 1.5])
    adaptive = RunResult("adaptive", record, summarize(record, 2.0, 100.0, 0.01, upper_bound=2.5), Samples(), tmp_path)
    static = RunResult("static", record, summarize(record, 2.0, 100.0, 0.01, upper_bound=2.5), Samples(), tmp_path)
    path = tmp_path / "demo.json"
    write_json(path, [adaptive, static], {"meta": {}})
    data = json.loads(path.read_text())
    for mode in ("adaptive", "static"):
        assert data[mode]["upper_bound_rps"] == 2.5
        assert data[mode]["goodput_ratio"] == pytest.approx(1.5 / 2.5)
    table = comparison_table([("adaptive", adaptive.summary), ("static", static.summary)], slo_ms=100.0)
    labels = list(table.columns[0].cells)
    row = labels.index("goodput / upper bound")
    assert list(table.columns[1].cells)[row] == "0.600" and list(table.columns[2].cells)[row] == "0.600"
    assert list(table.columns[1].cells)[labels.index("upper bound: mean min(demand, capacity)")] == "2.5 req/s"


def test_capacity_cut_is_the_largest_one_second_drop_and_runs_to_the_next_change() -> None:
    capacity = np.array([100, 100, 80, 80, 40, 40, 40, 100, 100], dtype=float)
    assert capacity_cut(capacity) == (4, 7)  # -50 % at second 4 beats -20 % at second 2; back up at 7
    assert capacity_cut(np.array([100, 100, 40, 40], dtype=float)) == (2, 4)  # the cut lasts to the end
    assert capacity_cut(np.array([100, 95, 91, 100], dtype=float)) is None  # drops under 10 %: no cut
    assert capacity_cut(np.array([100.0])) is None


def test_recovery_counts_from_the_cut_to_the_rate_back_at_90_percent_after_its_dip() -> None:
    capacity = np.array([100] * 3 + [50] * 6 + [100] * 2, dtype=float)  # cut at second 3, target 45 req/s
    seconds = np.arange(11)
    rate = np.array([100, 100, 100, 100, 20, 30, 44, 46, 50, 100, 100], dtype=float)
    assert recovery_seconds(seconds, rate, capacity) == 4.0  # dipped at 4, first >= 45 at second 7
    never_dips = np.array([100, 100, 100, 60, 55, 50, 50, 50, 50, 100, 100], dtype=float)
    assert recovery_seconds(seconds, never_dips, capacity) == 0.0
    stays_low = np.array([100, 100, 100, 20, 20, 20, 20, 20, 20, 100, 100], dtype=float)
    assert math.isnan(recovery_seconds(seconds, stays_low, capacity))  # the capacity came back first
    assert math.isnan(recovery_seconds(seconds, rate, np.full(11, 100.0)))  # no cut
    # a sample skipped (the sampler was busy) keeps its second: the seconds, not the positions, count
    assert recovery_seconds(np.array([3, 4, 8]), np.array([100.0, 20.0, 50.0]), capacity) == 5.0
