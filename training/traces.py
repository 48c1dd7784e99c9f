"""Traffic trace CSVs: a strict parser and the real traces packaged in `training/data/`.

Format (as in `training/data/README.md`): a header `t_s,demand_rps` optionally followed by `capacity_rps`
and/or `heavy_frac`; `t_s` is seconds from the start, finite, >= 0 and strictly increasing (any step);
rates are finite non-negative floats; `heavy_frac` lies in [0, 1]. Anything else is rejected with
`TraceError("FILE:LINE: reason")` and nothing is returned.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

REQUIRED_COLUMNS = ("t_s", "demand_rps")
OPTIONAL_COLUMNS = ("capacity_rps", "heavy_frac")

# name -> packaged file (see training/data/README.md for provenance and what was cut)
PACKAGED_TRACES: dict[str, str] = {
    "azure_code": "azure_llm2023_code_1s.csv",
    "azure_conv": "azure_llm2023_conv_1s.csv",
    "worldcup98": "worldcup98_1998-06-26T150001_6h_1s.csv",
    "twitter": "twitter_stream_2021-08_6h_1s.csv",
    "nasa": "nasa_http_1995-07-12_2d_10s.csv",
}
TRAIN_SHARE = 0.7  # the first 70 % of every packaged trace is for training, the rest held out for evaluation


class TraceError(ValueError):
    """A trace file that breaks the format; the message names the file, the line and the reason."""


@dataclass(frozen=True)
class Trace:
    """A parsed trace: times (s) and per-row rates; `capacity_rps` / `heavy_frac` are None when absent."""

    name: str
    t_s: np.ndarray
    demand_rps: np.ndarray
    capacity_rps: np.ndarray | None = None
    heavy_frac: np.ndarray | None = None

    @property
    def duration_s(self) -> float:
        """Seconds covered: the last timestamp plus the last row's step (1 s for a single row)."""
        step = float(self.t_s[-1] - self.t_s[-2]) if self.t_s.size > 1 else 1.0
        return float(self.t_s[-1] + step)

    def per_second(self, start_s: float, seconds: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Demand, capacity and heavy share held from the last row at or before each second of a window."""
        grid = start_s + np.arange(seconds, dtype=np.float64)
        rows = np.clip(np.searchsorted(self.t_s, grid, side="right") - 1, 0, self.t_s.size - 1)
        capacity = None if self.capacity_rps is None else self.capacity_rps[rows]
        heavy = None if self.heavy_frac is None else self.heavy_frac[rows]
        return self.demand_rps[rows], capacity, heavy


def _parse_float(text: str, column: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"{where}: {column} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise TraceError(f"{where}: {column} must be finite, got {text!r}")
    return value


def parse_trace(text: str, name: str = "<trace>") -> Trace:
    """Parse trace CSV text strictly; raises TraceError naming the line and the reason."""
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None or header == []:
        raise TraceError(f"{name}:1: empty file, expected the header {','.join(REQUIRED_COLUMNS)}")
    header = [h.strip() for h in header]
    if tuple(header[:2]) != REQUIRED_COLUMNS:
        raise TraceError(f"{name}:1: header must start with t_s,demand_rps, got {','.join(header)!r}")
    extra = header[2:]
    for column in extra:
        if column not in OPTIONAL_COLUMNS:
            raise TraceError(f"{name}:1: unknown column {column!r}; optional columns are {', '.join(OPTIONAL_COLUMNS)}")
    if len(set(extra)) != len(extra):
        raise TraceError(f"{name}:1: duplicate column in header")
    values: list[list[float]] = []
    previous_t = -math.inf
    for line_no, row in enumerate(rows, start=2):
        where = f"{name}:{line_no}"
        if not row:
            raise TraceError(f"{where}: empty line")
        if len(row) != len(header):
            raise TraceError(f"{where}: expected {len(header)} fields, got {len(row)}")
        parsed = [_parse_float(cell.strip(), column, where) for cell, column in zip(row, header, strict=True)]
        t_s = parsed[0]
        if t_s < 0:
            raise TraceError(f"{where}: t_s must be >= 0, got {t_s:g}")
        if t_s <= previous_t:
            raise TraceError(f"{where}: t_s must be strictly increasing ({t_s:g} after {previous_t:g})")
        previous_t = t_s
        for column, value in zip(header[1:], parsed[1:], strict=True):
            if value < 0:
                raise TraceError(f"{where}: {column} must be non-negative, got {value:g}")
            if column == "heavy_frac" and value > 1:
                raise TraceError(f"{where}: heavy_frac must be in [0, 1], got {value:g}")
        values.append(parsed)
    if not values:
        raise TraceError(f"{name}:2: no data rows after the header")
    table = np.array(values, dtype=np.float64)
    columns = {column: table[:, i] for i, column in enumerate(header)}
    return Trace(name, columns["t_s"], columns["demand_rps"], columns.get("capacity_rps"), columns.get("heavy_frac"))


def load_trace(path: str | Path) -> Trace:
    """Read and parse a trace file; a missing or unreadable file is a TraceError too."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read: {exc}") from None
    return parse_trace(text, name=str(path))


@cache
def packaged_trace(name: str) -> Trace:
    """One of the real traces shipped in `training/data/` by short name (see PACKAGED_TRACES)."""
    if name not in PACKAGED_TRACES:
        raise KeyError(f"unknown packaged trace {name!r}; choose from {', '.join(PACKAGED_TRACES)}")
    text = resources.files("training.data").joinpath(PACKAGED_TRACES[name]).read_text(encoding="utf-8")
    return parse_trace(text, name=name)
