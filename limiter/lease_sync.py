"""Local mode's I/O: every `local_mode.sync_s` one `lease.lua` call reconciles a node's leases with Redis.

The arithmetic (what to give back, what to ask for, what a grant means) is `limiter.leases`; this
module only sends the plan and hands the answer back. A call that fails or times out is not resent
(its grants may have been debited: losing them under-admits, resending could double-spend); the
table is told Redis is unreachable, and the next interval tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from limiter.config import LocalModeConfig
from limiter.leases import LeaseTable, SyncItem
from limiter.metrics import LimiterMetrics

log = logging.getLogger("ratepilot.leases")

SCRIPT: str = resources.files("limiter.lua").joinpath("lease.lua").read_text()
KEYS_PER_CALL = 512  # a larger plan goes out as several calls (each atomic on its own keys)
ERROR_LOG_INTERVAL_S = 10.0


def sync_args(items: list[SyncItem]) -> tuple[list[str], list[int | float]]:
    """KEYS and ARGV of one lease.lua call: per key rate, capacity µt, returned µt, wanted µt."""
    keys = [item.key for item in items]
    args: list[int | float] = []
    for item in items:
        args += (item.rate, item.capacity_ut, item.return_ut, item.want_ut)
    return keys, args


class LeaseSync:
    """Runs one node's lease syncs: `connect(client)`, then `await sync_once()`, or `run()` until `stop()`.

    Rounds count in `ratepilot_lease_syncs_total{outcome}`; failures also in
    `ratepilot_redis_errors_total{kind="lease_sync"}`."""

    def __init__(
        self,
        table: LeaseTable,
        settings: Callable[[], LocalModeConfig],
        metrics: LimiterMetrics,
        registry: CollectorRegistry,
        timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_synced: Callable[[Sequence[SyncItem], Sequence[int]], None] | None = None,
    ):
        self.table = table
        self._on_synced = on_synced  # (items, tokens µt left in each bucket after the grant)
        self.syncs = 0  # successful sync rounds
        self._script: Any = None  # set by connect()
        self._settings = settings
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._clock = clock
        self._last_error_log = -ERROR_LOG_INTERVAL_S
        self._stopping = asyncio.Event()
        self._rounds = Counter("ratepilot_lease_syncs", "Lease sync rounds by outcome (ok, failed)", ["outcome"],
                               registry=registry)  # fmt: skip

    def connect(self, client: Any) -> None:
        """Sync through this redis.asyncio client (the edge's off-request-path one)."""
        self._script = client.register_script(SCRIPT)
        self._stopping.clear()

    async def sync_once(self) -> bool:
        """One sync round; False when Redis could not be reached (nothing granted, nothing given back)."""
        plan = self.table.plan()
        for start in range(0, len(plan), KEYS_PER_CALL):
            items = plan[start : start + KEYS_PER_CALL]
            keys, args = sync_args(items)
            try:
                reply = await asyncio.wait_for(self._script(keys=keys, args=args), self._timeout_s)
                grants = [int(grant) for grant in reply[1::2]]
                left = [int(tokens) for tokens in reply[2::2]]
            except Exception as exc:  # any failure: the rest of the plan is dropped too (see leases.py)
                self._metrics.redis_errors.labels("lease_sync").inc()
                self.table.unreachable()
                self._rounds.labels("failed").inc()
                now = self._clock()
                if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
                    self._last_error_log = now
                    log.warning("lease sync failed; deciding from the leases held, then the local guard: %r", exc)
                return False
            self.table.granted(items, grants)
            if self._on_synced is not None:
                self._on_synced(items, left)
        self.syncs += 1
        self._rounds.labels("ok").inc()
        return True

    async def run(self) -> None:
        """Sync, then wait `sync_s`, until stop(). The wait counts from the end of a sync, so every
        interval a lease's need is measured over is at least `sync_s` long (start to start, a slow
        sync would be followed by a short interval whose small need gives the leases back)."""
        while not self._stopping.is_set():
            await self.sync_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._settings().sync_s)

    def stop(self) -> None:
        """End run() after its current sync."""
        self._stopping.set()
