"""Tick back-off on real servers: Redis or Prometheus stopped, the pause grows to its cap; started again, back to the interval."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from benchmarks.synthetic_exporter import SyntheticExporter
from controller.policies import LoadedPolicy
from controller.runtime import Controller
from controller.settings import LoopSettings
from ratepilot.servers import PrometheusServer, RedisServer
from tests.controller.policies import LatencyFollower
from tests.controller.support import make_settings, query, wait_for

TIERS = {"free": {"static_rate": 100, "min_rate": 10, "max_rate": 1000}}
INTERVAL_S, CAP_S = 0.3, 1.2  # 0.3 -> 0.6 -> 1.2 (capped)


def sample(controller: Controller, name: str, labels: dict[str, str] | None = None) -> float:
    value = controller.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def ticks(controller: Controller, result: str) -> float:
    return sample(controller, "ratepilot_controller_ticks_total", {"result": result})


def pause(controller: Controller) -> float:
    return sample(controller, "ratepilot_controller_tick_pause_seconds")


def start(redis_url: str, prometheus_url: str) -> Controller:
    # one replica without a lease: it keeps leading (and failing) while Redis is down
    settings = make_settings(redis_url, prometheus_url, tiers=TIERS, lease__enabled=False, redis__timeout_s=1.0,
                             loop__tick_interval_s=INTERVAL_S, loop__max_backoff_s=CAP_S)  # fmt: skip
    controller = Controller(settings, LoadedPolicy(LatencyFollower(), "latency_follower"))
    controller.start()
    return controller


def backs_off_then_recovers(controller: Controller, failing: Callable[[], float], stop: Callable[[], None],
                            restart: Callable[[], None]) -> None:  # fmt: skip
    wait_for(lambda: ticks(controller, "written") >= 3, timeout_s=30)
    assert pause(controller) == INTERVAL_S and sample(controller, "ratepilot_controller_failing_ticks") == 0
    stop()
    wait_for(lambda: pause(controller) == CAP_S, timeout_s=30)
    assert sample(controller, "ratepilot_controller_failing_ticks") >= 2  # 0.3 x 2^2 = the cap
    before, t0 = failing(), time.monotonic()
    wait_for(lambda: failing() >= before + 3, timeout_s=30)
    elapsed = time.monotonic() - t0
    # three failing ticks at the cap take >= 2 pauses of 1.2 s (at the interval they would take 0.6-0.9 s)
    assert elapsed >= 2 * CAP_S - 0.1, elapsed
    restart()
    wait_for(lambda: pause(controller) == INTERVAL_S, timeout_s=CAP_S + 20)  # the first good tick
    assert sample(controller, "ratepilot_controller_failing_ticks") == 0
    written, t1 = ticks(controller, "written"), time.monotonic()
    wait_for(lambda: ticks(controller, "written") >= written + 4, timeout_s=30)
    assert pause(controller) == INTERVAL_S
    # four good ticks at the interval, not at the cap (a loaded machine may stretch them, never to 4 x 1.2 s)
    assert time.monotonic() - t1 < 4 * CAP_S, time.monotonic() - t1


def test_the_pause_doubles_to_its_cap_and_never_past_half_the_rate_ttl() -> None:
    loop = LoopSettings(tick_interval_s=5, rate_ttl_s=30, max_backoff_s=60)
    assert [loop.pause_after(n) for n in range(5)] == [5, 10, 15, 15, 15]  # capped at rate_ttl_s / 2
    assert LoopSettings(tick_interval_s=1, rate_ttl_s=100, max_backoff_s=6).pause_after(1000) == 6
    assert LoopSettings(tick_interval_s=10, rate_ttl_s=100, max_backoff_s=1).pause_after(3) == 10  # never below the interval


def test_redis_stopped_backs_off_and_started_again_restores_the_interval(redis_server: RedisServer,
                                                                         prometheus: PrometheusServer) -> None:  # fmt: skip
    controller = start(redis_server.url, prometheus.url)
    try:
        backs_off_then_recovers(controller, lambda: ticks(controller, "failed"), redis_server.stop, redis_server.start)
        assert sample(controller, "ratepilot_controller_errors_total", {"stage": "redis_read"}) >= 3
    finally:
        controller.stop()


def test_prometheus_stopped_backs_off_and_started_again_restores_the_interval(
    redis_server: RedisServer, exporter: SyntheticExporter, prometheus_factory: Callable[..., PrometheusServer]
) -> None:
    prom = prometheus_factory([exporter.target])
    wait_for(lambda: len(query(prom.url, "ratepilot_backend_cpu_utilization")) == 1, timeout_s=30)
    controller = start(redis_server.url, prom.url)
    try:
        # Prometheus down: the ticks still write (held, then decaying rates) but count as failing
        backs_off_then_recovers(controller, lambda: sample(controller, "ratepilot_controller_errors_total",
                                                           {"stage": "prometheus"}), prom.stop, prom.start)  # fmt: skip
    finally:
        controller.stop()


@pytest.fixture(autouse=True)
def _quiet_apscheduler(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("ERROR", logger="apscheduler")
