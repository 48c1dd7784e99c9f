"""Three real `ratepilot edge` processes on one real redis-server: heartbeats set each node's share, shares
move when a node is SIGKILLed or joins, and while Redis is SIGKILLed the fleet admits about the tier rate
in total (each node's local guard at 1/3), not three times it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.fleet import EdgeNode, hammer, sample, wait_for
from ratepilot.servers import RedisServer
from tests.limiter.support import CONFIG_HEAD, write_config

HEARTBEAT_S, EXPIRY_S = 0.5, 1.0
RATE, BURST = 60.0, 30.0  # the tier's aggregate bucket; clients are never the limit
SCHEDULING_SLACK_S = 1.0  # a loaded 2-core machine may run a heartbeat this late

FLEET_CONFIG = CONFIG_HEAD.replace("timeout_ms: 1000", "timeout_ms: 50") + f"""default_tier: fleet
tiers:
  fleet:
    client:    {{rate: 100000, burst: 100000}}
    aggregate: {{rate: {RATE}, burst: {BURST}}}
nodes:
  heartbeat_s: {HEARTBEAT_S}
  expiry_s: {EXPIRY_S}
exempt_paths: [/health, /metrics]
"""


@pytest.fixture
def fleet(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[EdgeNode]]:
    """Three edges on the test's redis-server (more can be appended; all are stopped after the test)."""
    config = write_config(tmp_path / "fleet.yaml", redis_server.url, FLEET_CONFIG)
    nodes = [EdgeNode(config, tmp_path / f"edge{i}").start() for i in range(3)]
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def live_nodes(node: EdgeNode) -> float:
    return sample(node.metrics(), "ratepilot_live_nodes")


def all_see(nodes: list[EdgeNode], count: int) -> bool:
    return all(live_nodes(node) == count for node in nodes)


def test_shares_follow_a_sigkill_and_a_join(fleet: list[EdgeNode], tmp_path: Path) -> None:
    wait_for(lambda: all_see(fleet, 3), 15, "three live nodes")
    fleet[0].kill()
    # a SIGKILLed node cannot withdraw: its heartbeat expires, then the next heartbeat sees it gone
    took = wait_for(lambda: all_see(fleet[1:], 2), 15, "two live nodes after the SIGKILL")
    assert took <= EXPIRY_S + HEARTBEAT_S + SCHEDULING_SLACK_S
    joined = EdgeNode(fleet[0].config, tmp_path / "edge3").start()
    fleet.append(joined)
    took = wait_for(lambda: all_see(fleet[1:], 3), 15, "three live nodes after the join")
    assert took <= HEARTBEAT_S + SCHEDULING_SLACK_S
    # a node that stops cleanly withdraws: the others see it gone on their next heartbeat
    fleet[1].stop()
    took = wait_for(lambda: all_see(fleet[2:], 2), 15, "two live nodes after a clean stop")
    assert took <= HEARTBEAT_S + SCHEDULING_SLACK_S


def test_redis_outage_the_fleet_admits_about_the_tier_rate(fleet: list[EdgeNode], redis_server: RedisServer) -> None:
    wait_for(lambda: all_see(fleet, 3), 15, "three live nodes")
    errors_before = [sample(node.metrics(), "ratepilot_redis_errors_total") for node in fleet]
    redis_server.process.kill()  # type: ignore[union-attr]  # SIGKILL
    redis_server.process.wait()  # type: ignore[union-attr]
    result = hammer([node.url for node in fleet], "one-client", seconds=4.0, connections=3)
    bound = BURST + RATE * result.seconds  # what one limit admits over the run
    admitted = result.admitted
    assert result.count(-1) == 0 and result.count(500) == 0 and result.count(502) == 0
    assert admitted <= 1.1 * bound + 3, (admitted, bound, result.statuses)
    assert admitted >= 0.6 * RATE * result.seconds, (admitted, bound, result.statuses)  # still serving
    for node, before in zip(fleet, errors_before, strict=True):
        text = node.metrics()
        assert sample(text, "ratepilot_redis_errors_total") > before
        assert sample(text, "ratepilot_decisions_total", {"source": "local", "outcome": "allowed"}) > 0
        assert live_nodes(node) == 3  # the last count stays in force while Redis is gone
