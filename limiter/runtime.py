"""`LimiterRuntime`: a Guard with its Redis bucket, rate-table reader and config watcher, started and stopped together.

What a limiter outside the edge needs (the Envoy rate-limit service, the gRPC interceptor): the same
Lua buckets, tiers, failure policies and adaptive rate table as `ratepilot edge`, so the controller
steers it with no change.

    runtime = LimiterRuntime(load_config(path), config_path=path)
    await runtime.start()          # connect, load the script, first rate poll, watch the file
    verdict = await runtime.guard.decide(...)   # or guard.start_in(tier, client, cost)
    await runtime.stop()

Redis down at start-up is not an error: checks fall back by the tiers' failure policies and the
bucket reconnects on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import redis.asyncio
from prometheus_client import CollectorRegistry

from limiter.config import ConfigWatcher, LimiterConfig
from limiter.guard import Guard
from limiter.local_bucket import LocalBucket
from limiter.metrics import LimiterMetrics
from limiter.node_tasks import NodeTasks
from limiter.rate_reader import RateReader
from limiter.redis_bucket import RedisBucket

log = logging.getLogger("ratepilot.runtime")

RATE_CLIENT_TIMEOUT_S = 1.0  # the rate table is read off the request path; it may wait longer
STOP_TIMEOUT_S = 5.0  # stop() waits this long for the background tasks


class LimiterRuntime:
    """The guard (`runtime.guard`) and the background parts that keep it current."""

    def __init__(
        self,
        config: LimiterConfig,
        config_path: Path | None = None,
        registry: CollectorRegistry | None = None,
        reload_s: float = 1.0,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = LimiterMetrics(self.registry)
        self.guard = Guard(config, None, LocalBucket(), self.metrics)
        self.node_tasks = NodeTasks(self.guard, self.metrics, self.registry)  # heartbeat, local mode's lease sync
        self.config_path = config_path
        self.reload_s = reload_s
        self.reader: RateReader | None = None
        self._rate_client: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Connect to Redis, read the rate table once, then keep polling it and watching the config file."""
        redis_config = self.guard.config.redis
        bucket = RedisBucket.from_url(
            redis_config.url, timeout_s=redis_config.timeout_ms / 1000, cluster=redis_config.cluster,
            chunk=redis_config.chunk,
        )  # fmt: skip
        self.guard.redis_bucket = bucket
        client_class = redis.asyncio.RedisCluster if redis_config.cluster else redis.asyncio.Redis
        self._rate_client = client_class.from_url(
            redis_config.url, socket_timeout=RATE_CLIENT_TIMEOUT_S, socket_connect_timeout=RATE_CLIENT_TIMEOUT_S
        )
        try:
            await bucket.warm_up(RATE_CLIENT_TIMEOUT_S)
        except Exception as exc:  # Redis down at start-up: the limiter still starts and falls back
            log.warning("redis not reachable at start-up, deciding by the failure policies: %s", exc)
        self._stopping.clear()
        self.reader = RateReader(self._rate_client, lambda: self.guard.config, self.guard.apply_rates, self.metrics)
        await self.reader.poll_once()  # the controller's rates before the first check
        self._spawn(self.reader.run())
        self.node_tasks.start(self._rate_client, self._spawn)
        if self.config_path is not None:
            self._spawn(self._watch_config(ConfigWatcher(self.config_path, self.guard.config)))

    async def stop(self) -> None:
        """Stop the background tasks and close the connections."""
        self._stopping.set()
        if self.reader is not None:
            self.reader.stop()
        await self.node_tasks.stop()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_S)
        self._tasks.clear()
        bucket = self.guard.redis_bucket
        if isinstance(bucket, RedisBucket):
            await bucket.aclose()
        if self._rate_client is not None:
            await self._rate_client.aclose()
            self._rate_client = None

    def _spawn(self, coroutine: Any) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coroutine))

    async def _watch_config(self, watcher: ConfigWatcher) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.reload_s)
                return
            try:
                new = watcher.poll()
                if new is not None:
                    self.guard.apply_config(new)
                    if self.reader is not None:
                        await self.reader.poll_once()  # re-resolve the controller's rates against it
            except Exception:  # the watcher must outlive any surprise
                log.exception("config watcher failed")
