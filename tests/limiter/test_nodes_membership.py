"""Membership against a real redis-server: heartbeats count live nodes on the server clock, expired ones drop
out, a leaving node withdraws at once, a Redis outage keeps the last count and counts the failures."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis
import redis.asyncio
from prometheus_client import CollectorRegistry

from limiter.config import NodesConfig
from limiter.membership import Membership, share_of
from limiter.metrics import LimiterMetrics
from ratepilot.servers import RedisServer


def test_share_of_live_nodes() -> None:
    assert [share_of(n) for n in (0, 1, 2, 3, 6)] == [1.0, 1.0, 0.5, 1 / 3, 1 / 6]


def test_nodes_config_refuses_an_expiry_shorter_than_heartbeats() -> None:
    with pytest.raises(ValueError, match="at least 1.5 x heartbeat_s"):
        NodesConfig(heartbeat_s=1.0, expiry_s=1.2)
    assert NodesConfig(heartbeat_s=1.0, expiry_s=1.5).expiry_s == 1.5


def _member(url: str, key: str, settings: NodesConfig, counts: list[int], node_id: str) -> tuple[Membership, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = LimiterMetrics(registry)
    client = redis.asyncio.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    member = Membership(lambda: settings, counts.append, metrics, registry, node_id=node_id, key=key)
    member.connect(client)
    return member, registry


def test_heartbeats_count_expire_and_leave(redis_server: RedisServer) -> None:
    key = f"test:nodes:{uuid.uuid4().hex[:8]}"
    settings = NodesConfig(heartbeat_s=0.1, expiry_s=0.3)
    counts: dict[str, list[int]] = {name: [] for name in "abc"}

    async def scenario() -> None:
        members = {name: _member(redis_server.url, key, settings, counts[name], name)[0] for name in "abc"}
        assert await members["a"].beat() == 1
        assert await members["b"].beat() == 2
        assert await members["c"].beat() == 3
        assert await members["a"].beat() == 3
        assert counts["a"] == [3]  # 1 is where it started: no callback for it
        # c leaves: the very next heartbeat of another node sees two
        await members["c"].leave()
        assert await members["a"].beat() == 2
        # b stops beating (as if SIGKILLed): it counts until its entry expires on the server clock
        admin = redis.Redis.from_url(redis_server.url)
        expires_us = int(admin.zscore(key, "b") or 0)
        seconds, micros = admin.time()
        assert 0 < expires_us - (int(seconds) * 1_000_000 + int(micros)) <= 300_000
        deadline = time.monotonic() + 5
        while await members["a"].beat() != 1:
            assert time.monotonic() < deadline, "b's heartbeat never expired"
            await asyncio.sleep(0.02)
        assert counts["a"] == [3, 2, 1]
        assert admin.pttl(key) > 0  # the set expires if every node dies
        admin.close()

    asyncio.run(scenario())


def test_redis_outage_keeps_the_last_count_and_counts_errors(redis_server: RedisServer) -> None:
    key = f"test:nodes:{uuid.uuid4().hex[:8]}"
    settings = NodesConfig(heartbeat_s=0.1, expiry_s=0.3)
    counts: list[int] = []

    async def scenario() -> None:
        other, _ = _member(redis_server.url, key, settings, [], "other")
        member, registry = _member(redis_server.url, key, settings, counts, "me")
        await other.beat()
        assert await member.beat() == 2
        redis_server.stop()
        for _ in range(3):
            assert await member.beat() == 2
        assert registry.get_sample_value("ratepilot_redis_errors_total", {"kind": "heartbeat"}) == 3
        assert registry.get_sample_value("ratepilot_live_nodes") == 2
        assert counts == [2]

    asyncio.run(scenario())


def test_run_loops_until_stopped_and_leave_withdraws(redis_server: RedisServer) -> None:
    key = f"test:nodes:{uuid.uuid4().hex[:8]}"
    settings = NodesConfig(heartbeat_s=0.05, expiry_s=1.0)

    async def scenario() -> None:
        member, _ = _member(redis_server.url, key, settings, [], "looping")
        task = asyncio.create_task(member.run())
        deadline = time.monotonic() + 10
        while member.beats < 3:
            assert time.monotonic() < deadline, "run() did not heartbeat"
            await asyncio.sleep(0.01)
        member.stop()
        await asyncio.wait_for(task, 5)
        await member.leave()

    asyncio.run(scenario())
    assert redis.Redis.from_url(redis_server.url).zcard(key) == 0
