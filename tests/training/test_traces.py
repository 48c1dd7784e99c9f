"""The strict trace parser: good files parse, bad ones are rejected with the line and the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.traces import PACKAGED_TRACES, TraceError, load_trace, packaged_trace, parse_trace


def test_a_valid_trace_with_optional_columns_parses() -> None:
    trace = parse_trace("t_s,demand_rps,capacity_rps,heavy_frac\n0,10,100,0.1\n0.5,12.5,90,0\n7,0,80,1\n")
    assert trace.t_s.tolist() == [0.0, 0.5, 7.0]
    assert trace.demand_rps.tolist() == [10.0, 12.5, 0.0]
    assert trace.capacity_rps is not None and trace.capacity_rps.tolist() == [100.0, 90.0, 80.0]
    assert trace.heavy_frac is not None and trace.heavy_frac.tolist() == [0.1, 0.0, 1.0]
    demand, capacity, heavy = trace.per_second(0.0, 9)
    assert demand.tolist() == [10.0, 12.5, 12.5, 12.5, 12.5, 12.5, 12.5, 0.0, 0.0]  # held from the last row
    assert capacity is not None and heavy is not None


def test_optional_columns_may_be_absent() -> None:
    trace = parse_trace("t_s,demand_rps\n0,1\n1,2\n")
    assert trace.capacity_rps is None and trace.heavy_frac is None
    assert trace.duration_s == 2.0


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        ("", ":1:", "empty file"),
        ("time,demand\n0,1\n", ":1:", "header must start with t_s,demand_rps"),
        ("t_s,demand_rps,colour\n0,1,2\n", ":1:", "unknown column 'colour'"),
        ("t_s,demand_rps,heavy_frac,heavy_frac\n0,1,0,0\n", ":1:", "duplicate column"),
        ("t_s,demand_rps\n", ":2:", "no data rows"),
        ("t_s,demand_rps\n0,1\n1\n", ":3:", "expected 2 fields, got 1"),
        ("t_s,demand_rps\n0,1\n1,abc\n", ":3:", "demand_rps is not a number"),
        ("t_s,demand_rps\n0,1\n1,nan\n", ":3:", "must be finite"),
        ("t_s,demand_rps\n0,1\n1,inf\n", ":3:", "must be finite"),
        ("t_s,demand_rps\n0,1\n1,-2\n", ":3:", "demand_rps must be non-negative"),
        ("t_s,demand_rps\n-1,1\n", ":2:", "t_s must be >= 0"),
        ("t_s,demand_rps\n0,1\n5,1\n5,1\n", ":4:", "strictly increasing"),
        ("t_s,demand_rps\n0,1\n5,1\n3,1\n", ":4:", "strictly increasing"),
        ("t_s,demand_rps,capacity_rps\n0,1,-5\n", ":2:", "capacity_rps must be non-negative"),
        ("t_s,demand_rps,heavy_frac\n0,1,1.5\n", ":2:", "heavy_frac must be in [0, 1]"),
        ("t_s,demand_rps\n0,1\n\n2,1\n", ":3:", "empty line"),
    ],
)
def test_bad_traces_are_rejected_with_line_and_reason(text: str, where: str, reason: str) -> None:
    with pytest.raises(TraceError) as caught:
        parse_trace(text, name="bad.csv")
    message = str(caught.value)
    assert message.startswith("bad.csv" + where), message
    assert reason in message


def test_load_trace_reports_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("t_s,demand_rps\n0,1\n0,1\n")
    with pytest.raises(TraceError, match=r"bad.csv:3: t_s must be strictly increasing"):
        load_trace(bad)


@pytest.mark.parametrize("name", list(PACKAGED_TRACES))
def test_packaged_traces_parse_and_are_non_trivial(name: str) -> None:
    trace = packaged_trace(name)
    assert trace.t_s.size > 1000
    assert np.all(np.diff(trace.t_s) > 0)
    assert trace.demand_rps.max() > 0
