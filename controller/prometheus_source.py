"""Interval metrics per tier from Prometheus (prometheus-api-client), one PromQL query per metric.

Each query aggregates `by (tier)` (or reads a recording rule that does), so the cost of a tick grows
with the number of series returned, not with the number of queries. The queries run concurrently and
can be started before the tick reads Redis (`start`, then `PendingReading.result`), so the Prometheus
round trips overlap the controller's own work. A query that fails (Prometheus down, a 4xx/5xx, a
timeout, a malformed answer) or a tier without a series yields NaN, which the observation builder
flags as missing and the safety engine treats as stale; NaN or ±Inf values that Prometheus returns
are kept as NaN the same way. A query with a `fallback` whose answer carries no tier at all (the
recording rules are not loaded, or not evaluated yet) is answered by the fallback's raw PromQL.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from controller.settings import QUERY_NAMES, PrometheusSettings, QuerySettings
from policy.observation import IntervalMetrics

log = logging.getLogger("ratepilot.controller.prometheus")


@dataclass(frozen=True)
class SourceReading:
    """One tick's metrics plus what went wrong per query (query name -> reason)."""

    metrics: IntervalMetrics
    errors: dict[str, str] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)  # query name -> tiers without a usable value
    fallbacks: tuple[str, ...] = ()  # query names answered by their raw-PromQL fallback this tick


@dataclass(frozen=True)
class _Answer:
    values: np.ndarray
    error: str | None = None
    fell_back: bool = False


