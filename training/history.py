"""Read a recorded backend history from Prometheus (range queries over HTTP) into a `calibration.History`.

The series are the edge's (docs/contracts.md): the limiter's decision tokens, the backend's requests,
latency histogram and CPU gauge, and the rate in force. Each is one `query_range` at a fixed step,
summed over tiers and instances, laid on the grid start, start + step, ..., end (NaN where Prometheus
has no value). Bad input is refused before any query (`HistoryError`); an unreachable server, an
error answer or a series without samples in the range is a `HistoryError` naming the query.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx
import numpy as np

from training.calibration import History, p99_from_buckets

MAX_POINTS = 11_000  # Prometheus refuses a range query of more points than this
DURATION = re.compile(r"^[1-9][0-9]*(ms|s|m|h)$")
RELATIVE = re.compile(r"^now(?:-([0-9]+(?:\.[0-9]+)?)([smhd]))?$")
UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "ms": 0.001}


class HistoryError(ValueError):
    """A history that cannot be read; the message says which input or query and why."""


class Recording(NamedTuple):
    """A history plus the series a replay needs."""

    history: History
    offered_tps: np.ndarray  # tokens/s asked of the limiter (admitted + throttled) over the shortest window
    rate_tps: np.ndarray  # the rate in force, summed over tiers (NaN where no limiter reported one)
    start_s: float  # unix seconds of the first step


def queries(window: str, instant_window: str, view_window: str) -> dict[str, tuple[str, bool]]:
    """name -> (PromQL, required) of every series read."""
    tokens = 'sum(rate(ratepilot_decision_tokens_total{outcome="%s"}[%s]))'
    return {
        "admitted_tps": (tokens % ("allowed", window), True),
        "throttled_tps": (tokens % ("throttled", window), False),
        "finished_rps": (f"sum(rate(ratepilot_backend_requests_total[{window}]))", True),
        "error_rps": (f'sum(rate(ratepilot_backend_requests_total{{outcome="error"}}[{window}]))', False),
        "p99_ms": (f"sum by (le) (rate(ratepilot_backend_request_seconds_bucket[{window}]))", True),  # buckets: see p99_from_buckets
        "cpu": (f"max(avg_over_time(ratepilot_backend_cpu_utilization[{window}]))", True),
        "instant_tps": (tokens % ("allowed", instant_window), True),
        "seen_tps": (tokens % ("allowed", view_window), True),
        "offered_tps": (f"sum(rate(ratepilot_decision_tokens_total[{instant_window}]))", True),
        "rate_tps": ("sum(ratepilot_refill_rate)", False),
    }


def parse_time(text: str, option: str, now: float | None = None) -> float:
    """Unix seconds of `text`: unix seconds, ISO 8601 (UTC unless it says otherwise), `now` or `now-15m`."""
    text = text.strip()
    now = time.time() if now is None else now
    relative = RELATIVE.match(text)
    if relative:
        amount, unit = relative.groups()
        return now - (float(amount) * UNIT_S[unit] if amount else 0.0)
    try:
        value = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise HistoryError(f"{option} {text!r}: not a time (unix seconds, ISO 8601 such as 2026-12-06T05:00:00Z, or now-15m)") from None
        value = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(value) or value <= 0:
        raise HistoryError(f"{option} {text!r}: not a time")
    return value


def parse_duration_s(text: str, option: str) -> float:
    """Seconds of a Prometheus duration such as 5s, 500ms, 2m; HistoryError otherwise."""
    match = DURATION.match(text)
    if not match:
        raise HistoryError(f"{option} {text!r}: not a duration such as 5s, 500ms or 1m")
    return float(text[: -len(match.group(1))]) * UNIT_S[match.group(1)]


def check_url(url: str) -> str:
    """The Prometheus base URL without a trailing slash; HistoryError unless it is http(s)://host[:port][/path]."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise HistoryError(f"--prometheus-url {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise HistoryError(f"--prometheus-url {url!r}: not an http(s) URL such as http://127.0.0.1:9090")
    del port
    return url.rstrip("/")


def check_range(start_s: float, end_s: float, step_s: float) -> int:
    """Steps of the range; HistoryError when end <= start or the range has too many points."""
    if not (math.isfinite(step_s) and 0 < step_s <= 3600):
        raise HistoryError(f"--step {step_s!r}: must be a number of seconds in (0, 3600]")
    if end_s <= start_s:
        raise HistoryError(f"--end must be after --start (got {end_s - start_s:+g} s)")
    points = int(math.floor((end_s - start_s) / step_s)) + 1
    if points > MAX_POINTS:
        raise HistoryError(f"{points} steps of {step_s:g} s between --start and --end; Prometheus answers at most {MAX_POINTS}: raise --step")
    return points


