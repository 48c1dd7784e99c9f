"""`ThrottledLog`: an error logged at most once per interval, with how often it happened since."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

__all__ = ["ThrottledLog"]


class ThrottledLog:
    """Logs an error at most once per `interval_s`, with how often it happened since the last line
    (a failure on the request path would otherwise write one line per request)."""

    def __init__(
        self,
        message: str,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ):
        self.message = message
        self.interval_s = interval_s
        self.clock = clock
        self.logger = logger or logging.getLogger("ratepilot")
        self.unlogged = 0  # occurrences since the last line
        self.logged_at = -math.inf

    def error(self, error: Exception) -> bool:
        """Count one occurrence; log it (True) unless a line was written within the interval."""
        self.unlogged += 1
        now = self.clock()
        if now - self.logged_at < self.interval_s:
            return False
        self.logger.error("%s (%d times since the last line): %r", self.message, self.unlogged, error, exc_info=error)
        self.unlogged, self.logged_at = 0, now
        return True
