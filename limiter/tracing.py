"""OpenTelemetry spans for limiter decisions (and the controller's tick), through `opentelemetry-api` only.

Tracing is on when the process has a real tracer provider: one the application set with
`opentelemetry.trace.set_tracer_provider(...)` (or `opentelemetry-instrument`), or the one
`configure_from_env()` sets up from the standard `OTEL_*` variables. That is checked when the limiter
starts and when its config is reloaded, never per request: with no provider the request path does one
`is None` test and nothing else.

One span per decision, `ratepilot.limit`, a child of the request's span when there is one:

| attribute               | value                                                              |
|-------------------------|--------------------------------------------------------------------|
| `ratepilot.tier`        | the tier that decided                                              |
| `ratepilot.outcome`     | `allowed` or `throttled`                                           |
| `ratepilot.source`      | who decided: `redis`, `local` (the local guard) or `fail_closed`   |
| `ratepilot.rate_source` | where the rate in force came from: `controller`, `override`, `static`, `fallback` |
| `ratepilot.tokens`      | the request's cost in tokens                                       |
| `ratepilot.remaining`   | tokens the client may still spend (the smaller bucket)             |
| `ratepilot.limited_by`  | on a refusal: `client`, `tier`, `redis_unavailable` or `cost`      |
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, Span, Tracer

if TYPE_CHECKING:
    from limiter.verdict import Verdict

log = logging.getLogger("ratepilot.tracing")

SCOPE = "ratepilot"
DECISION_SPAN = "ratepilot.limit"
# any of these set means "export traces" (OTEL_TRACES_EXPORTER=none means the opposite)
EXPORT_VARIABLES = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def configured_tracer(provider: Any = None) -> Tracer | None:
    """A tracer when a real provider is configured (the given one, else the global one), else None."""
    provider = provider if provider is not None else trace.get_tracer_provider()
    if isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider)):
        return None
    return provider.get_tracer(SCOPE)  # type: ignore[no-any-return]


def start_decision_span(tracer: Tracer) -> Span:
    """The decision's span, started now as a child of the current span."""
    return tracer.start_span(DECISION_SPAN)


def end_decision_span(span: Span, verdict: Verdict) -> None:
    """Record the verdict on the span and end it."""
    attributes: dict[str, Any] = {
        "ratepilot.tier": verdict.tier.name,
        "ratepilot.outcome": "allowed" if verdict.allowed else "throttled",
        "ratepilot.source": verdict.source,
        "ratepilot.rate_source": verdict.tier.rates.source,
        "ratepilot.tokens": verdict.cost,
        "ratepilot.remaining": float(verdict.remaining),
    }
    if verdict.limited_by is not None:
        attributes["ratepilot.limited_by"] = verdict.limited_by
    span.set_attributes(attributes)
    span.end()


def configure_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Install an SDK tracer provider exporting over OTLP when the `OTEL_*` variables ask for it.

    Does nothing (False) when a tracer provider is already set, when none of OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT is
    set, when OTEL_TRACES_EXPORTER is `none`, or when OTEL_SDK_DISABLED is true. The exporter reads
    the rest itself (endpoint, headers, protocol via OTEL_EXPORTER_OTLP_PROTOCOL, timeout), the
    resource reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES. Raises RuntimeError (one line)
    when export is asked for but `opentelemetry-sdk` / `opentelemetry-exporter-otlp` are not installed
    (`pip install ratepilot[otlp]`)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or configured_tracer() is not None:
        return False  # disabled, or the application has set its own provider
    if not any(env.get(name) for name in EXPORT_VARIABLES):
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporters == "none":
        return False
    if exporters != "otlp":
        raise RuntimeError(f"OTEL_TRACES_EXPORTER={exporters!r}: only 'otlp' (or 'none') is supported")
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    except ImportError as exc:
        raise RuntimeError(
            f"OTLP export asked for by OTEL_* but {exc.name} is not installed: pip install 'ratepilot[otlp]'"
        ) from None
    provider = TracerProvider(resource=Resource.create())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing: exporting spans over OTLP (%s)", protocol)
    return True
