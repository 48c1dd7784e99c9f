"""Redis dead, hung, SIGKILLed under load and back: fail_open keeps a local guard, fail_closed refuses, the edge
recovers by itself; an edge process under `faketime` 30 s ahead decides on the Redis server clock."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from limiter.redis_bucket import RedisBucket
from ratepilot.servers import RedisServer, find_binary, free_port, port_open
from tests.limiter.support import (
    BASE_CONFIG,
    CONFIG_HEAD,
    RATELIMIT,
    RunningEdge,
    metric_sum,
    wait_until,
    write_config,
)

EdgeFactory = Callable[..., RunningEdge]
REPO = Path(__file__).resolve().parents[2]

# One slow client bucket: 0.1 token/s, burst 3. A clock 30 s ahead would see it full again (3 tokens).
FAKETIME_CONFIG = CONFIG_HEAD + """default_tier: slow
tiers:
  slow:
    client:    {rate: 0.1, burst: 3}
    aggregate: {rate: 1000, burst: 10000}
"""

# bulk clients are never limited; the free tier's hammer is (burst 5, no refill within the test)
KILL_CONFIG = CONFIG_HEAD + """default_tier: bulk
tiers:
  bulk:
    client:    {rate: 100000, burst: 100000}
    aggregate: {rate: 1000000, burst: 1000000}
  free:
    client:    {rate: 0.001, burst: 5}
    aggregate: {rate: 0.001, burst: 1000}
    key_prefixes: [free_]
rate_table:
  poll_s: 0.2
"""


def _count(edge: RunningEdge, outcome: str, source: str, tier: str) -> float:
    text = edge.get("/metrics").text
    found = re.search(rf'^ratepilot_decisions_total\{{outcome="{outcome}",source="{source}",tier="{tier}"\}} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


def redis_errors(edge: RunningEdge) -> float:
    """`ratepilot_redis_errors_total` over all kinds."""
    return metric_sum(edge.get("/metrics").text, "ratepilot_redis_errors_total")


def test_fail_open_with_dead_redis_still_limits(edge_factory: EdgeFactory, redis_server: RedisServer) -> None:
    edge = edge_factory(redis_server.url)
    assert edge.get("/v1/items", key="pro_warm").status_code == 200  # connected and working
    errors_before = redis_errors(edge)
    redis_server.stop()
    statuses = [edge.get("/v1/items", key="free_a").status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]  # the local guard enforces the same client burst: not unlimited
    assert _count(edge, "allowed", "local", "free") == 5
    assert _count(edge, "throttled", "local", "free") == 1
    # every one of the six checks failed over, so each counted one Redis error (the rate reader may add more)
    assert errors_before == 0 and redis_errors(edge) >= errors_before + 6


def test_fail_closed_refuses_when_redis_is_dead(edge_factory: EdgeFactory, redis_server: RedisServer) -> None:
    edge = edge_factory(redis_server.url)
    assert edge.get("/v1/items", key="closed_a").status_code == 200
    redis_server.stop()
    response = edge.get("/v1/items", key="closed_a")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["limited_by"] == "redis_unavailable"
    assert _count(edge, "throttled", "fail_closed", "closed") >= 1


def test_hung_redis_requests_are_still_answered(edge_factory: EdgeFactory, redis_server: RedisServer) -> None:
    edge = edge_factory(redis_server.url, BASE_CONFIG.replace("timeout_ms: 1000", "timeout_ms: 100"))
    assert edge.get("/v1/items", key="pro_a").status_code == 200
    redis_server.pause()
    try:
        # the client's 1 s timeout is the bound: a decision that waited on the hung Redis would blow it
        with httpx.Client(base_url=edge.url, timeout=1.0) as client:
            statuses = [client.get("/v1/items", headers={"x-api-key": "pro_a"}).status_code for _ in range(10)]
            closed = client.get("/v1/items", headers={"x-api-key": "closed_a"})
    finally:
        redis_server.resume()
    assert statuses == [200] * 10  # pro: fail_open, burst 12 in the local guard
    assert closed.status_code == 429 and closed.json()["limited_by"] == "redis_unavailable"


def test_recovers_after_redis_restart(edge_factory: EdgeFactory, redis_server: RedisServer) -> None:
    edge = edge_factory(redis_server.url)
    assert edge.get("/rating", key="pro_a").json()["source"] == "redis"
    redis_server.stop()
    assert edge.get("/rating", key="pro_a").json()["source"] == "local"
    redis_server.start()  # same port, empty: the script must be loaded again
    assert wait_until(lambda: edge.get("/rating", key="pro_b").json()["source"] == "redis", 10.0, every_s=0.2)
    assert edge.get("/v1/items", key="closed_a").status_code == 200  # fail_closed tiers serve again


@pytest.mark.parametrize("tier_key", ["free_a", "closed_a"])
def test_redis_down_at_start_up_never_crashes(edge_factory: EdgeFactory, redis_server: RedisServer, tier_key: str) -> None:
    url = redis_server.url
    redis_server.stop()
    edge = edge_factory(url)
    response = edge.get("/v1/items", key=tier_key)
    assert response.status_code == (200 if tier_key == "free_a" else 429)
    assert edge.get("/health").status_code == 200


@contextmanager
def edge_processes(config: Path, faked: list[bool]) -> Iterator[list[str]]:
    """`ratepilot edge` processes on one config, each under `faketime -f +30s` when faked; yields their URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RATEPILOT_")} | {"RATEPILOT_CONFIG": str(config)}
    ports = [free_port() for _ in faked]
    processes = []
    try:
        for port, fake in zip(ports, faked, strict=True):
            argv = [sys.executable, "-m", "ratepilot.cli", "edge", "--port", str(port), "--backend", "echo"]
            if fake:
                argv = [find_binary("faketime"), "-f", "+30s", *argv]
            # own session: faketime forks the edge as its child, so the whole group gets the SIGTERM
            processes.append(
                subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            )
        deadline = time.monotonic() + 30
        for port, process in zip(ports, processes, strict=True):
            while not port_open(port):
                assert process.poll() is None and time.monotonic() < deadline, "an edge did not start"
                time.sleep(0.05)
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for process in processes:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


