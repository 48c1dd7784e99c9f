"""A backend that really saturates: W workers, a bounded queue, a queue timeout, exponential service times.

A request of cost c holds one of `workers` workers for an exponential time with mean
`c * workers / capacity_rps` seconds, so the pool serves `capacity_rps` cost-1 requests per second.
Above that, requests queue (latency grows); past `queue_limit` waiting they are refused at once with
503, and one that waits longer than `timeout_s` for a worker gets 504. The capacity can change at
run time (`capacity_rps = ...`; the edge exposes `POST /admin/backend`), which is how the demo makes
the backend follow a capacity trace.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable

from limiter.metrics import BackendMetrics


class BusyMeter:
    """Time-weighted busy fraction of a worker pool, averaged since the previous read."""

    def __init__(self, workers: int, clock: Callable[[], float] = time.monotonic):
        self.workers = workers
        self.busy = 0
        self._clock = clock
        self._area = 0.0  # busy-worker seconds since the last read
        self._changed = self._read_at = clock()

    def _advance(self) -> None:
        now = self._clock()
        self._area += self.busy * (now - self._changed)
        self._changed = now

    def start(self) -> None:
        """One more worker busy."""
        self._advance()
        self.busy += 1

    def stop(self) -> None:
        """One worker idle again."""
        self._advance()
        self.busy -= 1

    def read(self) -> float:
        """Average busy fraction (0..1) since the previous read (the current one if no time passed)."""
        self._advance()
        elapsed = self._changed - self._read_at
        fraction = self.busy / self.workers if elapsed <= 0 else self._area / (elapsed * self.workers)
        self._area, self._read_at = 0.0, self._changed
        return min(1.0, max(0.0, fraction))


class SyntheticBackend:
    """The worker pool; `await serve(cost, tier)` returns the HTTP status the request ends with."""

    def __init__(
        self,
        metrics: BackendMetrics,
        capacity_rps: float = 200.0,
        workers: int = 16,
        queue_limit: int = 64,
        timeout_s: float = 2.0,
        seed: int | None = None,
    ):
        if workers < 1 or queue_limit < 0 or not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError("workers must be >= 1, queue_limit >= 0 and timeout_s a positive number")
        self.workers = workers
        self.queue_limit = queue_limit
        self.timeout_s = timeout_s
        self._metrics = metrics
        self._rng = random.Random(seed)
        self._meter = BusyMeter(workers)
        self._slots: asyncio.Semaphore | None = None  # created on the serving loop
        self._waiting = 0
        self.capacity_rps = capacity_rps
        metrics.cpu_utilization.set_function(self._meter.read)

    @property
    def capacity_rps(self) -> float:
        """Cost-1 requests per second the pool serves at full load."""
        return self._capacity_rps

    @capacity_rps.setter
    def capacity_rps(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not 0 < value <= 1e6:
            raise ValueError(f"capacity_rps must be a number in (0, 1e6], got {value!r}")
        self._capacity_rps = float(value)
        self._metrics.capacity_rps.set(self._capacity_rps)

    @property
    def waiting(self) -> int:
        """Requests queued for a worker right now."""
        return self._waiting

    async def serve(self, cost: float, tier: str) -> int:
        """Queue for a worker, hold it for the service time; 200, or 503 (queue full) / 504 (waited too long)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        arrived = time.perf_counter()
        if self._waiting >= self.queue_limit and self._slots.locked():
            return self._finish(tier, arrived, 503)
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except TimeoutError:
            return self._finish(tier, arrived, 504)
        finally:
            self._waiting -= 1
        self._meter.start()
        try:
            mean_s = cost * self.workers / self._capacity_rps
            await asyncio.sleep(self._rng.expovariate(1.0 / mean_s))
        finally:
            self._meter.stop()
            self._slots.release()
        return self._finish(tier, arrived, 200)

    def _finish(self, tier: str, arrived: float, status: int) -> int:
        self._metrics.request_seconds.labels(tier).observe(time.perf_counter() - arrived)
        self._metrics.requests.labels(tier, "ok" if status < 500 else "error").inc()
        return status
