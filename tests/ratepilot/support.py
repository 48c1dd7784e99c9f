"""Helpers of the ratepilot tests: an ASGI app served in a thread, the test edge's limiter config, a short scenario."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
import yaml

from ratepilot.servers import free_port, port_open

EDGE_LIMIT_RPS = 40.0  # the load_ tier's aggregate rate (and burst) at the test edge
UNDER_RPS = 15.0  # the first phase: well under the limit, nothing may be throttled
OVER_RPS = 160.0  # the second phase: 4x the limit
PHASE_S = 2


def edge_config(redis_url: str) -> dict[str, object]:
    """limiter.yaml of the test edge: one tier whose aggregate bucket is EDGE_LIMIT_RPS; client buckets never bind."""
    return {
        "redis": {"url": redis_url, "timeout_ms": 1000},  # a busy machine must not fall back to the local guard
        "client_header": "x-api-key",
        "anonymous_tier": "load",
        "default_tier": "load",
        "tiers": {
            "load": {
                "client": {"rate": 10_000, "burst": 10_000},
                "aggregate": {"rate": EDGE_LIMIT_RPS, "burst": EDGE_LIMIT_RPS},
                "failure_policy": "fail_closed",
                "key_prefixes": ["load_", "heavy_"],
            }
        },
        "costs": {"default": 1, "payload": {"max_extra": 0}},
        "rate_table": {"poll_s": 1},
        "exempt_paths": ["/health", "/metrics"],
    }


def over_limit_scenario(path: Path) -> Path:
    """A 4 s scenario: PHASE_S under the edge's limit, then PHASE_S at 4x it, with a client and request mix."""
    scenario = {
        "name": "over_limit",
        "description": "under the limit, then four times over it",
        "nominal_rps": EDGE_LIMIT_RPS,
        "clients": [{"prefix": "load_", "count": 20, "share": 3}, {"prefix": "heavy_", "count": 2, "share": 1}],
        "requests": [{"method": "GET", "path": "/v1/items", "share": 0.8},
                     {"method": "POST", "path": "/v1/infer", "share": 0.2, "body_bytes": 512}],  # fmt: skip
        "phases": [
            {"name": "under", "duration_s": PHASE_S, "rate_rps": UNDER_RPS},
            {"name": "over", "duration_s": PHASE_S, "rate_rps": OVER_RPS},
        ],
    }
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    return path


@contextmanager
def served(app: Any) -> Iterator[str]:
    """`app` served by uvicorn in a thread on a free port; its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not port_open(port):
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
