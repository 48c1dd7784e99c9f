"""Growing back-off after backend failures, so a dead Redis sees probes, not a reconnect storm."""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class Backoff:
    """After a failure, stay away for `initial_s`, doubling per further failure up to `max_s`.

    While `blocked()` is true callers should not touch the backend and fall back at once; the
    first call after the window is a probe, and a success resets the window. A ±`jitter`
    fraction spreads the probes of many replicas apart.
    """

    def __init__(
        self,
        initial_s: float = 0.05,
        max_s: float = 2.0,
        factor: float = 2.0,
        jitter: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not (0 < initial_s <= max_s) or factor < 1 or not (0 <= jitter < 1):
            raise ValueError("back-off needs 0 < initial_s <= max_s, factor >= 1 and 0 <= jitter < 1")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self.jitter = jitter
        self._clock = clock
        self._window_s = 0.0
        self.blocked_until = 0.0  # clock time the window ends; 0.0 when none is open (cheap to test first)
        self.failures = 0  # consecutive failures

    def blocked(self) -> bool:
        """True while the back-off window after the last failure is still open."""
        return self.blocked_until > 0.0 and self._clock() < self.blocked_until

    def failure(self) -> None:
        """Record a failure: open (or widen) the window."""
        self.failures += 1
        self._window_s = self.initial_s if self._window_s == 0.0 else min(self.max_s, self._window_s * self.factor)
        spread = 1.0 + random.uniform(-self.jitter, self.jitter)
        self.blocked_until = self._clock() + self._window_s * spread

    def success(self) -> None:
        """Record a success: close the window and start small again next time."""
        if self.blocked_until or self.failures:
            self.failures = 0
            self._window_s = 0.0
            self.blocked_until = 0.0

    @property
    def remaining_s(self) -> float:
        """Seconds left in the current window (0 when not blocked)."""
        return max(0.0, self.blocked_until - self._clock()) if self.blocked_until else 0.0
