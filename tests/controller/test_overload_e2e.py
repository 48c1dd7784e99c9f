"""Backend overload end to end: a real edge whose synthetic backend is overloaded into 503/504s, a real
Redis and Prometheus, the controller reading them: the brake cuts the tier's rate, the rate climbs back.

The overload is real: the backend's capacity is cut to 1 request/s (`POST /admin/backend`) under an
open-loop load of 40 requests/s, so its queue fills and requests end in 503 (queue full) or 504
(waited too long); then the capacity is restored. Phases are a few seconds each (tick 1 s, rate
window 3 s, scrapes every second).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml

from controller.policies import LoadedPolicy
from controller.runtime import Controller
from controller.settings import settings_from_mapping
from limiter.rate_table import RATES_KEY, parse_entry
from policy.registry import make_policy
from ratepilot.demo.loadgen import LoadGenerator
from ratepilot.demo.stack import TIER, Stack, StackSettings, controller_config
from ratepilot.servers import free_port
from tests.controller.support import wait_for

NOMINAL_RPS, LOAD_RPS, OVERLOAD_CAPACITY_RPS = 100.0, 40.0, 1.0
TICK_S, SCRAPE_S = 1.0, 1.0
BRAKE_ERROR_RATE, BRAKE_RATIO = 0.2, 0.5


class BackgroundLoad:
    """The demo's open-loop load generator in a thread of its own: LOAD_RPS, evenly spaced, until stopped."""

    def __init__(self, url: str, duration_s: float = 120.0):
        self.generator = LoadGenerator(url, clients=20, timeout_s=3.0)
        self.offsets = np.arange(0.0, duration_s, 1.0 / LOAD_RPS)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._started.set()
        await self.generator.run(self.offsets, stop=self._stop)

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=15)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """redis-server, the edge with its synthetic backend, and Prometheus scraping the edge every second."""
    settings = StackSettings(nominal_capacity_rps=NOMINAL_RPS, tick_interval_s=TICK_S, workers=4, backend_timeout_s=1.0)
    parts = Stack(tmp_path / "stack", settings, adaptive=False)  # the controller runs in the test
    parts.start()
    yield parts
    parts.stop()


def make_controller(stack: Stack) -> Controller:
    redis_url = yaml.safe_load((stack.workdir / "limiter.yaml").read_text())["redis"]["url"]
    assert stack.prometheus is not None
    data: dict[str, Any] = controller_config(redis_url, stack.prometheus.url, free_port(), stack.settings)
    data["prometheus"]["window"] = "3s"
    data["loop"] = {"tick_interval_s": TICK_S, "rate_ttl_s": 10}
    data["lease"] = {"enabled": False}
    data["policy"] = {"name": "static"}  # proposes the static rate every tick: what moves the rate is the safety engine
    data["safety"] = {"brake_error_rate": BRAKE_ERROR_RATE, "brake_ratio": BRAKE_RATIO, "max_up": 1.5}
    data["admin"] = {"enabled": False}
    settings = settings_from_mapping(data, env={})
    return Controller(settings, LoadedPolicy(make_policy("static"), "static"))


def decisions(controller: Controller) -> list[dict[str, Any]]:
    """The tier's decisions, oldest first."""
    return list(reversed(controller.decisions.recent(TIER, 500)))


def overloaded(observation: dict[str, Any], slo_ms: float) -> bool:
    """What the brake reacts to: error rate over BRAKE_ERROR_RATE or p99 over 3 x the SLO (null: not known)."""
    return (observation["error_rate"] or 0) > BRAKE_ERROR_RATE or (observation["p99_latency_ms"] or 0) > 3 * slo_ms


def server_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def test_backend_overload_brakes_within_two_ticks_and_the_rate_climbs_back(stack: Stack) -> None:
    controller = make_controller(stack)
    client = controller.redis
    with BackgroundLoad(stack.edge_url):
        controller.start()
        try:
            # healthy: the static rate, no errors seen
            wait_for(lambda: sum(1 for d in decisions(controller) if d["observation"]["error_rate"] == 0.0
                                 and d["rate"] == NOMINAL_RPS) >= 2, timeout_s=40)  # fmt: skip

            overload_at = server_now(client)
            stack.set_capacity(OVERLOAD_CAPACITY_RPS)
            wait_for(lambda: any("emergency_brake" in d["rules"] for d in decisions(controller)), timeout_s=20)
            # keep the backend overloaded until the brake has cut twice in a row
            wait_for(lambda: (decisions(controller)[-1]["rate"] <= NOMINAL_RPS * BRAKE_RATIO**2), timeout_s=20)
            recovered_at = server_now(client)
            stack.set_capacity(NOMINAL_RPS)
            braked = decisions(controller)[-1]["rate"]

            def climbed() -> bool:
                late = [d for d in decisions(controller) if d["t"] > recovered_at]
                return len(late) >= 2 and late[-1]["rate"] >= 2 * braked and "emergency_brake" not in late[-1]["rules"]

            wait_for(climbed, timeout_s=30)
        finally:
            controller.stop()

    history = decisions(controller)
    after = [d for d in history if d["t"] > overload_at]
    first_brake = next(i for i, d in enumerate(after) if "emergency_brake" in d["rules"])
    brake = after[first_brake]
    # the first tick whose observation shows the overload (errors, or queueing past 3 x the SLO) pulls the brake ...
    seen = next(i for i, d in enumerate(after) if overloaded(d["observation"], stack.settings.slo_ms))
    assert seen == first_brake, [(d["observation"], d["rules"]) for d in after[: first_brake + 1]]
    assert any((d["observation"]["error_rate"] or 0) > BRAKE_ERROR_RATE for d in after), "the backend never erred"
    assert brake["rule"] == "emergency_brake" and brake["rate"] == pytest.approx(BRAKE_RATIO * brake["rate_in_force"])
    # ... within two ticks of the errors reaching Prometheus (one scrape, and the two samples rate() needs)
    delay_s = brake["t"] - overload_at
    assert delay_s <= 2 * TICK_S + 2 * SCRAPE_S + 1.0, delay_s
    assert first_brake <= 2 + int(2 * SCRAPE_S / TICK_S) + 1, [d["t"] - overload_at for d in after[: first_brake + 1]]

    # the rate climbs back by the step limit once the errors are gone, and the decisions say so
    recovery = [d for d in history if d["t"] > recovered_at and "emergency_brake" not in d["rules"]]
    climbing = [d for d in recovery if d["rate"] > d["rate_in_force"]]
    assert climbing and all(d["rule"] == "step_limit" and d["rate"] <= 1.5 * d["rate_in_force"] + 1e-9 for d in climbing)
    table = parse_entry(client.hget(RATES_KEY, TIER))
    assert table.rate >= 2 * braked
    firings = controller.metrics.registry.get_sample_value(
        "ratepilot_controller_rule_firings_total", {"tier": TIER, "rule": "emergency_brake"}
    )
    assert firings is not None and firings >= 2
    print(f"brake {delay_s:.2f} s after the overload began ({first_brake + 1} ticks); braked to {braked:g}, back to {table.rate:g}")
