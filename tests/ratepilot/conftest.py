"""Fixtures of the ratepilot tests: a real edge process (limiter + echo backend) on the session Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from ratepilot.demo.stack import ratepilot_argv
from ratepilot.demo.supervisor import HttpPart, Supervisor
from ratepilot.servers import RedisServer, free_port
from tests.ratepilot.support import edge_config


@pytest.fixture
def limited_edge(redis_client: redis.Redis, redis_server_session: RedisServer, tmp_path: Path) -> Iterator[str]:
    """`ratepilot edge --backend echo` in its own process, its `load_` tier held to EDGE_LIMIT_RPS; its URL."""
    config = tmp_path / "limiter.yaml"
    config.write_text(yaml.safe_dump(edge_config(redis_server_session.url), sort_keys=False))
    port = free_port()
    argv = ratepilot_argv("edge", "--config", str(config), "--port", str(port), "--backend", "echo", "--log-level", "warning")
    with Supervisor(ready_timeout_s=30) as supervisor:
        edge = HttpPart("edge", argv, port, tmp_path)
        supervisor.start(edge)
        yield edge.url
