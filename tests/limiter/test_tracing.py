"""Decision spans through opentelemetry-api, read back with the SDK's in-memory exporter; none when off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import limiter.middleware
from limiter import RateLimiter, RateLimitMiddleware
from limiter.tracing import DECISION_SPAN, configure_from_env, configured_tracer
from ratepilot.servers import RedisServer, free_port
from tests.limiter.support import ServedApp, write_config


class OuterSpan:
    """What an instrumented server does: each request runs inside a `request` span."""

    def __init__(self, app: Any, provider: TracerProvider):
        self.app = app
        self.tracer = provider.get_tracer("test")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.tracer.start_as_current_span("request"):
            await self.app(scope, receive, send)


def traced_app(config_path: Path, provider: TracerProvider | None) -> tuple[FastAPI, RateLimiter]:
    limiter = RateLimiter(config_path, tracer_provider=provider)
    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    if provider is not None:
        app.add_middleware(OuterSpan, provider=provider)  # added last: the outermost

    @app.get("/v1/items")
    def items() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/reports", dependencies=[Depends(limiter.charge(cost=2, tier="pro"))])
    def reports() -> dict[str, bool]:
        return {"ok": True}

    return app, limiter


def decision_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [span for span in exporter.get_finished_spans() if span.name == DECISION_SPAN]


def test_each_decision_is_a_span_with_tier_outcome_source_and_tokens(redis_server: RedisServer, tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app, _ = traced_app(write_config(tmp_path / "limiter.yaml", redis_server.url), provider)
    served = ServedApp(app, free_port())
    served.start()
    try:
        statuses = [served.client.get("/v1/items", headers={"x-api-key": "free_a"}).status_code for _ in range(6)]
        assert statuses == [200] * 5 + [429]
        assert served.client.post("/v1/reports", headers={"x-api-key": "free_b"}).status_code == 200
        redis_server.stop()  # Redis gone: the free tier fails open to the local guard, `closed` fails closed
        assert served.client.get("/v1/items", headers={"x-api-key": "free_c"}).status_code == 200
        assert served.client.get("/v1/items", headers={"x-api-key": "closed_a"}).status_code == 429
    finally:
        served.stop()
    spans = decision_spans(exporter)
    got = [
        (s.attributes["ratepilot.tier"], s.attributes["ratepilot.outcome"], s.attributes["ratepilot.source"],
         s.attributes["ratepilot.tokens"], s.attributes.get("ratepilot.limited_by"))
        for s in spans
    ]  # fmt: skip
    assert got == [
        *[("free", "allowed", "redis", 1.0, None)] * 5,
        ("free", "throttled", "redis", 1.0, "client"),
        ("pro", "allowed", "redis", 2.0, None),  # charged by the route's dependency
        ("free", "allowed", "local", 1.0, None),
        ("closed", "throttled", "fail_closed", 1.0, "redis_unavailable"),
    ]
    assert {s.attributes["ratepilot.rate_source"] for s in spans} == {"static"}
    assert spans[4].attributes["ratepilot.remaining"] < 1 <= spans[3].attributes["ratepilot.remaining"]
    requests = {s.context.span_id: s for s in exporter.get_finished_spans() if s.name == "request"}
    assert all(s.parent is not None and s.parent.span_id in requests for s in spans)  # inside the request's span
    assert all(s.end_time >= s.start_time for s in spans)


def test_no_tracer_provider_no_spans_and_no_span_calls(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert configured_tracer() is None  # the global provider is the API's proxy: nothing configured

    def must_not_run(*_: Any) -> None:
        raise AssertionError("a span was started with tracing off")

    monkeypatch.setattr(limiter.middleware, "start_decision_span", must_not_run)
    app, rate_limiter = traced_app(write_config(tmp_path / "limiter.yaml", redis_server.url), None)
    served = ServedApp(app, free_port())
    served.start()
    try:
        assert rate_limiter.running and rate_limiter.tracer is None
        assert [served.client.get("/v1/items").status_code for _ in range(3)] == [200] * 3
    finally:
        served.stop()


def test_configure_from_env_only_when_asked() -> None:
    assert configure_from_env({}) is False
    assert configure_from_env({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}) is False
    assert configure_from_env({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}) is False
    with pytest.raises(RuntimeError, match="only 'otlp'"):
        configure_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
