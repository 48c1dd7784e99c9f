"""The synthetic exporter's exposition text: valid Prometheus text whose counters integrate the set rates."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.synthetic_exporter import BUCKETS, SyntheticExporter


class Clock:
    """A clock the test advances."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_counters_integrate_the_set_rates_and_the_text_parses() -> None:
    clock = Clock()
    exporter = SyntheticExporter(["free", "hot"], port=1, clock=clock)
    exporter.set(cpu=0.45)
    exporter.set("hot", latency_s=0.3, error_share=0.25, throttled_tps=7.5, request_rps=20.0)
    clock.now += 10.0
    text = exporter.render()
    assert exporter.render_bytes().decode().count("\n") == text.count("\n") == 2 * (len(BUCKETS) + 7) + 4 + 1
    got = samples(text)
    assert got[("ratepilot_backend_cpu_utilization", ())] == 0.45
    hot = (("tier", "hot"),)
    assert got[("ratepilot_backend_request_seconds_count", hot)] == pytest.approx(200.0)
    assert got[("ratepilot_backend_request_seconds_sum", hot)] == pytest.approx(60.0)
    # 0.3 s requests are counted from the 0.5 s bucket up; 20 ms ones from 0.025 s
    assert got[("ratepilot_backend_request_seconds_bucket", (("le", "0.25"), ("tier", "hot")))] == 0.0
    assert got[("ratepilot_backend_request_seconds_bucket", (("le", "0.5"), ("tier", "hot")))] == pytest.approx(200.0)
    assert got[("ratepilot_backend_request_seconds_bucket", (("le", "0.01"), ("tier", "free")))] == 0.0
    assert got[("ratepilot_backend_request_seconds_bucket", (("le", "0.025"), ("tier", "free")))] == pytest.approx(500.0)
    assert got[("ratepilot_backend_request_seconds_bucket", (("le", "+Inf"), ("tier", "free")))] == pytest.approx(500.0)
    assert got[("ratepilot_backend_requests_total", (("outcome", "error"), ("tier", "hot")))] == pytest.approx(50.0)
    assert got[("ratepilot_backend_requests_total", (("outcome", "ok"), ("tier", "hot")))] == pytest.approx(150.0)
    assert got[("ratepilot_decision_tokens_total", (("outcome", "allowed"), ("tier", "free")))] == pytest.approx(500.0)
    assert got[("ratepilot_decision_tokens_total", (("outcome", "throttled"), ("tier", "hot")))] == pytest.approx(75.0)
    assert exporter.scrapes == 2
