"""Token buckets in process, with exactly the semantics of the Redis script (limiter.bucket math).

`LocalBucket` is the fail-open guard while Redis is unreachable (so a dead Redis does not mean
unlimited) and a drop-in for single-process users. Its clock is injectable (µs); memory is
bounded: buckets that are full again are dropped (a missing bucket reads as full, so this
changes no decision), and past `max_buckets` the least recently used ones are evicted.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from limiter.bucket import (
    BucketError,
    BucketSpec,
    Decision,
    check_and_consume,
    decision_from,
    refill,
    validate_cost,
)

__all__ = ["LocalBucket", "monotonic_us"]


def monotonic_us() -> int:
    """The process's monotonic clock in integer µs (never goes back)."""
    return time.monotonic_ns() // 1000


class LocalBucket:
    """In-process check-and-consume: `check(keys, specs, cost) -> (allowed, [Decision per key])`.

    The same all-or-nothing rule as the Redis script: the request passes only when every bucket
    of `keys` holds `cost` tokens, and then every one pays. Thread-safe (one lock); in asyncio a
    check never awaits, so it is atomic within the event loop.
    """

    def __init__(self, clock_us: Callable[[], int] = monotonic_us, max_buckets: int = 100_000, source: str = "local"):
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        self._clock_us = clock_us
        self.max_buckets = max_buckets
        self.source = source
        self._states: OrderedDict[str, tuple[int, int, BucketSpec]] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted_active = 0  # buckets evicted while not yet full (only past max_buckets)

    def __len__(self) -> int:
        """Buckets currently held in memory."""
        return len(self._states)

    def check(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> tuple[bool, list[Decision]]:
        """Consume `cost` tokens from every bucket of `keys` if all hold it; one Decision per key."""
        if not keys or len(keys) != len(specs):
            raise BucketError(f"a check needs one spec per key and at least one key, got {len(keys)} keys, {len(specs)} specs")
        costs_ut = [validate_cost(cost, spec) for spec in specs]
        with self._lock:
            now_us = self._clock_us()
            states = self._states
            previous = [states.get(key) for key in keys]
            allowed, new_states, results = check_and_consume(
                [None if state is None else (state[0], state[1]) for state in previous], list(specs), costs_ut, now_us
            )
            for key, spec, (tokens_ut, ts_us), (_, _, reset_us) in zip(keys, specs, new_states, results, strict=True):
                if reset_us == 0:
                    states.pop(key, None)  # full again: reads the same as a bucket never seen
                else:
                    states[key] = (tokens_ut, ts_us, spec)
                    states.move_to_end(key)
            if len(states) > self.max_buckets:
                self._evict(now_us)
        return allowed, [decision_from(allowed, result, spec, self.source) for result, spec in zip(results, specs, strict=True)]

    def _evict(self, now_us: int) -> None:
        """Drop buckets that have refilled; then, if still above 90 %, the least recently used.

        Evicting down to 90 % keeps the full scan to once per `max_buckets / 10` new buckets.
        """
        for key, (tokens_ut, ts_us, spec) in list(self._states.items()):
            if refill(tokens_ut, ts_us, now_us, spec.rate, spec.capacity_ut) >= spec.capacity_ut:
                del self._states[key]
        low_water = max(1, self.max_buckets * 9 // 10)
        while len(self._states) > low_water:
            self._states.popitem(last=False)
            self.evicted_active += 1

    def clear(self) -> None:
        """Forget every bucket (all read as full again)."""
        with self._lock:
            self._states.clear()
