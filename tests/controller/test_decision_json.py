"""The decision JSON's number formatting: one orjson call per column; each text reads back as the same float, null for NaN/±inf."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from controller.loop import _json_numbers, _json_rows

floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


def expected(value: float) -> float | None:
    return value if math.isfinite(value) else None


def same(a: object, b: object) -> bool:
    """Equal, with the sign of zero (-0.0 must read back as -0.0)."""
    return a == b and repr(a) == repr(b)


@given(arrays(np.float64, st.integers(0, 40), elements=floats))
def test_numbers_read_back_exactly_or_are_null(values: np.ndarray) -> None:
    texts = _json_numbers(values)
    assert len(texts) == values.size
    for text, value in zip(texts, values.tolist(), strict=True):
        assert same(json.loads(text), expected(value)), (text, value)


def test_number_texts_are_plain_json() -> None:
    assert _json_numbers(np.array([100.0, 0.5, -0.0, np.nan, np.inf, -np.inf])) == ["100.0", "0.5", "-0.0", "null", "null", "null"]


@given(arrays(np.float64, st.tuples(st.integers(0, 8), st.integers(0, 5)), elements=floats))
def test_rows_are_json_arrays(matrix: np.ndarray) -> None:
    rows = _json_rows(matrix)
    assert len(rows) == matrix.shape[0]
    for text, row in zip(rows, matrix.tolist(), strict=True):
        assert text.startswith("[") and text.endswith("]")
        got = json.loads(text)
        assert len(got) == len(row) and all(same(g, expected(v)) for g, v in zip(got, row, strict=True)), (text, row)
