"""A node's background jobs for many edge nodes, started and stopped together by the edge and the limiter
runtime: the heartbeat (`limiter.membership`: the live count sets the fail-open share) and local mode's
lease sync (`limiter.lease_sync`). Both run on the caller's off-request-path Redis client."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from limiter.lease_sync import LeaseSync
from limiter.membership import Membership
from limiter.metrics import LimiterMetrics

if TYPE_CHECKING:
    from limiter.guard import Guard


class NodeTasks:
    """`start(client, spawn)` after connecting to Redis, `await stop()` before closing the client."""

    def __init__(self, guard: Guard, metrics: LimiterMetrics, registry: CollectorRegistry):
        self.membership = Membership(lambda: guard.config.nodes, guard.set_live_nodes, metrics, registry)
        self.lease_sync = LeaseSync(guard.nodes.leases, lambda: guard.config.local_mode, metrics, registry,
                                    on_synced=guard.leases_synced)  # fmt: skip
        self._started = False

    def start(self, client: Any, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        """Heartbeat and sync through `client`, as tasks made by `spawn`."""
        self.membership.connect(client)
        self.lease_sync.connect(client)
        spawn(self.membership.run())
        spawn(self.lease_sync.run())
        self._started = True

    async def stop(self) -> None:
        """End both loops and withdraw this node's heartbeat (the others re-balance on their next one)."""
        if not self._started:
            return
        self._started = False
        self.membership.stop()
        self.lease_sync.stop()
        await self.membership.leave()
