"""The observation schema: one table (`OBS_TABLE`), named columns that agree with it, and the builder reading by name."""

from __future__ import annotations

import numpy as np

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
    # ratepilot-obs-v1 as shipped: a change here invalidates every stored policy
    assert OBS_SCHEMA == (
        "ratepilot-obs-v1:p99_over_slo,error_rate,cpu,admitted_over_rate,throttled_over_rate,log_rate_over_ref,"
        "d_p99_over_slo,d_error_rate,d_throttled_over_rate,d_log_rate,missing,bias"
    )
    assert OBS_LOW.tolist() == [0, 0, 0, 0, 0, -5, -10, -1, -20, -5, 0, 1]
    assert OBS_HIGH.tolist() == [10, 1, 2, 5, 20, 5, 10, 1, 20, 5, 1, 1]


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
