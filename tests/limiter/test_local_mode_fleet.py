"""Local mode with real `ratepilot edge` processes on one real redis-server: one client id hammering one tier
through three edges admits within the stated bound and at least 0.95x what one strict node admits; a node
cut off from Redis (its own network namespace, link down; a blackholing TCP proxy where namespaces cannot
be made) serves from its leases then its share, and
rejoins without a burst when the link comes back."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from benchmarks.fleet import (
    BlackholeProxy,
    EdgeNode,
    Partition,
    hammer,
    namespaces_available,
    sample,
    wait_for,
)
from ratepilot.servers import RedisServer
from tests.limiter.support import write_config

RATE, BURST = 60.0, 30.0  # each client's bucket (the tier's never binds)
SYNC_S = 0.1

TIERS = f"""default_tier: strict
tiers:
  local:
    client:    {{rate: {RATE}, burst: {BURST}}}
    aggregate: {{rate: 1000000, burst: 1000000}}
    mode: local
    key_prefixes: [local_]
  strict:
    client:    {{rate: {RATE}, burst: {BURST}}}
    aggregate: {{rate: 1000000, burst: 1000000}}
    key_prefixes: [strict_]
nodes:
  heartbeat_s: 0.5
  expiry_s: 1.0
local_mode:
  sync_s: {SYNC_S}
exempt_paths: [/health, /metrics]
"""
# a short Redis timeout: a partitioned node's strict fallbacks fail fast to its local guard
CONFIG = "redis:\n  url: REDIS_URL\n  timeout_ms: 50\n" + TIERS


def decisions(node: EdgeNode, **labels: str) -> float:
    return sample(node.metrics(), "ratepilot_decisions_total", {"tier": "local", **labels})


@pytest.fixture
def three_edges(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[EdgeNode]]:
    config = write_config(tmp_path / "limiter.yaml", redis_server.url, CONFIG)
    nodes = [EdgeNode(config, tmp_path / f"edge{i}") for i in range(3)]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def test_one_client_through_three_local_edges_admits_within_the_bound(three_edges: list[EdgeNode]) -> None:
    wait_for(lambda: all(sample(n.metrics(), "ratepilot_live_nodes") == 3 for n in three_edges), 15, "three live nodes")
    local = hammer([n.url for n in three_edges], f"local_{secrets.token_hex(4)}", seconds=4.0, connections=3)
    strict = hammer([three_edges[0].url], f"strict_{secrets.token_hex(4)}", seconds=4.0, connections=3)
    bound = BURST + RATE * local.seconds  # the strict bound: local mode adds no over-admission
    assert local.count(-1) == strict.count(-1) == 0
    assert local.admitted <= bound + 1, (local.admitted, bound, local.statuses)
    assert local.admitted >= 0.95 * strict.admitted, (local.admitted, strict.admitted, local.statuses)
    # the hammer went well past the limit everywhere, and most decisions never left the process
    assert all(local.count(429, url) > 0 for url in local.statuses)
    in_process = sum(decisions(n, source="lease") for n in three_edges)
    assert in_process >= 0.5 * sum(decisions(n) for n in three_edges)


@contextmanager
def fleet_with_a_cuttable_node(tmp_path: Path) -> Iterator[tuple[list[EdgeNode], Callable[[], None], Callable[[], None]]]:
    """Three local-mode edges; the third one's Redis traffic can be cut and healed: (nodes, cut, heal).

    The third edge runs in its own network namespace and reaches Redis over a veth pair whose link is
    taken down. Where namespaces cannot be made (not root, no iproute2), the fallback: it reaches Redis
    through a TCP proxy of ours that drops every byte while cut (benchmarks.fleet.BlackholeProxy)."""
    netns = namespaces_available()
    partition = Partition().create() if netns else None
    extra = ["--bind", "127.0.0.1", partition.redis_ip, "--protected-mode", "no"] if partition else []
    redis_server = RedisServer(workdir=tmp_path / "redis", extra_args=extra)
    nodes: list[EdgeNode] = []
    proxy: BlackholeProxy | None = None
    try:
        redis_server.start()
        config = write_config(tmp_path / "limiter.yaml", redis_server.url, CONFIG)
        nodes = [EdgeNode(config, tmp_path / "edge0"), EdgeNode(config, tmp_path / "edge1")]
        if partition is not None:
            inside = write_config(tmp_path / "limiter-ns.yaml", redis_server.url.replace("127.0.0.1", partition.redis_ip), CONFIG)
            nodes.append(EdgeNode(inside, tmp_path / "edge-ns", host=partition.client_ip, netns=partition.name))
            cut, heal = partition.cut, partition.heal
        else:
            proxy = BlackholeProxy(redis_server.port)
            proxied = write_config(tmp_path / "limiter-proxy.yaml", f"redis://127.0.0.1:{proxy.port}/0", CONFIG)
            nodes.append(EdgeNode(proxied, tmp_path / "edge-proxied"))
            cut, heal = proxy.cut, proxy.heal
        for node in nodes:
            node.start()
        yield nodes, cut, heal
    finally:
        for node in nodes:
            node.stop()
        redis_server.stop()
        if partition is not None:
            partition.destroy()
        if proxy is not None:
            proxy.close()


def test_a_partitioned_node_serves_its_leases_then_its_share_and_rejoins_without_a_burst(tmp_path: Path) -> None:
    with fleet_with_a_cuttable_node(tmp_path) as (nodes, cut_link, heal_link):
        cut = nodes[2]
        urls = [node.url for node in nodes]
        wait_for(lambda: all(sample(n.metrics(), "ratepilot_live_nodes") == 3 for n in nodes), 15, "three live nodes")
        client = f"local_{secrets.token_hex(4)}"
        hammer(urls, client, seconds=1.5, connections=2)  # leases taken everywhere; the bucket drained

        cut_link()
        local_before = decisions(cut, source="local", outcome="allowed")
        during = hammer(urls, client, seconds=3.0, connections=2)
        share = 1 / 3
        # the cut node: at most what it held (a lease is at most the burst), then its share of the limit
        cut_bound = BURST + share * (BURST + RATE * during.seconds)
        assert during.count(200, cut.url) <= cut_bound + 1, (during.statuses, cut_bound)
        assert decisions(cut, source="local", outcome="allowed") > local_before  # its share served
        assert sample(cut.metrics(), "ratepilot_redis_errors_total", {"kind": "lease_sync"}) > 0
        # the others keep the global bound (they may hold up to a burst each when the cut starts)
        others = during.count(200, urls[0]) + during.count(200, urls[1])
        assert others <= BURST + RATE * during.seconds + 2 * BURST + 1, during.statuses

        heal_link()
        synced = sample(cut.metrics(), "ratepilot_lease_syncs_total", {"outcome": "ok"})
        wait_for(lambda: sample(cut.metrics(), "ratepilot_lease_syncs_total", {"outcome": "ok"}) > synced + 2, 15,
                 "the cut node syncing again")  # fmt: skip
        after = hammer(urls, client, seconds=3.0, connections=2)
        # no refund storm, no burst: the fleet is back at one limit (plus what the nodes held)
        assert after.admitted <= BURST + RATE * after.seconds + 3 * BURST + 1, after.statuses
        assert after.admitted >= 0.8 * RATE * after.seconds, after.statuses  # and it converged: the rate
        assert after.count(200, cut.url) > 0
