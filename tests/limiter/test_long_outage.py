"""A long Redis outage under load: redis-server SIGKILLed for OUTAGE_S, then restarted on the same port.

The request path probes Redis at the back-off cap (not faster, not slower), the local guard serves
meanwhile, `ratepilot_redis_errors_total` keeps rising, and the first Redis-backed decision comes
within one probe interval of the restart.

OUTAGE_S is 14 s, not the 30 s of the issue: the back-off reaches its 2 s cap about 3.2 s into an
outage (0.05 s doubling), so 14 s is seven times the cap and holds four or five probe intervals at the
cap (at least three are asserted, timed one by one); 30 s would add 16 s to the suite and test nothing
more.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx

from limiter.redis_bucket import RedisBucket
from ratepilot.servers import RedisServer
from tests.limiter.support import CONFIG_HEAD, RunningEdge, metric_sum

EdgeFactory = Callable[..., RunningEdge]

OUTAGE_S = 14.0
INITIAL_S, CAP_S, JITTER = 0.05, 2.0, 0.1  # limiter.backoff.Backoff defaults
RAMP_S = INITIAL_S * (2**6 - 1)  # 3.15 s: windows 0.05 .. 1.6 s, then the cap
SLACK_S = 0.5  # a loaded machine: the probe leaves with the first request after the window
BULK_CONFIG = CONFIG_HEAD + """default_tier: bulk
tiers:
  bulk:
    client:    {rate: 100000, burst: 100000}
    aggregate: {rate: 1000000, burst: 1000000}
"""


def test_long_outage_probes_at_the_cap_and_redis_decides_within_one_probe_interval_of_the_restart(
    edge_factory: EdgeFactory, redis_server: RedisServer
) -> None:
    edge = edge_factory(redis_server.url, BULK_CONFIG)
    bucket = edge.edge.guard.redis_bucket
    assert isinstance(bucket, RedisBucket)
    process = redis_server.process
    assert process is not None
    answers: list[tuple[float, float, int, str | None]] = []  # (sent, received, status, source)
    failures: list[BaseException] = []
    probes: list[float] = []  # when RedisBucket.round_trips moved while Redis was down (each a connection attempt)
    marks: dict[str, Any] = {}

    async def load(key: str, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=edge.url, timeout=5.0, headers={"x-api-key": key}) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    response = await client.get("/rating")
                except httpx.HTTPError as exc:
                    failures.append(exc)
                    continue
                source = response.json().get("source") if response.status_code == 200 else None
                answers.append((sent, time.monotonic(), response.status_code, source))
                await asyncio.sleep(0.01)

    async def watch_probes(stop: asyncio.Event) -> None:
        seen = bucket.round_trips
        while not stop.is_set():
            now, trips = time.monotonic(), bucket.round_trips
            probes.extend([now] * (trips - seen))
            seen = trips
            await asyncio.sleep(0.005)

    async def errors(client: httpx.AsyncClient) -> float:
        return metric_sum((await client.get("/metrics")).text, "ratepilot_redis_errors_total")

    async def scenario() -> None:
        stop, watching = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(load(f"bulk_{i}", stop)) for i in range(4)]
        async with httpx.AsyncClient(base_url=edge.url, timeout=5.0) as scraper:
            await asyncio.sleep(0.5)
            marks["errors"] = [await errors(scraper)]
            process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(process.wait, 10)
            marks["killed"] = time.monotonic()
            watcher = asyncio.create_task(watch_probes(watching))
            for _ in range(3):  # the counter keeps rising through the outage, not only at its start
                await asyncio.sleep(OUTAGE_S / 3)
                marks["errors"].append(await errors(scraper))
            watching.set()
            await watcher
            marks["restarting"] = time.monotonic()
            await asyncio.to_thread(redis_server.start)  # same port, empty: the script is loaded again
            marks["restarted"] = time.monotonic()
            deadline = marks["restarted"] + CAP_S * (1 + JITTER) + 5.0
            while time.monotonic() < deadline and not any(
                s == "redis" and sent > marks["restarted"] for sent, _, _, s in answers
            ):
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)  # then watch that it stays on Redis
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(scenario())
    killed, restarting, restarted = marks["killed"], marks["restarting"], marks["restarted"]
    assert not failures, failures[:3]
    assert {status for _, _, status, _ in answers} == {200}  # served all along, never a 5xx
    outage = [source for sent, _, _, source in answers if killed < sent < restarting]
    assert len(outage) >= 100 and set(outage) == {"local"}

    # probes: never faster than the back-off allows; once at the cap, one per cap interval, no slower
    assert probes, "no probe at all during the outage"
    gaps = [later - earlier for earlier, later in zip(probes, probes[1:], strict=False)]
    assert all(gap >= INITIAL_S * (1 - JITTER) - 0.01 for gap in gaps), gaps
    at_cap = [gap for earlier, gap in zip(probes, gaps, strict=False) if earlier > killed + RAMP_S * (1 + JITTER) + SLACK_S]
    assert len(at_cap) >= 3, (probes, killed)
    assert all(CAP_S * (1 - JITTER) - 0.01 <= gap <= CAP_S * (1 + JITTER) + SLACK_S for gap in at_cap), at_cap
    longest_possible = 7 + int((OUTAGE_S - RAMP_S) / (CAP_S * (1 - JITTER))) + 1
    assert len(probes) <= longest_possible, (len(probes), longest_possible)

    # the error counter rose during the outage, again and again (one error per failed-over check)
    before, *during = marks["errors"]
    assert before < during[0] < during[1] < during[2]

    # back: the first probe after the restart connects, and Redis decides within one probe interval
    first_redis = min(received for sent, received, _, source in answers if sent > restarted and source == "redis")
    assert first_redis - restarted <= CAP_S * (1 + JITTER) + SLACK_S, first_redis - restarted
    settled = [source for sent, _, _, source in answers if sent > first_redis + 0.1]
    assert len(settled) >= 20 and set(settled) == {"redis"}