class FastPrometheusConnect(PrometheusConnect):
    """PrometheusConnect whose instant queries parse the answer with orjson (10,000 series: ~2x faster than json)."""

    def custom_query(self, query: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """The `result` of an instant query, as PrometheusConnect.custom_query returns it."""
        response = self._session.request(
            method=self._method, url=f"{self.url}/api/v1/query", params={"query": str(query), **(params or {})},
            verify=self._session.verify, headers=self.headers, auth=self.auth, cert=self._session.cert,
            timeout=self._timeout if timeout is None else timeout,
        )  # fmt: skip
        if response.status_code != 200:
            raise PrometheusApiClientException(f"HTTP Status Code {response.status_code} ({response.content!r})")
        return orjson.loads(response.content)["data"]["result"]


def _values(samples: list[Any]) -> np.ndarray:
    """The sample values as floats; NaN where a value is missing, unparseable or not finite."""
    try:
        values = np.array([sample["value"][1] for sample in samples], dtype=np.float64)
    except (KeyError, IndexError, TypeError, ValueError):  # a malformed sample: fall back to one at a time
        values = np.array([_value(sample) for sample in samples], dtype=np.float64)
    values[~np.isfinite(values)] = np.nan
    return values


def _value(sample: Any) -> float:
    try:
        return float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return math.nan


def _tier_of(sample: Any, label: str) -> object:
    metric = sample.get("metric") if isinstance(sample, dict) else None
    return metric.get(label) if isinstance(metric, dict) else None


class PendingReading:
    """The queries of one tick in flight; `result` waits for them and lays them out."""

    def __init__(self, futures: dict[str, Future[_Answer]]):
        self._futures = futures

    def result(self, rate_in_force: np.ndarray) -> SourceReading:
        """Wait for every query; the rate in force completes the interval metrics."""
        answers = {name: future.result() for name, future in self._futures.items()}
        values = {name: a.values for name, a in answers.items()}
        errors = {name: a.error for name, a in answers.items() if a.error is not None}
        missing = {name: int(np.isnan(v).sum()) for name, v in values.items() if np.isnan(v).any()}
        metrics = IntervalMetrics(
            p99_latency_ms=values["p99_latency_ms"],
            error_rate=values["error_rate"],
            cpu=values["cpu"],
            admitted_rps=values["admitted_rps"],
            throttled_rps=values["throttled_rps"],
            rate=np.asarray(rate_in_force, dtype=np.float64),
        )
        return SourceReading(metrics, errors, missing, tuple(name for name, a in answers.items() if a.fell_back))


class PrometheusSource:
    """Runs the configured queries concurrently and lays the results out in tier order."""

    def __init__(self, settings: PrometheusSettings, tiers: Sequence[str], client: PrometheusConnect | None = None):
        self.settings = settings
        self.tiers = list(tiers)
        self._index = {tier: i for i, tier in enumerate(self.tiers)}
        self._exprs = {name: self._fill(q.expr) for name, q in settings.queries.items()}
        self._fallbacks = {name: self._fill(q.fallback) for name, q in settings.queries.items() if q.fallback}
        self._warned: set[str] = set()
        self._clients = {name: client or self._connect() for name in QUERY_NAMES}  # one session per query thread
        self._pool = ThreadPoolExecutor(max_workers=len(QUERY_NAMES), thread_name_prefix="promql")

    def _fill(self, expr: str) -> str:
        return expr.replace("{window}", self.settings.window).replace("{tier_label}", self.settings.tier_label)

    def _connect(self) -> PrometheusConnect:
        # one immediate retry (a pooled keep-alive connection the server closed), no back-off: a tick that
        # cannot read Prometheus now holds the rates and the next tick tries again
        retry = Retry(total=1, read=0, status=0, backoff_factor=0)
        return FastPrometheusConnect(url=self.settings.url, retry=retry, timeout=self.settings.timeout_s)  # type: ignore[arg-type]

    def expr(self, name: str) -> str:
        """The PromQL sent for one metric."""
        return self._exprs[name]

    def fallback(self, name: str) -> str | None:
        """The raw PromQL sent for one metric when its query answers no tier at all (None: no fallback)."""
        return self._fallbacks.get(name)

    def _run(self, name: str, expr: str) -> tuple[list[Any] | None, str | None]:
        try:
            result = self._clients[name].custom_query(expr)
        except Exception as exc:  # noqa: BLE001 - connection, HTTP and JSON errors all mean "no data this tick"
            return None, f"{type(exc).__name__}: {str(exc)[:200]}"
        if not isinstance(result, list):
            return None, f"unexpected result type {type(result).__name__}"
        return result, None

    def _query(self, name: str) -> _Answer:
        spec: QuerySettings = self.settings.queries[name]
        n = len(self.tiers)
        result, error = self._run(name, self._exprs[name])
        fell_back = False
        fallback = self._fallbacks.get(name)
        if result is not None and fallback is not None and spec.per_tier and not self._has_tiers(result):
            if name not in self._warned:
                self._warned.add(name)
                log.warning("event=query_fallback query=%s reason='no tier in %s' fallback=%r", name, self._exprs[name], fallback)
            result, error = self._run(name, fallback)
            fell_back = True
        if result is None:
            return _Answer(np.full(n, np.nan), error, fell_back)
        try:
            if not spec.per_tier:
                finite = _values(result)
                finite = finite[~np.isnan(finite)]
                return _Answer(np.full(n, finite.max() if finite.size else np.nan), None, fell_back)
            return _Answer(self._per_tier(result, spec.fill), None, fell_back)
        except (TypeError, ValueError) as exc:  # e.g. an unhashable label value: the answer is unusable
            return _Answer(np.full(n, np.nan), f"malformed answer: {type(exc).__name__}: {str(exc)[:200]}", fell_back)

    def _has_tiers(self, result: list[Any]) -> bool:
        label = self.settings.tier_label
        return any(_tier_of(sample, label) is not None for sample in result)

    def _per_tier(self, result: list[Any], fill: float | None) -> np.ndarray:
        """Sample values placed at their tier's index; tiers without a sample get `fill` (NaN when None)."""
        n, label, index = len(self.tiers), self.settings.tier_label, self._index
        out = np.full(n, np.nan if fill is None else fill)
        positions = np.array([index.get(_tier_of(sample, label), -1) for sample in result], dtype=np.int64)  # type: ignore[call-overload]
        known = positions >= 0
        out[positions[known]] = _values(result)[known]
        return out

    def start(self) -> PendingReading:
        """Send every query now (concurrently); collect them with `PendingReading.result`."""
        return PendingReading({name: self._pool.submit(self._query, name) for name in QUERY_NAMES})

    def read(self, rate_in_force: np.ndarray) -> SourceReading:
        """Query every metric once and wait; the rate in force completes the interval metrics."""
        return self.start().result(rate_in_force)

    def close(self) -> None:
        """Stop the query threads and close the HTTP sessions."""
        self._pool.shutdown(wait=False)
        for client in self._clients.values():
            client.close()
