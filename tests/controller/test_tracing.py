"""The controller's tick as an OpenTelemetry span with a child span per stage (SDK in-memory exporter)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from controller.loop import TICK_SPAN, TickReport
from controller.policies import LoadedPolicy
from controller.runtime import Controller
from controller.service import main
from ratepilot.servers import PrometheusServer, RedisServer
from tests.controller.policies import LatencyFollower, Raising
from tests.controller.support import make_settings

STAGES = ["redis_read", "prometheus", "policy", "redis_write"]  # policy: its proposal clamped by the safety engine


def traced_tick(redis_url: str, prometheus_url: str, policy: LoadedPolicy) -> tuple[TickReport, list[ReadableSpan]]:
    """One tick of a controller whose loop traces to an in-memory exporter; the report and its spans."""
    controller = Controller(make_settings(redis_url, prometheus_url), policy)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert controller.loop.tracer is None  # no provider configured in this process: no spans, no cost
    controller.loop.tracer = provider.get_tracer("test")
    try:
        assert controller.lease.try_acquire_or_renew()
        return controller.loop.tick(), list(exporter.get_finished_spans())
    finally:
        controller.stop()


def test_tick_is_a_span_with_its_stages(redis_server_session: RedisServer, prometheus: PrometheusServer) -> None:
    report, spans = traced_tick(redis_server_session.url, prometheus.url, LoadedPolicy(LatencyFollower(), "test"))
    assert report.result == "written"
    tick = next(s for s in spans if s.name == TICK_SPAN)
    children = [s for s in spans if s.parent is not None and s.parent.span_id == tick.context.span_id]
    assert [s.name for s in children] == [f"ratepilot.controller.{stage}" for stage in STAGES]
    assert tick.attributes is not None and tick.attributes["ratepilot.result"] == "written"
    assert tick.attributes["ratepilot.version"] == report.version and tick.attributes["ratepilot.tiers"] == 3  # make_settings: 3 tiers
    assert not tick.events and tick.status.status_code is StatusCode.UNSET


def test_a_failing_stage_is_an_event_on_the_tick(
    redis_server_session: RedisServer, prometheus: PrometheusServer
) -> None:
    report, spans = traced_tick(redis_server_session.url, prometheus.url, LoadedPolicy(Raising(), "raising"))
    assert "policy" in report.errors and report.result == "written"  # the rates in force are kept
    assert any(s.name == "ratepilot.controller.policy" for s in spans)
    tick = next(s for s in spans if s.name == TICK_SPAN)
    assert [(e.name, (e.attributes or {})["ratepilot.stage"]) for e in tick.events] == [("stage_error", "policy")]


def test_controller_refuses_an_exporter_it_does_not_have(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    assert main(["--once"]) == 2
    assert capsys.readouterr().err == "ratepilot controller: OTEL_TRACES_EXPORTER='zipkin': only 'otlp' (or 'none') is supported\n"
