"""The Prometheus source against a real Prometheus scraping the synthetic exporter every second."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server

from benchmarks.synthetic_exporter import SyntheticExporter
from controller.prometheus_source import PrometheusSource
from controller.settings import PrometheusSettings, QuerySettings, raw_queries
from limiter.metrics import BackendMetrics
from ratepilot.servers import PrometheusServer, free_port
from tests.controller.support import query, wait_for

TIERS = ["free", "pro", "idle", "unknown"]


def source(url: str, **kw: object) -> PrometheusSource:
    return PrometheusSource(PrometheusSettings(url=url, window="3s", **kw), TIERS)  # type: ignore[arg-type]


def test_values_per_tier_match_what_the_exporter_serves(prometheus: PrometheusServer, exporter: SyntheticExporter) -> None:
    rates = np.array([100.0, 400.0, 200.0, 50.0])
    # other tests set throttling on the shared exporter and reset it: wait until the 3 s window is past it
    wait_for(lambda: source(prometheus.url).read(rates).metrics.throttled_rps[:2].tolist() == [0.0, 0.0], timeout_s=30)
    reading = source(prometheus.url).read(rates)
    m = reading.metrics
    assert reading.errors == {}
    # 20 ms requests fall in the (10, 25] ms bucket: p99 interpolates to 10 + 0.99 * 15 ms
    assert np.allclose(m.p99_latency_ms[:2], 24.85)
    assert m.error_rate[:2].tolist() == [0.0, 0.0]
    assert np.allclose(m.admitted_rps[:2], 50.0, rtol=0.1)
    assert m.throttled_rps[:2].tolist() == [0.0, 0.0]
    assert np.allclose(m.cpu, 0.3)
    # no traffic: latency and error rate are NaN (missing); token rates are 0 (filled)
    assert math.isnan(m.p99_latency_ms[2]) and math.isnan(m.error_rate[2]) and m.admitted_rps[2] == 0.0
    # a tier Prometheus has never heard of: missing metrics, 0 tokens
    assert math.isnan(m.p99_latency_ms[3]) and m.admitted_rps[3] == 0.0
    assert reading.missing["p99_latency_ms"] == 2
    assert m.rate.tolist() == [100.0, 400.0, 200.0, 50.0]
    # the deploy records 15s windows only: for 3s the raw PromQL answered every per-tier query
    assert set(reading.fallbacks) == {"p99_latency_ms", "error_rate", "admitted_rps", "throttled_rps"}


def test_recording_rules_answer_the_default_queries_like_the_raw_promql(prometheus: PrometheusServer) -> None:
    recorded = PrometheusSource(PrometheusSettings(url=prometheus.url, window="15s"), TIERS)
    raw = PrometheusSource(
        PrometheusSettings(url=prometheus.url, window="15s",
                           queries={name: QuerySettings(expr=expr, fill=0.0 if name.endswith("_rps") else None)
                                    for name, expr in raw_queries().items()}),
        TIERS,
    )  # fmt: skip

    def settled() -> bool:  # the 5 s rule group has run over a full 15 s window
        reading = recorded.read(np.ones(4))
        return (reading.fallbacks == () and bool(np.allclose(reading.metrics.admitted_rps[:2], 50.0, rtol=0.05))
                and reading.metrics.throttled_rps[:2].tolist() == [0.0, 0.0])  # past other tests' throttling too

    wait_for(settled, timeout_s=40, step_s=1.0)
    a, b = recorded.read(np.ones(4)), raw.read(np.ones(4))
    assert a.errors == b.errors == {} and a.fallbacks == () and b.fallbacks == ()
    for name in ("p99_latency_ms", "error_rate", "admitted_rps", "throttled_rps"):
        x, y = getattr(a.metrics, name), getattr(b.metrics, name)
        assert np.array_equal(np.isnan(x), np.isnan(y)), name
        assert np.allclose(x[~np.isnan(x)], y[~np.isnan(y)], rtol=0.1), name
    assert np.allclose(a.metrics.p99_latency_ms[:2], 24.85) and np.allclose(a.metrics.admitted_rps[:2], 50.0, rtol=0.1)
    assert math.isnan(a.metrics.p99_latency_ms[2]) and a.metrics.error_rate[:2].tolist() == [0.0, 0.0]
    recorded.close()
    raw.close()


def test_a_query_without_fallback_that_answers_no_tier_is_missing(prometheus: PrometheusServer) -> None:
    queries = {"p99_latency_ms": QuerySettings(expr="tier:not_recorded_anywhere:p99")}
    reading = source(prometheus.url, queries=queries).read(np.ones(4))
    assert np.isnan(reading.metrics.p99_latency_ms).all() and reading.missing["p99_latency_ms"] == 4
    assert "p99_latency_ms" not in reading.fallbacks and reading.errors == {}


def test_prometheus_down_gives_nan_and_the_reason_fast() -> None:
    started = time.monotonic()
    reading = source(f"http://127.0.0.1:{free_port()}").read(np.ones(4))
    assert time.monotonic() - started < 2.0
    assert set(reading.errors) == {"p99_latency_ms", "error_rate", "cpu", "admitted_rps", "throttled_rps"}
    assert "ConnectionError" in reading.errors["cpu"]
    assert np.isnan(reading.metrics.p99_latency_ms).all() and np.isnan(reading.metrics.admitted_rps).all()


def test_nan_inf_and_bad_promql_become_missing(prometheus: PrometheusServer) -> None:
    queries = {
        "p99_latency_ms": QuerySettings(expr='0/0 * sum by (tier) (ratepilot_backend_requests_total{outcome="ok"})'),
        "error_rate": QuerySettings(expr='1/0 + sum by (tier) (ratepilot_backend_requests_total{outcome="ok"})'),
        "cpu": QuerySettings(expr="this is not promql", per_tier=False),
    }
    reading = source(prometheus.url, queries=queries).read(np.ones(4))
    assert np.isnan(reading.metrics.p99_latency_ms).all()
    assert np.isnan(reading.metrics.error_rate).all()
    assert np.isnan(reading.metrics.cpu).all() and "400" in reading.errors["cpu"]
    assert set(reading.errors) == {"cpu"}


class FlickeringCpu(SyntheticExporter):
    """A backend whose CPU gauge reads 0.2 and 0.8 on alternate scrapes (one second of a few workers is that noisy)."""

    def render_bytes(self) -> bytes:
        self.cpu = 0.8 if self.scrapes % 2 else 0.2
        return super().render_bytes()


def test_cpu_is_the_mean_over_the_window_not_one_scrape(tmp_path: Path) -> None:
    exporter = FlickeringCpu(["free"]).start()
    server = PrometheusServer([exporter.target], workdir=tmp_path / "prom", scrape_interval_s=1.0)
    server.start()
    try:
        cpu = PrometheusSource(PrometheusSettings(url=server.url, window="6s"), ["free"])

        def window_filled() -> bool:
            series = query(server.url, "ratepilot_backend_cpu_utilization[6s]")
            return bool(series) and len(series[0]["values"]) >= 5

        wait_for(window_filled, timeout_s=30)
        readings = []
        for _ in range(3):
            readings.append(float(cpu.read(np.ones(1)).metrics.cpu[0]))
            time.sleep(1.0)
        # one scrape would say 0.2 or 0.8; five or six of them average to 0.5 +- 0.06
        assert all(0.43 <= value <= 0.57 for value in readings), readings
        cpu.close()
    finally:
        server.stop()
        exporter.stop()


def test_p99_read_from_the_backend_histogram_is_within_ten_percent_of_the_true_p99(tmp_path: Path) -> None:
    # exponential service times of mean 25 ms (the demo backend idle): true p99 = 25 ms x ln 100 = 115 ms
    registry = CollectorRegistry()
    histogram = BackendMetrics(registry).request_seconds
    true_p99 = 0.025 * math.log(100.0)
    for q in (np.arange(20_000) + 0.5) / 20_000:  # the exact quantiles: no sampling noise
        histogram.labels("free").observe(-0.025 * math.log1p(-q))
    port = free_port()
    httpd, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    server = PrometheusServer([f"127.0.0.1:{port}"], workdir=tmp_path / "prom", scrape_interval_s=1.0)
    server.start()
    try:
        expr = "histogram_quantile(0.99, sum by (le) (ratepilot_backend_request_seconds_bucket))"
        wait_for(lambda: bool(query(server.url, expr)), timeout_s=30)
        read = float(query(server.url, expr)[0]["value"][1])
        # with the default buckets (0.1, 0.25, ...) Prometheus' linear interpolation reads ~170 ms
        assert abs(read / true_p99 - 1) < 0.10, read
    finally:
        server.stop()
        httpd.shutdown()
        thread.join(timeout=5)
