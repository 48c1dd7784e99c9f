"""The observation schema: one table (`OBS_TABLE`), named columns that agree with it, and the builder reading by name."""

from __future__ import annotations

import numpy as np
import pytest

import policy.observation as obs
from policy.observation import (
    OBS_FIELDS,
    OBS_HIGH,
    OBS_LOW,
    OBS_SCHEMA,
    OBS_TABLE,
    IntervalMetrics,
    ObservationBuilder,
)


def test_each_column_constant_is_the_position_of_its_name() -> None:
    for i, name in enumerate(OBS_FIELDS):
        assert getattr(obs, name.upper()) == i, name


def test_the_schema_and_bounds_are_those_trained_models_were_built_for() -> None:
    # ratepilot-obs-v2 as shipped (v2 added the capacity estimate): a change here invalidates every stored policy
    assert OBS_SCHEMA == (
        "ratepilot-obs-v2:p99_over_slo,error_rate,cpu,admitted_over_rate,throttled_over_rate,log_rate_over_ref,"
        "d_p99_over_slo,d_error_rate,d_throttled_over_rate,d_log_rate,ln_capacity_over_rate,d_ln_capacity,"
        "capacity_age,missing,bias"
    )
    assert OBS_LOW.tolist() == [0, 0, 0, 0, 0, -5, -10, -1, -20, -5, -5, -5, 0, 0, 1]
    assert OBS_HIGH.tolist() == [10, 1, 2, 5, 20, 5, 10, 1, 20, 5, 5, 5, 1, 1, 1]


def test_the_markdown_table_has_one_row_per_column_with_its_bounds() -> None:
    rows = obs.obs_table_markdown().splitlines()[2:]
    assert len(rows) == len(OBS_TABLE)
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    assert [c[0] for c in cells] == [str(i) for i in range(len(OBS_TABLE))]
    assert [c[1] for c in cells] == list(OBS_FIELDS)
    assert cells[obs.LOG_RATE_OVER_REF][3] == "[-5, 5]" and cells[obs.MISSING][3] == "{0, 1}"


def test_deltas_are_the_changes_of_the_named_columns() -> None:
    builder = ObservationBuilder(slo_ms=np.array([100.0]), reference_rate=np.array([100.0]))
    metrics = dict(error_rate=0.01, cpu=0.5, admitted_rps=80.0, throttled_rps=10.0)
    first = builder.build(IntervalMetrics(p99_latency_ms=50.0, rate=100.0, **metrics)).vector[0]
    second = builder.build(IntervalMetrics(p99_latency_ms=150.0, rate=200.0, **metrics)).vector[0]
    assert first[obs.D_P99_OVER_SLO] == 0.0 and first[obs.BIAS] == 1.0 and first[obs.MISSING] == 0.0
    assert second[obs.P99_OVER_SLO] == 1.5 and second[obs.D_P99_OVER_SLO] == 1.0
    assert second[obs.THROTTLED_OVER_RATE] == 0.05 and second[obs.D_THROTTLED_OVER_RATE] == -0.05
    assert second[obs.D_LOG_RATE] == np.log(2.0) and second[obs.D_ERROR_RATE] == 0.0


def test_the_capacity_columns_follow_the_estimate_within_one_interval() -> None:
    """Capacity 200 tokens/s: 100 admitted at CPU 0.5; then the backend halves: 100 admitted at CPU 0.8 (125)."""
    builder = ObservationBuilder(slo_ms=np.array([100.0]), reference_rate=np.array([100.0]))
    common = dict(p99_latency_ms=50.0, error_rate=0.0, throttled_rps=0.0, rate=100.0)
    first = builder.build(IntervalMetrics(cpu=0.5, admitted_rps=100.0, **common)).vector[0]
    assert first[obs.LN_CAPACITY_OVER_RATE] == pytest.approx(np.log(2.0)) and first[obs.D_LN_CAPACITY] == 0.0
    assert first[obs.CAPACITY_AGE] == 0.0
    cut = builder.build(IntervalMetrics(cpu=0.8, admitted_rps=100.0, **common)).vector[0]
    assert cut[obs.LN_CAPACITY_OVER_RATE] == pytest.approx(np.log(1.25))  # a change beyond the noise band: adopted at once
    assert cut[obs.D_LN_CAPACITY] == pytest.approx(np.log(1.25) - np.log(2.0))
    saturated = builder.build(IntervalMetrics(cpu=1.0, admitted_rps=150.0, **{**common, "rate": 150.0})).vector[0]
    assert saturated[obs.LN_CAPACITY_OVER_RATE] == pytest.approx(np.log(125.0 / 150.0))  # held, measured against the new rate
    assert saturated[obs.CAPACITY_AGE] == pytest.approx(1 / 6) and saturated[obs.D_LN_CAPACITY] == 0.0
    gone = builder.build(IntervalMetrics(cpu=np.nan, admitted_rps=100.0, **common)).vector[0]
    assert gone[obs.CAPACITY_AGE] == pytest.approx(2 / 6) and gone[obs.MISSING] == 1.0
    builder.reset()
    fresh = builder.build(IntervalMetrics(cpu=0.98, admitted_rps=100.0, **common)).vector[0]
    assert fresh[obs.LN_CAPACITY_OVER_RATE] == 0.0 and fresh[obs.CAPACITY_AGE] == 1.0  # nothing known yet
