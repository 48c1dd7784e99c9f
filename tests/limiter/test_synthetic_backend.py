"""The synthetic backend saturates: latency and errors grow once offered load exceeds capacity."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from limiter.metrics import BackendMetrics
from limiter.synthetic_backend import BusyMeter, SyntheticBackend
from ratepilot.servers import RedisServer
from tests.limiter.support import RunningEdge


async def _offer(backend: SyntheticBackend, rps: float, duration_s: float) -> tuple[list[float], list[int]]:
    """Open-loop arrivals at `rps` for `duration_s`; latencies of successes and all statuses."""
    latencies: list[float] = []
    statuses: list[int] = []

    async def one() -> None:
        started = time.perf_counter()
        status = await backend.serve(1.0, "t")
        statuses.append(status)
        if status == 200:
            latencies.append(time.perf_counter() - started)

    tasks = []
    begin = time.perf_counter()
    for i in range(int(rps * duration_s)):
        delay = begin + i / rps - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    return latencies, statuses


def test_latency_and_errors_grow_with_load() -> None:
    registry = CollectorRegistry()
    backend = SyntheticBackend(BackendMetrics(registry), capacity_rps=100, workers=4, queue_limit=20, timeout_s=0.25, seed=1)

    light_lat, light_status = asyncio.run(_offer(backend, rps=30, duration_s=1.0))
    heavy_lat, heavy_status = asyncio.run(_offer(backend, rps=400, duration_s=1.0))

    assert set(light_status) == {200}
    assert heavy_status.count(503) + heavy_status.count(504) > len(heavy_status) // 4
    assert statistics.median(heavy_lat) > 2 * statistics.median(light_lat)
    errors = registry.get_sample_value("ratepilot_backend_requests_total", {"tier": "t", "outcome": "error"})
    assert errors == heavy_status.count(503) + heavy_status.count(504)
    assert registry.get_sample_value("ratepilot_backend_capacity_rps") == 100


def test_capacity_is_validated_and_changes_at_run_time() -> None:
    registry = CollectorRegistry()
    backend = SyntheticBackend(BackendMetrics(registry), capacity_rps=100)
    backend.capacity_rps = 250
    assert registry.get_sample_value("ratepilot_backend_capacity_rps") == 250
    for bad in (0, -1, float("nan"), float("inf"), True, "5"):
        with pytest.raises(ValueError):
            backend.capacity_rps = bad  # type: ignore[assignment]
    assert backend.capacity_rps == 250


def test_busy_meter_time_weighted() -> None:
    now = [0.0]
    meter = BusyMeter(workers=2, clock=lambda: now[0])
    meter.start()  # one of two busy for 1 s, then both for 1 s
    now[0] = 1.0
    meter.start()
    now[0] = 2.0
    assert meter.read() == pytest.approx(0.75)
    meter.stop()
    meter.stop()
    now[0] = 3.0
    assert meter.read() == 0.0  # idle since the previous read


def test_admin_endpoint_sets_capacity(edge_factory: Callable[..., RunningEdge], redis_server_session: RedisServer) -> None:
    edge = edge_factory(redis_server_session.url, backend="synthetic", capacity_rps=500, workers=4)
    assert edge.get("/admin/backend").json()["capacity_rps"] == 500
    assert edge.post("/admin/backend", json={"capacity_rps": 123.5}).json()["capacity_rps"] == 123.5
    for bad in ({"capacity_rps": 0}, {"capacity_rps": "x"}, {"cap": 5}, [1]):
        response = edge.post("/admin/backend", json=bad)
        assert response.status_code == 400 and response.json()["error"] == "bad_request"
    assert edge.post("/admin/backend", content=b"{not json").status_code == 400
    assert "ratepilot_backend_capacity_rps 123.5" in edge.get("/metrics").text
    response = edge.get("/v1/items", key="pro_a")
    assert response.status_code == 200
    assert 'ratepilot_backend_requests_total{outcome="ok",tier="pro"} 1.0' in edge.get("/metrics").text
