"""`ratepilot edge` exporting its decision spans over OTLP/HTTP, configured only by OTEL_* variables,
to a real HTTP receiver in the test that decodes the OTLP protobuf."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from ratepilot.servers import RedisServer, free_port
from tests.limiter.support import wait_until, write_config


class Receiver(ThreadingHTTPServer):
    """Accepts OTLP/HTTP trace exports on /v1/traces and keeps every span with its resource's service.name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, dict[str, Any]]] = []  # (service.name, span name, attributes)
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 - the http.server name
        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    self.server.spans.append((resource.get("service.name", ""), span.name, attributes))
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_edge_exports_decision_spans_over_otlp_from_the_environment(
    redis_server: RedisServer, receiver: Receiver, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "limiter.yaml", redis_server.url)
    port = free_port()
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_address[1]}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "edge-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms between batches (default 5 s)
    }
    edge = subprocess.Popen(
        [sys.executable, "-m", "ratepilot.cli", "edge", "--config", str(config), "--backend", "echo", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, 30.0), "the edge did not start"
        statuses = [httpx.get(f"{url}/v1/items", headers={"x-api-key": "free_a"}).status_code for _ in range(6)]
        assert statuses == [200] * 5 + [429]
        decisions = lambda: [s for s in receiver.spans if s[1] == "ratepilot.limit"]  # noqa: E731
        assert wait_until(lambda: len(decisions()) >= 6, 30.0), receiver.spans
        assert {s[0] for s in decisions()} == {"edge-under-test"}
        outcomes = [(a["ratepilot.tier"], a["ratepilot.outcome"], a["ratepilot.source"], a["ratepilot.tokens"])
                    for _, _, a in decisions()]  # fmt: skip
        assert outcomes == [("free", "allowed", "redis", 1.0)] * 5 + [("free", "throttled", "redis", 1.0)]
    finally:
        edge.terminate()
        edge.wait(timeout=20)


def test_edge_refuses_an_exporter_it_does_not_have(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ratepilot.cli", "edge", "--port", str(free_port())],
        env={**os.environ, "OTEL_TRACES_EXPORTER": "zipkin"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "ratepilot edge: OTEL_TRACES_EXPORTER='zipkin': only 'otlp' (or 'none') is supported"
    )
