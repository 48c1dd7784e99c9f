"""`ratepilot edge`: the command line, a real process, forwarding to a backend URL, the middleware's ASGI contract."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.cluster
from prometheus_client import CollectorRegistry

from limiter.config import load_config
from limiter.edge import main
from limiter.guard import Guard
from limiter.local_bucket import LocalBucket
from limiter.metrics import LimiterMetrics
from limiter.middleware import RateLimitMiddleware
from limiter.rate_table import RATES_KEY, RateEntry
from ratepilot.servers import RedisServer, free_port, port_open
from tests.limiter.support import BASE_CONFIG, RunningEdge, wait_until, write_config


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--backend-url" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "/nonexistent/limiter.yaml"],
        ["--backend-url", "ftp://example.org"],
        ["--port", "0"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ratepilot edge:") and "\n" not in err


def test_invalid_config_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("default_tier: x\ntiers: {}\n")
    assert main(["--config", str(bad)]) == 2
    assert "at least one tier" in capsys.readouterr().err


def test_edge_process_serves_limits_and_stops(
    tmp_path: Path, redis_server_session: RedisServer, redis_client: redis.Redis
) -> None:
    """(`redis_client` flushes the session Redis: the free tier's shared bucket of 8 may be spent by earlier tests.)"""
    config = write_config(tmp_path / "limiter.yaml", redis_server_session.url)
    port = free_port()
    env = {**os.environ, "RATEPILOT_CONFIG": str(config)}
    process = subprocess.Popen(
        [sys.executable, "-m", "ratepilot.cli", "edge", "--port", str(port), "--capacity-rps", "1000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            assert process.poll() is None and time.monotonic() < deadline, "the edge did not start"
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            assert client.get("/health").json() == {"status": "ok"}
            statuses = [client.get("/v1/items", headers={"x-api-key": "free_cli"}).status_code for _ in range(6)]
            assert statuses == [200] * 5 + [429]
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=20)[0].decode()
    assert "Application shutdown complete" in output  # uvicorn then re-raises SIGTERM, so the code is -15
    throttle_lines = [line for line in output.splitlines() if '"event":"throttled"' in line]
    assert len(throttle_lines) == 1 and '"tier":"free"' in throttle_lines[0]


def test_forwarding_to_a_backend_url(edge_factory: Callable[..., RunningEdge], redis_server_session: RedisServer) -> None:
    upstream = edge_factory(redis_server_session.url, limited=False)  # an echo app stands in for the backend
    edge = edge_factory(redis_server_session.url, backend=upstream.url)
    response = edge.get("/v1/items?x=1", key="pro_fw")
    assert response.status_code == 200 and response.json() == {"ok": True}
    assert "ratelimit" in response.headers
    assert edge.get("/nothing-here", key="pro_fw").status_code == 404  # the upstream's own answer
    text = edge.get("/metrics").text
    assert 'ratepilot_backend_requests_total{outcome="ok",tier="pro"} 2.0' in text
    upstream.stop()
    assert edge.get("/v1/items", key="pro_fw").status_code == 502
    assert 'ratepilot_backend_requests_total{outcome="error",tier="pro"} 1.0' in edge.get("/metrics").text


def test_middleware_passes_non_http_scopes_and_validates_arguments(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.yaml", "redis://127.0.0.1:1/0"), environ={})
    guard = Guard(config, None, LocalBucket(), LimiterMetrics(CollectorRegistry()))
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = RateLimitMiddleware(app, guard)
    for kind in ("websocket", "lifespan"):
        asyncio.run(middleware({"type": kind, "path": "/v1/items", "headers": []}, None, None))
    assert seen == ["websocket", "lifespan"]
    with pytest.raises(TypeError):
        RateLimitMiddleware(app, object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RateLimitMiddleware(None, guard)


def test_decide_takes_any_client_string_and_keys_it_stably(tmp_path: Path) -> None:
    """A client id no HTTP header could carry (not latin-1) is decided, not an error, and keeps one bucket."""
    config = load_config(write_config(tmp_path / "c.yaml", "redis://127.0.0.1:1/0"), environ={})
    guard = Guard(config, None, LocalBucket(), LimiterMetrics(CollectorRegistry()))  # no Redis: the local guard

    async def twice() -> list[Any]:
        return [await guard.decide("клиент", "GET", "/v1/items") for _ in range(2)]

    first, second = asyncio.run(twice())
    assert first.source == second.source == "local"
    assert first.client == second.client
    assert second.decisions[0].remaining < first.decisions[0].remaining  # the same client bucket paid twice


@pytest.mark.cluster
def test_edge_on_a_redis_cluster(edge_factory: Callable[..., RunningEdge], tmp_path: Path) -> None:
    from tests.limiter.conftest import RedisCluster

    cluster = RedisCluster(tmp_path / "cluster")
    try:
        cluster.start()
        text = BASE_CONFIG.replace("timeout_ms: 1000", "timeout_ms: 1000\n  cluster: true")
        edge = edge_factory(cluster.url, text)
        statuses = [edge.get("/v1/items", key=f"free_{i % 2}").status_code for i in range(9)]
        assert statuses == [200] * 8 + [429]  # two clients of 5 each, but the free tier holds 8
        assert edge.get("/rating", key="pro_c").json()["source"] == "redis"
        seed = redis.Redis.from_url(cluster.url)
        seconds, _ = seed.time()
        entry = RateEntry(40.0, 300.0, 1, "controller", seconds, seconds + 60)
        redis.cluster.RedisCluster.from_url(cluster.url).hset(RATES_KEY, "pro", entry.to_json())
        assert wait_until(lambda: edge.edge.guard.tiers["pro"].rates.source == "controller", 10.0)
        assert edge.get("/rating", key="pro_d").json()["buckets"]["tier"]["refill_rate"] == 40.0
    finally:
        cluster.stop()
