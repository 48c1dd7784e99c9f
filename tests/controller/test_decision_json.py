"""The decision JSON (`controller.decisions.decision_texts`): every number reads back as the same float, null for NaN/±inf."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from controller.decisions import OBSERVED, decision_texts
from policy.observation import IntervalMetrics, Observation
from policy.safety import RULES, SafetyResult

floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


def expected(value: float) -> float | None:
    return value if math.isfinite(value) else None


def same(a: object, b: object) -> bool:
    """Equal, with the sign of zero (-0.0 must read back as -0.0)."""
    return a == b and repr(a) == repr(b)


def texts(values: np.ndarray, vectors: np.ndarray | None = None) -> list[str]:
    """The decisions of len(values) tiers whose every metric, rate and proposal is `values`."""
    n = values.size
    metrics = IntervalMetrics(values, values, values, values, values, values)
    vectors = np.zeros((n, 0)) if vectors is None else vectors
    observation = Observation(metrics, np.ones(n), np.ones(n), vectors)
    result = SafetyResult(rates=values, proposed=values, fired={r: np.zeros(n, dtype=bool) for r in RULES}, stale_ticks=np.zeros(n))
    return decision_texts(observation, values, result, "active", "test", 1.5)


@given(arrays(np.float64, st.integers(0, 40), elements=floats))
def test_numbers_read_back_exactly_or_are_null(values: np.ndarray) -> None:
    decisions = [json.loads(text) for text in texts(values)]
    assert len(decisions) == values.size
    for decision, value in zip(decisions, values.tolist(), strict=True):
        numbers = [decision["observation"][name] for name in OBSERVED] + [decision[k] for k in ("rate_in_force", "proposed", "rate")]
        assert all(same(number, expected(value)) for number in numbers), (decision, value)


def test_number_texts_are_plain_json() -> None:
    written = texts(np.array([100.0, 0.5, -0.0, np.nan, np.inf, -np.inf]))
    assert [text.split('"rate":')[1].split(",")[0] for text in written] == ["100.0", "0.5", "-0.0", "null", "null", "null"]


@given(arrays(np.float64, st.tuples(st.integers(0, 8), st.integers(0, 5)), elements=floats))
def test_rows_are_json_arrays(matrix: np.ndarray) -> None:
    rows = [json.loads(text)["observation"]["vector"] for text in texts(np.ones(matrix.shape[0]), matrix)]
    assert len(rows) == matrix.shape[0]
    for got, row in zip(rows, matrix.tolist(), strict=True):
        assert isinstance(got, list)
        assert len(got) == len(row) and all(same(g, expected(v)) for g, v in zip(got, row, strict=True)), (got, row)
