"""A synthetic metrics exporter for tests, benchmarks and dry runs of the controller.

It serves, over real HTTP in the Prometheus text format, the metric names the limiter and the edge
export (docs/contracts.md) with values the caller sets per tier: request rate, latency, error share,
admitted and throttled tokens/s, backend CPU. Counters integrate the set rates over wall-clock time
at each scrape, so `rate()` in PromQL returns what was set. The series' name-and-labels prefixes are
built once; a scrape formats the 17 values per tier with one orjson call and joins them in, so a
10,000-tier scrape (170,000 samples) costs the exporter ~30 ms instead of ~250 ms of the CPU that the
Prometheus and controller it stands beside (in the benchmark) also need. In production these
metrics come from edge replicas on other machines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import orjson

from ratepilot.servers import free_port

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # seconds


class SyntheticExporter:
    """Per-tier synthetic backend and limiter metrics on http://127.0.0.1:PORT/metrics."""

    def __init__(self, tiers: Sequence[str], port: int | None = None, clock: object = time.monotonic):
        self.tiers = list(tiers)
        n = len(self.tiers)
        self.port = port or free_port()
        self._clock = clock
        self._lock = threading.Lock()
        self.request_rps = np.full(n, 50.0)
        self.latency_s = np.full(n, 0.02)
        self.error_share = np.zeros(n)
        self.admitted_tps = np.full(n, 50.0)
        self.throttled_tps = np.zeros(n)
        self.cpu = 0.3
        self._requests = np.zeros(n)
        self._errors = np.zeros(n)
        self._latency_sum = np.zeros(n)
        self._buckets = np.zeros((n, len(BUCKETS)))
        self._admitted = np.zeros(n)
        self._throttled = np.zeros(n)
        self._last = self._now()
        self._prefixes = self._series_prefixes()
        self._server: ThreadingHTTPServer | None = None
        self.scrapes = 0

    def _now(self) -> float:
        return float(self._clock())  # type: ignore[operator]

    def set(self, tier: str | None = None, **values: float) -> None:
        """Set any of request_rps, latency_s, error_share, admitted_tps, throttled_tps for one tier (or all); cpu globally."""
        with self._lock:
            self._advance()
            index = slice(None) if tier is None else self.tiers.index(tier)
            for name, value in values.items():
                if name == "cpu":
                    self.cpu = float(value)
                elif name in ("request_rps", "latency_s", "error_share", "admitted_tps", "throttled_tps"):
                    getattr(self, name)[index] = value
                else:
                    raise ValueError(f"unknown metric {name!r}")

    def _advance(self) -> None:
        now = self._now()
        dt, self._last = max(0.0, now - self._last), now
        done = self.request_rps * dt
        self._requests += done
        self._errors += done * self.error_share
        self._latency_sum += done * self.latency_s
        self._buckets += np.where(self.latency_s[:, None] <= np.array(BUCKETS)[None, :], done[:, None], 0.0)
        self._admitted += self.admitted_tps * dt
        self._throttled += self.throttled_tps * dt

    def _series_prefixes(self) -> list[bytes]:
        """Per sample, in `_values` order: the text between the previous value and its own (newline, any # TYPE line, name{labels})."""
        labels = [f'tier="{t}"' for t in self.tiers]
        histogram = "ratepilot_backend_request_seconds"
        columns: list[tuple[str, list[str]]] = [
            *((f"{histogram}_bucket", [f'{lab},le="{le}"' for lab in labels]) for le in (*map(str, BUCKETS), "+Inf")),
            (f"{histogram}_count", labels),
            (f"{histogram}_sum", labels),
            ("ratepilot_backend_requests_total", [f'{lab},outcome="ok"' for lab in labels]),
            ("ratepilot_backend_requests_total", [f'{lab},outcome="error"' for lab in labels]),
            ("ratepilot_decision_tokens_total", [f'{lab},outcome="allowed"' for lab in labels]),
            ("ratepilot_decision_tokens_total", [f'{lab},outcome="throttled"' for lab in labels]),
        ]
        types = {f"{histogram}_bucket": f"# TYPE {histogram} histogram\n", "ratepilot_backend_requests_total": "# TYPE ratepilot_backend_requests_total counter\n",
                 "ratepilot_decision_tokens_total": "# TYPE ratepilot_decision_tokens_total counter\n"}  # fmt: skip
        prefixes: list[bytes] = []
        for name, column in columns:
            head = types.pop(name, "")
            prefixes += [f"{head if k == 0 else ''}{name}{{{lab}}} ".encode() for k, lab in enumerate(column)]
        prefixes.append(b"# TYPE ratepilot_backend_cpu_utilization gauge\nratepilot_backend_cpu_utilization ")
        return [prefixes[0]] + [b"\n" + prefix for prefix in prefixes[1:]]

    def _values(self) -> np.ndarray:
        """Every sample value, in `_series_prefixes` order."""
        return np.concatenate([
            self._buckets.T.reshape(-1), self._requests, self._requests, self._latency_sum, self._requests - self._errors,
            self._errors, self._admitted, self._throttled, [self.cpu],
        ])  # fmt: skip

    def render(self) -> str:
        """The exposition text for one scrape."""
        return self.render_bytes().decode()

    def render_bytes(self) -> bytes:
        """The exposition text for one scrape, as served."""
        with self._lock:
            self._advance()
            self.scrapes += 1
            values = self._values()
        texts = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
        parts: list[bytes] = [b""] * (2 * len(texts) + 1)  # prefix, value, prefix, value, ..., newline
        parts[0:-1:2], parts[1:-1:2], parts[-1] = self._prefixes, texts, b"\n"
        return b"".join(parts)

    def start(self) -> SyntheticExporter:
        """Serve /metrics on a daemon thread."""
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                body = exporter.render_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, name="synthetic-exporter", daemon=True).start()
        return self

    @property
    def target(self) -> str:
        """host:port for a Prometheus scrape config."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.synthetic_exporter --tiers N --port P`: serve N synthetic tiers (t00000, ...) until killed."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m benchmarks.synthetic_exporter", description=main.__doc__)
    parser.add_argument("--tiers", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.tiers < 1:
        parser.error("--tiers must be positive")
    exporter = SyntheticExporter([f"t{i:05d}" for i in range(args.tiers)], port=args.port).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    exporter.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