def _ratelimit(response: httpx.Response) -> tuple[int, int]:
    """(tokens left, seconds until full) of the client bucket in the RateLimit field."""
    found = RATELIMIT.match(response.headers["ratelimit"])
    assert found is not None, response.headers
    return int(found[1]), int(found[2])


def test_edge_under_faketime_30s_ahead_admits_as_the_others(tmp_path: Path, redis_server: RedisServer) -> None:
    """Two edge processes, one under `faketime -f +30s`, share each client's bucket on the Redis server clock.

    Had the limiter used the edge's clock, the faked edge would see 30 s pass since the normal edge
    drained a client (0.1 token/s: the whole burst of 3 back) and admit it again, and its RateLimit
    field would say the bucket is full (r=3, t=0) instead of empty.
    """
    config = write_config(tmp_path / "limiter.yaml", redis_server.url, FAKETIME_CONFIG)
    with edge_processes(config, [False, True]) as (normal_url, faked_url), httpx.Client(
        base_url=normal_url, timeout=5
    ) as normal, httpx.Client(base_url=faked_url, timeout=5) as faked:

        def statuses(client: httpx.Client, key: str, count: int) -> list[int]:
            return [client.get("/v1/items", headers={"x-api-key": key}).status_code for _ in range(count)]

        # faketime is in effect in that process: its HTTP Date header runs 30 s ahead of the other's and of Redis
        with redis.Redis.from_url(redis_server.url) as admin:
            server_s = admin.time()[0]
        dates = [parsedate_to_datetime(c.get("/health").headers["date"]).timestamp() for c in (normal, faked)]
        assert abs(dates[0] - server_s) < 5
        assert 25 < dates[1] - dates[0] < 35
        assert faked.get("/rating", headers={"x-api-key": "probe"}).json()["source"] == "redis"  # not its local guard

        assert statuses(normal, "drained_normal", 5) == [200] * 3 + [429] * 2
        assert statuses(faked, "drained_normal", 3) == [429] * 3  # 30 s "later" on its clock: still empty
        assert statuses(faked, "drained_faked", 5) == [200] * 3 + [429] * 2
        assert statuses(normal, "drained_faked", 3) == [429] * 3
        alternating = [(normal, faked)[i % 2].get("/v1/items", headers={"x-api-key": "both"}).status_code for i in range(8)]
        assert alternating.count(200) == 3 and alternating[:3] == [200] * 3  # one bucket of burst 3 for both

        for key in ("drained_normal", "drained_faked"):
            answers = [c.get("/v1/items", headers={"x-api-key": key}) for c in (normal, faked)]
            assert [a.status_code for a in answers] == [429, 429]
            assert all(a.json()["limited_by"] == "client" for a in answers)
            retry = [int(a.headers["retry-after"]) for a in answers]
            assert abs(retry[0] - retry[1]) <= 1 and all(1 <= r <= 10 for r in retry)  # next token at 0.1/s: <= 10 s
            (left_n, full_n), (left_f, full_f) = map(_ratelimit, answers)
            assert left_n == left_f == 0
            assert abs(full_n - full_f) <= 1 and 20 <= full_n <= 30  # refilling 3 tokens takes 30 s from empty
            assert answers[0].headers["ratelimit-policy"] == answers[1].headers["ratelimit-policy"]


