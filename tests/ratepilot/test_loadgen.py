"""The open-loop load generator against a tiny real HTTP server (uvicorn on a free port)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from ratepilot.demo.loadgen import TRANSPORT_ERROR, LoadGenerator, Request, RequestPlan
from ratepilot.demo.schedule import arrival_times
from ratepilot.demo.summary import outcome_masks, per_second, summarize
from ratepilot.servers import free_port
from tests.ratepilot.support import served


class TinyServer:
    """ASGI app: /ok answers 200, /mixed 429 for every third request, /slow holds one request at a time."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # (path, api key)
        self.bodies: list[tuple[str, str, str, int]] = []  # (method, path, api key, body bytes)
        self.lock: asyncio.Lock | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        key = dict(scope["headers"]).get(b"x-api-key", b"").decode()
        self.seen.append((path, key))
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        self.bodies.append((scope["method"], path, key, size))
        status = 200
        if path == "/mixed" and len(self.seen) % 3 == 0:
            status = 429
        elif path == "/slow":
            self.lock = self.lock or asyncio.Lock()
            async with self.lock:  # one at a time: a server that cannot keep up
                await asyncio.sleep(0.1)
        elif path == "/broken":
            status = 503
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})


@pytest.fixture
def tiny_server() -> Iterator[tuple[TinyServer, str]]:
    """TinyServer served by uvicorn in a thread on a free port."""
    app = TinyServer()
    with served(app) as url:
        yield app, url


def test_arrivals_follow_the_demand_and_repeat_with_the_seed() -> None:
    demand = np.array([0.0, 200.0, 0.0, 50.0])
    a = arrival_times(demand, seed=3)
    assert np.array_equal(a, arrival_times(demand, seed=3))
    assert not np.array_equal(a, arrival_times(demand, seed=4))
    assert np.all(np.diff(a) >= 0)
    per_second_counts = np.bincount(a.astype(int), minlength=4)
    assert per_second_counts[0] == 0 and per_second_counts[2] == 0
    assert 140 < per_second_counts[1] < 260 and 25 < per_second_counts[3] < 80  # Poisson, > 4 sigma apart


def test_every_scheduled_request_is_sent_once_and_recorded(tiny_server: tuple[TinyServer, str]) -> None:
    app, url = tiny_server
    offsets = np.linspace(0.0, 0.5, 60)
    generator = LoadGenerator(url, path="/mixed", clients=7)
    seconds: list[int] = []
    record = asyncio.run(generator.run(offsets, on_second=lambda s, _r: seconds.append(s)))
    ok, throttled, error = outcome_masks(record.status)
    assert len(app.seen) == 60
    assert ok.sum() == 40 and throttled.sum() == 20 and error.sum() == 0
    assert {key for _, key in app.seen} == {f"demo_{i:04d}" for i in range(7)}
    assert np.all(record.latency_s > 0) and np.all(record.lag_s >= 0)
    assert seconds, "the per-second callback never ran"
    summary = summarize(record, duration_s=1.0, slo_ms=10_000, error_budget=0.01)
    assert summary.requests == 60
    assert summary.throttle_frac == pytest.approx(20 / 60)
    assert summary.goodput_rps == pytest.approx(40.0)
    assert summary.error_frac == 0.0 and summary.slo_violation_frac == 0.0


def test_latency_counts_from_the_schedule_not_from_the_send(tiny_server: tuple[TinyServer, str]) -> None:
    """A server serving one request per 0.1 s while 10 arrive in 0.09 s: the last waits >= 1 s.

    A closed-loop client would report ~0.1 s for each (coordinated omission); the open-loop one
    reports the queueing the late requests really suffered.
    """
    _, url = tiny_server
    offsets = np.arange(10) * 0.01
    record = asyncio.run(LoadGenerator(url, path="/slow", connections=10).run(offsets))
    assert np.all(record.status == 200)
    finish_order = np.sort(record.latency_s + offsets)
    assert np.all(finish_order >= 0.1 * np.arange(1, 11) - 1e-3)  # physics: one per 0.1 s
    assert record.latency_s.max() >= 0.9


def test_errors_and_unreachable_servers_are_counted_as_errors(tiny_server: tuple[TinyServer, str]) -> None:
    _, url = tiny_server
    record = asyncio.run(LoadGenerator(url, path="/broken").run(np.zeros(5)))
    assert np.all(record.status == 503)
    dead = asyncio.run(LoadGenerator(f"http://127.0.0.1:{free_port()}", timeout_s=1).run(np.zeros(3)))
    assert np.all(dead.status == TRANSPORT_ERROR)
    summary = summarize(dead, duration_s=1.0, slo_ms=100, error_budget=0.01)
    assert summary.error_frac == 1.0 and summary.goodput_rps == 0.0 and summary.slo_violation_frac == 1.0


def test_per_second_series_split_the_outcomes(tiny_server: tuple[TinyServer, str]) -> None:
    _, url = tiny_server
    offsets = np.concatenate([np.linspace(0, 0.9, 30), np.linspace(1.0, 1.9, 15)])
    record = asyncio.run(LoadGenerator(url, path="/mixed").run(offsets))
    series = per_second(record, seconds=2, slo_ms=10_000)
    assert series.sent.tolist() == [30.0, 15.0]
    assert (series.ok + series.throttled + series.errors).tolist() == [30.0, 15.0]
    assert series.throttled.sum() == 15 and series.good.sum() == 30
    assert np.all(np.isfinite(series.p99_ms))


def test_a_request_plan_sets_each_requests_method_path_body_and_key(tiny_server: tuple[TinyServer, str]) -> None:
    app, url = tiny_server
    requests = (Request("GET", "/ok"), Request("POST", "/ok/infer", b"x" * 3000))
    plan = RequestPlan(requests, ("free_0001", "pro_0002"), np.array([0, 1, 1, 0]), np.array([1, 0, 1, 0]))
    record = asyncio.run(LoadGenerator(url).run(np.linspace(0.0, 0.2, 4), plan=plan))
    assert np.all(record.status == 200)
    assert sorted(app.bodies) == sorted([("GET", "/ok", "pro_0002", 0), ("POST", "/ok/infer", "free_0001", 3000),
                                         ("POST", "/ok/infer", "pro_0002", 3000), ("GET", "/ok", "free_0001", 0)])  # fmt: skip
    with pytest.raises(ValueError, match="the plan has 4 requests for 3 arrivals"):
        asyncio.run(LoadGenerator(url).run(np.zeros(3), plan=plan))
