"""Wires the controller together from its settings and runs the loop on an APScheduler background scheduler.

Two interval jobs, each `max_instances=1` and `coalesce=True` so they never overlap themselves and a
late run is not replayed: `tick` every `loop.tick_interval_s` (moved to the loop's longer pause while
ticks keep failing, and back) and `lease` (acquire or renew) every `lease.retry_period_s`, on separate
threads so a slow tick never delays a renew; with `candidate.enabled`, a third, `candidate`, loads the
candidate in shadow at start and every `candidate.refresh_s` (controller/shadow.py), so a slow MLflow
never delays a tick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import redis
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from controller.decisions import DecisionLog
from controller.lease import LeaderLease
from controller.loop import ControlLoop
from controller.metrics import ControllerMetrics
from controller.overrides import OverrideStore
from controller.policies import LoadedPolicy, PolicyHolder, load_policy
from controller.prometheus_source import PrometheusSource
from controller.rate_store import RateStore
from controller.settings import ControllerSettings
from controller.shadow import ShadowCandidate

log = logging.getLogger("ratepilot.controller")


class Controller:
    """Everything one controller replica runs: the loop, the lease, the stores the admin API uses."""

    def __init__(
        self,
        settings: ControllerSettings,
        policy: LoadedPolicy | None = None,
        metrics: ControllerMetrics | None = None,
        clock: Callable[[], float] = time.time,
        candidate: LoadedPolicy | None = None,
    ):
        self.settings = settings
        self.started_at = clock()
        self.redis = redis.Redis.from_url(
            settings.redis.url, socket_timeout=settings.redis.timeout_s, socket_connect_timeout=settings.redis.timeout_s
        )
        self.metrics = metrics or ControllerMetrics()
        self.policies = PolicyHolder(policy or load_policy(settings.policy), settings.policy)
        self.store = RateStore(self.redis, settings.loop.rate_ttl_s, settings.loop.decisions_maxlen)
        self.overrides = OverrideStore(self.redis)
        self.decisions = DecisionLog(self.redis, max_scan=max(settings.loop.decisions_maxlen * 2, 10_000))
        self.source = PrometheusSource(settings.prometheus, settings.tier_names)
        self.lease = LeaderLease(self.redis, settings.replica_id, settings.lease)
        self.shadow = ShadowCandidate(settings.candidate, self.metrics, candidate)
        self.loop = ControlLoop(settings, self.store, self.source, self.policies, self.lease, self.metrics, clock, self.shadow)
        self.lease._on_change = self.loop.on_leadership  # noqa: SLF001 - the loop exists only after the lease
        if not settings.lease.enabled:
            self.metrics.is_leader.set(1.0)
        self._scheduler: BackgroundScheduler | None = None
        self._pause_s = settings.loop.tick_interval_s  # the tick job's current interval

    def start(self) -> None:
        """Try the lease once, then start the tick and lease jobs."""
        self.lease.try_acquire_or_renew()
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self._pause_s = self.settings.loop.tick_interval_s
        scheduler.add_job(self._tick, "interval", seconds=self._pause_s, id="tick", next_run_time=_now_plus(0.0))
        if self.lease.enabled:
            scheduler.add_job(self.lease.try_acquire_or_renew, "interval", seconds=self.settings.lease.retry_period_s,
                              id="lease", next_run_time=_now_plus(self.settings.lease.retry_period_s))  # fmt: skip
        if self.settings.candidate.enabled:
            scheduler.add_job(self.shadow.refresh, "interval", seconds=self.settings.candidate.refresh_s, id="candidate",
                              next_run_time=_now_plus(0.0))  # fmt: skip
        self._scheduler = scheduler  # before start: the first tick runs at once and may reschedule itself
        scheduler.start()
        log.info(
            "event=started replica=%s tiers=%d tick_s=%g mode=%s policy=%s leader=%s",
            self.settings.replica_id, len(self.settings.tiers), self.settings.loop.tick_interval_s,
            self.settings.loop.mode, self.policies.current.name, self.lease.is_leader(),
        )  # fmt: skip

    def _tick(self) -> None:
        """One tick, then the tick job moved to the loop's pause (longer while backing off, the interval after)."""
        self.loop.tick()
        pause = self.loop.pause_s
        if pause != self._pause_s and self._scheduler is not None and self._scheduler.running:
            self._scheduler.reschedule_job("tick", trigger="interval", seconds=pause)
            self._pause_s = pause

    @property
    def running(self) -> bool:
        """True while the scheduler runs."""
        return self._scheduler is not None and self._scheduler.running

    def stop(self) -> None:
        """Stop the jobs (waiting for a tick in flight), give the lease up, close connections."""
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        self.lease.release()
        self.source.close()
        self.redis.close()
        log.info("event=stopped replica=%s", self.settings.replica_id)


def _now_plus(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)