def test_redis_sigkilled_mid_load_fails_open_with_few_probes_and_recovers(
    edge_factory: EdgeFactory, redis_server: RedisServer
) -> None:
    """Redis SIGKILLed under concurrent load, then restarted: no 5xx or client error, the local guard limits, few probes, Redis decides again."""
    edge = edge_factory(redis_server.url, KILL_CONFIG)
    bucket = edge.edge.guard.redis_bucket
    assert isinstance(bucket, RedisBucket)
    process = redis_server.process
    assert process is not None
    # (worker, sent, received, status, decision source of a bulk 200) per response; exceptions aside
    seen: list[tuple[str, float, float, int, str | None]] = []
    errors: list[BaseException] = []
    marks: dict[str, Any] = {}

    async def worker(name: str, path: str, key: str, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=edge.url, timeout=3.0, headers={"x-api-key": key}) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    response = await client.get(path)
                except httpx.HTTPError as exc:
                    errors.append(exc)
                    continue
                source = response.json().get("source") if path == "/rating" and response.status_code == 200 else None
                seen.append((name, sent, time.monotonic(), response.status_code, source))
                await asyncio.sleep(0.002 if name == "hammer" else 0)

    def redis_sources_after(t: float) -> int:
        return sum(1 for w, sent, _, _, source in seen if w != "hammer" and sent > t and source == "redis")

    async def scenario() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(worker(f"bulk{i}", "/rating", f"bulk_{i}", stop)) for i in range(4)]
        tasks.append(asyncio.create_task(worker("hammer", "/v1/items", "free_hammer", stop)))
        await asyncio.sleep(0.8)
        marks["killed"] = time.monotonic()
        marks["trips_at_kill"] = bucket.round_trips
        process.send_signal(signal.SIGKILL)  # no shutdown: connections die mid-request
        await asyncio.sleep(1.5)
        marks["trips_before_restart"] = bucket.round_trips
        marks["local_free"] = (_count(edge, "allowed", "local", "free"), _count(edge, "throttled", "local", "free"))
        await asyncio.to_thread(process.wait, 5)
        marks["restarting"] = time.monotonic()
        await asyncio.to_thread(redis_server.start)  # same port, empty
        marks["restarted"] = time.monotonic()
        deadline = marks["restarted"] + 6.0
        while time.monotonic() < deadline and not redis_sources_after(marks["restarted"]):
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # then watch that it stays on Redis
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    killed, restarting, restarted = marks["killed"], marks["restarting"], marks["restarted"]
    assert not errors, errors[:3]  # no connection error or timeout at any time
    assert {status for *_, status, _ in seen} <= {200, 429}  # no 5xx, ever
    bulk = [row for row in seen if row[0] != "hammer"]
    assert all(status == 200 for *_, status, _ in bulk)

    outage = [source for _, sent, _, _, source in bulk if killed < sent < restarting]
    assert len(outage) >= 20 and set(outage) == {"local"}  # fail_open: served on the local guard
    allowed_local, throttled_local = marks["local_free"]
    assert 1 <= allowed_local <= 5 and throttled_local >= 1  # the hammer's burst of 5 still held: not unlimited

    # Redis saw probes, not a storm: RedisBucket.round_trips counts every pipeline sent and every
    # connection attempt of the request path, and the back-off (0.05 s doubling) allows a handful in 1.5 s
    outage_requests = sum(1 for _, sent, *_ in seen if killed < sent < restarting)
    probes = marks["trips_before_restart"] - marks["trips_at_kill"]
    assert outage_requests >= 50 and 1 <= probes <= 15, (outage_requests, probes)

    after = [(received, source) for _, sent, received, _, source in bulk if sent > restarted]
    first_redis = min((received for received, source in after if source == "redis"), default=None)
    assert first_redis is not None and first_redis - restarted < 4.0  # within the back-off's 2 s cap (+ slack)
    settled = [source for received, source in after if received > first_redis + 0.2]
    assert len(settled) >= 20 and settled.count("redis") >= 0.9 * len(settled)  # stays on Redis
