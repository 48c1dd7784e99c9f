"""Leader election through a Redis lease with a fencing token (Kubernetes leader-election timings).

The holder renews every `retry_period_s`; a leader that has not renewed for `renew_deadline_s`
stops calling itself leader; the key expires `lease_s` after the last renew, after which a follower
acquires it (within lease + retry period, well inside two lease periods) and INCRs the fencing
token. Writes carry the token and `write_rates.lua` refuses them inside Redis unless it is still
current, so a leader that was paused past its lease cannot overwrite its successor. A missing
counter (Redis restarted without persistence) starts at the Redis server clock in microseconds, so
tokens keep growing across the loss and an old token never matches a new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from importlib import resources

import redis

from controller.settings import LeaseSettings

log = logging.getLogger("ratepilot.controller.lease")

LEADER_KEY = "ratepilot:leader"
FENCE_KEY = "ratepilot:leader:fence"


def lua(name: str) -> str:
    """The text of one of the controller's Lua scripts."""
    return resources.files("controller.lua").joinpath(name).read_text()


class LeaderLease:
    """This replica's view of the lease; `try_acquire_or_renew` is the only call that talks to Redis."""

    def __init__(
        self,
        client: redis.Redis,
        replica_id: str,
        settings: LeaseSettings,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ):
        self._client = client
        self.replica_id = replica_id
        self.settings = settings
        self._clock = clock
        self._on_change = on_change
        self._acquire = client.register_script(lua("lease.lua"))
        self._release = client.register_script(lua("release.lua"))
        self._lock = threading.Lock()
        self.fence: int | None = None  # the token of our current term; None while following
        self._renewed_at: float | None = None  # our clock when the last renew succeeded

    @property
    def enabled(self) -> bool:
        """False when leader election is switched off (a single replica that always writes)."""
        return self.settings.enabled

    def is_leader(self) -> bool:
        """True while we hold a term and renewed it less than renew_deadline_s ago (our clock)."""
        if not self.enabled:
            return True
        with self._lock:
            if self.fence is None or self._renewed_at is None:
                return False
            return self._clock() - self._renewed_at < self.settings.renew_deadline_s

    def token(self) -> str:
        """The fencing token to send with a write ('' when leader election is off)."""
        if not self.enabled:
            return ""
        return "" if self.fence is None else str(self.fence)

    def try_acquire_or_renew(self) -> bool:
        """One acquire-or-renew round trip; returns whether we lead afterwards. Redis errors count as not renewed."""
        if not self.enabled:
            return True
        was_leader = self.is_leader()
        try:
            token = int(self._acquire(keys=[LEADER_KEY, FENCE_KEY], args=[self.replica_id, int(self.settings.lease_s * 1000)]))
        except redis.RedisError as exc:
            log.warning("event=lease_error replica=%s error=%r", self.replica_id, str(exc))
            leader = self.is_leader()  # keep the term until the renew deadline passes
            self._notify(was_leader, leader)
            return leader
        with self._lock:
            if token > 0:
                if self.fence != token:
                    log.info("event=lease_acquired replica=%s fence=%d", self.replica_id, token)
                self.fence, self._renewed_at = token, self._clock()
            else:
                if self.fence is not None:
                    log.warning("event=lease_lost replica=%s fence=%d", self.replica_id, self.fence)
                self.fence, self._renewed_at = None, None
        leader = self.is_leader()
        self._notify(was_leader, leader)
        return leader

    def step_down(self, reason: str) -> None:
        """Forget our term (e.g. after Redis refused a write as fenced)."""
        was_leader = self.is_leader()
        with self._lock:
            if self.fence is not None:
                log.warning("event=step_down replica=%s fence=%d reason=%r", self.replica_id, self.fence, reason)
            self.fence, self._renewed_at = None, None
        self._notify(was_leader, False)

    def release(self) -> None:
        """Give the lease up (shutdown) so a follower need not wait for it to expire."""
        if not self.enabled:
            return
        try:
            self._release(keys=[LEADER_KEY], args=[self.replica_id])
        except redis.RedisError as exc:
            log.warning("event=lease_release_failed replica=%s error=%r", self.replica_id, str(exc))
        self.step_down("released")

    def _notify(self, was: bool, now: bool) -> None:
        if was != now and self._on_change is not None:
            self._on_change(now)
