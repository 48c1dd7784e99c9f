"""Interval metrics per tier from Prometheus (prometheus-api-client), one PromQL query per metric.

Each query aggregates `by (tier)`, so the cost of a tick grows with the number of series returned,
not with the number of queries. A query that fails (Prometheus down, a 4xx/5xx, a timeout) or a
tier without a series yields NaN, which the observation builder flags as missing and the safety
engine treats as stale; NaN or ±Inf values that Prometheus returns are kept as NaN the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from controller.settings import QUERY_NAMES, PrometheusSettings, QuerySettings
from policy.observation import IntervalMetrics


@dataclass(frozen=True)
class SourceReading:
    """One tick's metrics plus what went wrong per query (query name -> reason)."""

    metrics: IntervalMetrics
    errors: dict[str, str] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)  # query name -> tiers without a usable value


def _value(sample: dict[str, Any]) -> float:
    try:
        number = float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


class PrometheusSource:
    """Runs the configured queries concurrently and lays the results out in tier order."""

    def __init__(self, settings: PrometheusSettings, tiers: Sequence[str], client: PrometheusConnect | None = None):
        self.settings = settings
        self.tiers = list(tiers)
        self._index = {tier: i for i, tier in enumerate(self.tiers)}
        self._exprs = {
            name: q.expr.replace("{window}", settings.window).replace("{tier_label}", settings.tier_label)
            for name, q in settings.queries.items()
        }
        self._clients = {name: client or self._connect() for name in QUERY_NAMES}  # one session per query thread
        self._pool = ThreadPoolExecutor(max_workers=len(QUERY_NAMES), thread_name_prefix="promql")

    def _connect(self) -> PrometheusConnect:
        # one immediate retry (a pooled keep-alive connection the server closed), no back-off: a tick that
        # cannot read Prometheus now holds the rates and the next tick tries again
        retry = Retry(total=1, read=0, status=0, backoff_factor=0)
        return PrometheusConnect(url=self.settings.url, retry=retry, timeout=self.settings.timeout_s)  # type: ignore[arg-type]

    def expr(self, name: str) -> str:
        """The PromQL sent for one metric."""
        return self._exprs[name]

    def _query(self, name: str) -> tuple[np.ndarray, str | None]:
        spec: QuerySettings = self.settings.queries[name]
        n = len(self.tiers)
        try:
            result = self._clients[name].custom_query(self._exprs[name])
        except Exception as exc:  # noqa: BLE001 - connection, HTTP and JSON errors all mean "no data this tick"
            return np.full(n, np.nan), f"{type(exc).__name__}: {str(exc)[:200]}"
        if not isinstance(result, list):
            return np.full(n, np.nan), f"unexpected result type {type(result).__name__}"
        if not spec.per_tier:
            values = [_value(sample) for sample in result]
            finite = [v for v in values if not math.isnan(v)]
            return np.full(n, max(finite) if finite else np.nan), None
        out = np.full(n, np.nan if spec.fill is None else spec.fill)
        label = self.settings.tier_label
        for sample in result:
            metric = sample.get("metric", {}) if isinstance(sample, dict) else {}
            i = self._index.get(str(metric.get(label))) if isinstance(metric, dict) else None
            if i is not None:
                out[i] = _value(sample)
        return out, None

    def read(self, rate_in_force: np.ndarray) -> SourceReading:
        """Query every metric once; the rate in force completes the interval metrics."""
        futures = {name: self._pool.submit(self._query, name) for name in QUERY_NAMES}
        values: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        for name, future in futures.items():
            values[name], error = future.result()
            if error is not None:
                errors[name] = error
        missing = {name: int(np.isnan(v).sum()) for name, v in values.items() if np.isnan(v).any()}
        metrics = IntervalMetrics(
            p99_latency_ms=values["p99_latency_ms"],
            error_rate=values["error_rate"],
            cpu=values["cpu"],
            admitted_rps=values["admitted_rps"],
            throttled_rps=values["throttled_rps"],
            rate=np.asarray(rate_in_force, dtype=np.float64),
        )
        return SourceReading(metrics, errors, missing)

    def close(self) -> None:
        """Stop the query threads and close the HTTP sessions."""
        self._pool.shutdown(wait=False)
        for client in self._clients.values():
            client.close()
