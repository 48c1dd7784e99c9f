"""The fixtures start real servers on free ports and can fault them."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
import redis

from ratepilot.servers import PrometheusServer, RedisServer


def test_redis_fixture_is_real_and_not_6379(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    assert redis_server.port != 6379
    assert client.ping()
    client.set("k", "v")
    assert client.get("k") == b"v"


def test_redis_restart_loses_data_and_comes_back(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.set("k", "v")
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    redis_server.start()
    assert client.get("k") is None


def test_redis_pause_makes_calls_time_out(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=0.2)
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - started < 1.0
    finally:
        redis_server.resume()
    client2 = redis.Redis.from_url(redis_server.url)
    assert client2.ping()


def test_prometheus_fixture_scrapes_itself(prometheus_factory) -> None:
    probe = prometheus_factory([])
    server = prometheus_factory([f"127.0.0.1:{probe.port}"])
    deadline = time.monotonic() + 15
    body = ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{server.url}/api/v1/query?query=up", timeout=2) as response:
            body = response.read().decode()
        if '"value"' in body:
            break
        time.sleep(0.5)
    assert '"value"' in body and '"1"' in body


def test_servers_start_in_relative_workdirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative workdir (the demo's default output folder) works although each server runs inside it."""
    monkeypatch.chdir(tmp_path)
    redis_server = RedisServer(workdir=Path("out/redis"))
    prometheus = PrometheusServer([], workdir=Path("out/prometheus"))
    try:
        redis_server.start()
        prometheus.start()
        assert redis.Redis.from_url(redis_server.url).ping()
        assert redis_server.log_path == tmp_path / "out" / "redis" / "redis.log"
        assert (tmp_path / "out" / "prometheus" / "data").is_dir()
    finally:
        redis_server.stop()
        prometheus.stop()
