"""The decision JSON's number formatting: one json.dumps per column, same text as repr, null for NaN/±inf."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from controller.loop import _json_numbers, _json_rows

floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


def expected(value: float) -> str:
    return repr(value) if math.isfinite(value) else "null"


@given(arrays(np.float64, st.integers(0, 40), elements=floats))
def test_numbers_are_repr_or_null(values: np.ndarray) -> None:
    assert _json_numbers(values) == [expected(v) for v in values.tolist()]


@given(arrays(np.float64, st.tuples(st.integers(0, 8), st.integers(0, 5)), elements=floats))
def test_rows_are_json_arrays(matrix: np.ndarray) -> None:
    rows = _json_rows(matrix)
    assert rows == ["[" + ",".join(expected(v) for v in row) + "]" for row in matrix.tolist()]
    for text, row in zip(rows, matrix.tolist(), strict=True):
        assert json.loads(text) == [v if math.isfinite(v) else None for v in row]
