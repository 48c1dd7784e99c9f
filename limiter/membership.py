"""Edge-node membership: each node announces itself with a heartbeat in Redis; the live count sets its share.

Every `nodes.heartbeat_s` a node runs `limiter/lua/heartbeat.lua` (one call, on the Redis server
clock): it drops the members whose heartbeat has expired, refreshes its own entry to expire
`nodes.expiry_s` from now, and answers the number of live nodes N. The node's share is 1 / N:

| event                          | shares move                                                  |
|--------------------------------|--------------------------------------------------------------|
| a node starts                  | its first heartbeat counts it; the others see it on their next heartbeat |
| a node stops (SIGTERM)         | it withdraws its entry; the others see it on their next heartbeat |
| a node dies (SIGKILL)          | its entry expires `expiry_s` after its last heartbeat; the next heartbeat after that |
| Redis unreachable              | the last count stays in force (a node never falls back to 1, which would let N nodes admit N x) |

A node that never reached Redis counts itself alone (share 1), as a single edge always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from limiter.config import NodesConfig
from limiter.metrics import LimiterMetrics

log = logging.getLogger("ratepilot.membership")

NODES_KEY = "ratepilot:nodes"  # sorted set: node id -> server time (µs) its heartbeat expires
SCRIPT: str = resources.files("limiter.lua").joinpath("heartbeat.lua").read_text()
ERROR_LOG_INTERVAL_S = 10.0  # at most one log line per this many seconds while Redis is gone


def share_of(live_nodes: int) -> float:
    """Each node's share of a rate when `live_nodes` nodes serve it (a lone node, or none known: 1)."""
    return 1.0 / max(1, live_nodes)


def new_node_id() -> str:
    """A node id unique across hosts, processes and restarts: host:pid:random."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Membership:
    """One node's heartbeat: `connect(client)`, then `await beat()` refreshes it and reads the live count;
    `run()` loops until `stop()`; `await leave()` withdraws the node.

    `on_count(live_nodes)` is called after every heartbeat whose count differs from the last one.
    Heartbeats that fail count in `ratepilot_redis_errors_total{kind="heartbeat"}` and keep the last
    count; the live count is also exported as `ratepilot_live_nodes`.
    """

    def __init__(
        self,
        settings: Callable[[], NodesConfig],
        on_count: Callable[[int], None],
        metrics: LimiterMetrics,
        registry: CollectorRegistry,
        node_id: str | None = None,
        key: str = NODES_KEY,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.node_id = node_id or new_node_id()
        self.key = key
        self.live_nodes = 1
        self.beats = 0  # successful heartbeats
        self._client: Any = None  # set by connect()
        self._settings = settings
        self._on_count = on_count
        self._metrics = metrics
        self._clock = clock
        self._last_error_log = -ERROR_LOG_INTERVAL_S
        self._stopping = asyncio.Event()
        self._gauge = Gauge("ratepilot_live_nodes", "Edge nodes with a live heartbeat, as this node last read it",
                            registry=registry)  # fmt: skip
        self._gauge.set(1)

    def connect(self, client: Any) -> None:
        """Heartbeat through this redis.asyncio client (the edge's off-request-path one). Plain EVAL, once a
        heartbeat: the script is small, and a connection whose last command is EVALSHA reads as a bucket's."""
        self._client = client
        self._stopping.clear()

    async def beat(self) -> int:
        """Refresh this node's heartbeat and read the live count; on a Redis failure keep the last count."""
        expiry_us = round(self._settings().expiry_s * 1_000_000)
        try:
            _now_us, live = await self._client.eval(SCRIPT, 1, self.key, self.node_id, expiry_us, 0)
        except Exception as exc:  # any Redis failure: the shares stay as they are
            self._metrics.redis_errors.labels("heartbeat").inc()
            now = self._clock()
            if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
                self._last_error_log = now
                log.warning("heartbeat failed, keeping %d live node(s): %s", self.live_nodes, exc)
            return self.live_nodes
        self.beats += 1
        self._set(int(live))
        return self.live_nodes

    async def leave(self) -> None:
        """Withdraw this node's heartbeat (at shutdown), so the others re-balance on their next heartbeat."""
        try:
            await self._client.eval(SCRIPT, 1, self.key, self.node_id, 0, 1)
        except Exception as exc:  # Redis gone: the entry expires by itself
            log.warning("could not withdraw the heartbeat (it expires by itself): %s", exc)

    async def run(self) -> None:
        """Heartbeat every `heartbeat_s` (from the start of one to the next) until stop()."""
        while not self._stopping.is_set():
            started = self._clock()
            await self.beat()
            wait_s = max(0.0, self._settings().heartbeat_s - (self._clock() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait_s)

    def stop(self) -> None:
        """End run() after its current heartbeat (leave() withdraws the node)."""
        self._stopping.set()

    def _set(self, live_nodes: int) -> None:
        live_nodes = max(1, live_nodes)
        self._gauge.set(live_nodes)
        if live_nodes != self.live_nodes:
            log.info("live edge nodes changed", extra={"fields": {"live_nodes": live_nodes, "was": self.live_nodes}})
            self.live_nodes = live_nodes
            self._on_count(live_nodes)
