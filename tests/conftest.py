"""Shared fixtures: a throwaway redis-server and Prometheus on free ports (never port 6379)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ratepilot.servers import PrometheusServer, RedisServer


@pytest.fixture(scope="session")
def redis_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session (tests that only read and write keys)."""
    server = RedisServer(workdir=tmp_path_factory.mktemp("redis-session"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may stop, restart or pause."""
    server = RedisServer(workdir=tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server_session: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session redis-server, flushed before the test."""
    client = redis.Redis.from_url(redis_server_session.url)
    client.flushall()
    client.script_flush()
    yield client
    client.close()


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[object]:
    """Call with a list of scrape targets to get a started PrometheusServer (stopped after the test)."""
    started: list[PrometheusServer] = []

    def make(targets: list[str], scrape_interval_s: float = 1.0, rule_files: list[Path] | None = None) -> PrometheusServer:
        server = PrometheusServer(
            targets, workdir=tmp_path / f"prom{len(started)}", scrape_interval_s=scrape_interval_s, rule_files=rule_files
        )
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
