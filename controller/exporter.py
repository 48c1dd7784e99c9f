"""A synthetic metrics exporter for tests, benchmarks and dry runs of the controller.

It serves, over real HTTP in the Prometheus text format, the metric names the limiter and the edge
export (docs/contracts.md) with values the caller sets per tier: request rate, latency, error share,
admitted and throttled tokens/s, backend CPU. Counters integrate the set rates over wall-clock time
at each scrape, so `rate()` in PromQL returns what was set. The text is rendered with plain string
joins, fast enough for 10,000 tiers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

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
        self._labels = [f'tier="{t}"' for t in self.tiers]
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

    def render(self) -> str:
        """The exposition text for one scrape."""
        with self._lock:
            self._advance()
            self.scrapes += 1
            lines = ["# TYPE ratepilot_backend_request_seconds histogram"]
            for j, le in enumerate(BUCKETS):
                column = self._buckets[:, j].tolist()
                lines += [f'ratepilot_backend_request_seconds_bucket{{{lab},le="{le}"}} {v!r}' for lab, v in zip(self._labels, column, strict=True)]
            total = self._requests.tolist()
            lines += [f'ratepilot_backend_request_seconds_bucket{{{lab},le="+Inf"}} {v!r}' for lab, v in zip(self._labels, total, strict=True)]
            lines += [f"ratepilot_backend_request_seconds_count{{{lab}}} {v!r}" for lab, v in zip(self._labels, total, strict=True)]
            lines += [f"ratepilot_backend_request_seconds_sum{{{lab}}} {v!r}" for lab, v in zip(self._labels, self._latency_sum.tolist(), strict=True)]
            lines.append("# TYPE ratepilot_backend_requests_total counter")
            ok = (self._requests - self._errors).tolist()
            lines += [f'ratepilot_backend_requests_total{{{lab},outcome="ok"}} {v!r}' for lab, v in zip(self._labels, ok, strict=True)]
            lines += [f'ratepilot_backend_requests_total{{{lab},outcome="error"}} {v!r}' for lab, v in zip(self._labels, self._errors.tolist(), strict=True)]
            lines.append("# TYPE ratepilot_decision_tokens_total counter")
            lines += [f'ratepilot_decision_tokens_total{{{lab},outcome="allowed"}} {v!r}' for lab, v in zip(self._labels, self._admitted.tolist(), strict=True)]
            lines += [f'ratepilot_decision_tokens_total{{{lab},outcome="throttled"}} {v!r}' for lab, v in zip(self._labels, self._throttled.tolist(), strict=True)]
            lines.append("# TYPE ratepilot_backend_cpu_utilization gauge")
            lines.append(f"ratepilot_backend_cpu_utilization {self.cpu!r}")
            return "\n".join(lines) + "\n"

    def start(self) -> SyntheticExporter:
        """Serve /metrics on a daemon thread."""
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                body = exporter.render().encode()
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
    """`python -m controller.exporter --tiers N --port P`: serve N synthetic tiers (t00000, ...) until killed."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m controller.exporter", description=main.__doc__)
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