def _buckets(name: str, answer: Any, start_s: float, step_s: float, points: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(finite bounds, cumulative rates per step and bucket, +Inf last) of a `sum by (le)` range answer; None without series."""
    try:
        result = answer["data"]["result"]
        if not result:
            return None
        bounds = sorted({float(series["metric"]["le"]) for series in result})
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise HistoryError(f"{name}: malformed histogram answer from Prometheus ({type(exc).__name__}: {exc})") from None
    if not bounds or bounds[-1] != math.inf:
        raise HistoryError(f"{name}: the histogram has no +Inf bucket")
    cumulative = np.full((points, len(bounds)), np.nan)
    for series in result:
        column = bounds.index(float(series["metric"]["le"]))
        one = {"data": {"result": [series]}}
        values = _values(name, "", one, start_s, step_s, points)
        if values is not None:
            cumulative[:, column] = values
    return np.array(bounds[:-1]), cumulative


def _values(name: str, expr: str, answer: Any, start_s: float, step_s: float, points: int) -> np.ndarray | None:
    """The one series of an answer on the grid, None when there is none; HistoryError when malformed."""
    try:
        result = answer["data"]["result"]
        if not result:
            return None
        if len(result) > 1:
            raise HistoryError(f"{name}: {len(result)} series for {expr!r}; expected one")
        out = np.full(points, np.nan)
        for stamp, text in result[0]["values"]:
            index = int(round((float(stamp) - start_s) / step_s))
            if 0 <= index < points:
                value = float(text)
                out[index] = value if math.isfinite(value) else np.nan
        return out
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        if isinstance(exc, HistoryError):
            raise
        raise HistoryError(f"{name}: malformed answer from Prometheus ({type(exc).__name__}: {exc})") from None


def read_history(
    url: str, start_s: float, end_s: float, step_s: float = 1.0, window: str = "5s", instant_window: str = "2s",
    view_window: str = "10s", timeout_s: float = 10.0,
) -> Recording:  # fmt: skip
    """Every series of `queries` between start and end; HistoryError on bad input, no server or no samples."""
    base = check_url(url)
    points = check_range(start_s, end_s, step_s)
    for option, text in (("--window", window), ("--instant-window", instant_window), ("--view-window", view_window)):
        parse_duration_s(text, option)
    series: dict[str, np.ndarray] = {}
    buckets: tuple[np.ndarray, np.ndarray] | None = None
    with httpx.Client(base_url=base, timeout=timeout_s) as client:
        for name, (expr, required) in queries(window, instant_window, view_window).items():
            params = {"query": expr, "start": f"{start_s:.3f}", "end": f"{end_s:.3f}", "step": f"{step_s:g}"}
            try:
                response = client.get("/api/v1/query_range", params=params)
            except httpx.HTTPError as exc:
                raise HistoryError(f"cannot reach Prometheus at {base}: {type(exc).__name__}: {exc}") from None
            try:
                answer = response.json()
            except ValueError:
                raise HistoryError(f"{base} did not answer like Prometheus (HTTP {response.status_code}, not JSON)") from None
            if response.status_code != 200 or not isinstance(answer, dict) or answer.get("status") != "success":
                reason = answer.get("error") if isinstance(answer, dict) else None
                raise HistoryError(f"Prometheus refused {name} (HTTP {response.status_code}): {reason or response.text[:200]}")
            if name == "p99_ms":
                buckets = _buckets(name, answer, start_s, step_s, points)
                values = None if buckets is None else p99_from_buckets(*buckets)
            else:
                values = _values(name, expr, answer, start_s, step_s, points)
            if values is None:
                if required:
                    raise HistoryError(
                        f"no samples of {name} ({expr}) between {_iso(start_s)} and {_iso(end_s)}: "
                        "is this the edge's Prometheus, and did it record that window?"
                    )
                values = np.full(points, np.nan)
            series[name] = values
    if np.all(np.isnan(series["admitted_tps"])):
        raise HistoryError("the admitted rate has no values in the range")
    has_traffic = np.isfinite(series["finished_rps"])
    series["throttled_tps"] = np.where(np.isnan(series["throttled_tps"]), 0.0, series["throttled_tps"])
    series["error_rps"] = np.where(np.isnan(series["error_rps"]) & has_traffic, 0.0, series["error_rps"])
    assert buckets is not None  # p99_ms is required
    history = History(
        step_s=step_s, **{k: series[k] for k in History._fields if k in series}, bucket_bounds_s=buckets[0], bucket_rates=buckets[1]
    )
    return Recording(history, series["offered_tps"], series["rate_tps"], start_s)


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
