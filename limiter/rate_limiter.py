"""`RateLimiter`: the limiter as a library, mounted in any ASGI app (FastAPI, Starlette) or the edge.

    limiter = RateLimiter("limiter.yaml")             # or a LimiterConfig; a path is hot-reloaded
    app = FastAPI(lifespan=my_lifespan)               # the app's own lifespan still runs
    app.add_middleware(RateLimitMiddleware, limiter=limiter)

The middleware runs the limiter's start-up and shut-down inside the app's lifespan: on
`lifespan.startup` it connects to Redis, loads the script, starts the rate-table reader and the config
watcher, then lets the app's own start-up run; after the app's shut-down has completed it stops them
and closes every connection. A limiter started this way needs nothing else; without an ASGI server that
speaks lifespan, use `async with limiter:`.

What it owns: the `Guard` (tiers, costs, the Redis bucket and the in-process local guard bucket), the
Prometheus metrics (on `registry`), the `RateReader` task and the `ConfigWatcher` task. The per-route
form (`limiter.charge(...)`, a FastAPI dependency) lives in `limiter/dependencies.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import redis.asyncio
from prometheus_client import CollectorRegistry

from limiter.config import ConfigWatcher, LimiterConfig, load_config
from limiter.guard import Guard
from limiter.local_bucket import LocalBucket
from limiter.metrics import LimiterMetrics
from limiter.rate_reader import RateReader
from limiter.redis_bucket import RedisBucket
from limiter.tracing import configured_tracer

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer
    from starlette.requests import Request

log = logging.getLogger("ratepilot.limiter")

RATE_CLIENT_TIMEOUT_S = 1.0  # the rate table is read off the request path; it may wait longer
STOP_TIMEOUT_S = 5.0  # shutdown waits this long for the background tasks
ClientOf = Callable[["Request"], "str | None"]  # the client id of a request (None or "" is anonymous)


class RateLimiter:
    """The limiter's parts and their lifecycle: `await start()` / `await stop()` (or `async with`).

    config: a validated `LimiterConfig`, or a path to `limiter.yaml` (validated as `ratepilot edge`
        does, and re-read every `reload_s` seconds while running: hot reload).
    config_path: the file to re-read for hot reload when `config` is a LimiterConfig loaded from it.
    client: a callable `request -> client id` (e.g. the authenticated user); by default the client id
        is the config's `client_header` (`x-api-key`). None or "" is the anonymous client.
    registry: where the Prometheus metrics go (a fresh `CollectorRegistry` by default).
    tracer_provider: an OpenTelemetry tracer provider for the decision spans; by default the global one
        (`limiter/tracing.py`), looked at when the limiter starts and when its config is reloaded.
    """

    def __init__(
        self,
        config: LimiterConfig | str | os.PathLike[str],
        *,
        config_path: str | os.PathLike[str] | None = None,
        client: ClientOf | None = None,
        registry: CollectorRegistry | None = None,
        reload_s: float = 1.0,
        tracer_provider: Any = None,
    ):
        if isinstance(config, LimiterConfig):
            self.config_path: Path | None = Path(config_path) if config_path is not None else None
        elif isinstance(config, (str, os.PathLike)):
            self.config_path = Path(config)
            config = load_config(self.config_path)  # ConfigError (one line) on a bad file
        else:
            raise TypeError(f"config must be a LimiterConfig or a path to limiter.yaml, got {type(config).__name__}")
        if client is not None and not callable(client):
            raise TypeError("client must be a callable taking the request and returning its client id")
        if not reload_s > 0:
            raise ValueError(f"reload_s must be > 0, got {reload_s!r}")
        self.client = client
        self.reload_s = reload_s
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = LimiterMetrics(self.registry)
        self.guard = Guard(config, None, LocalBucket(), self.metrics)
        self.reader: RateReader | None = None
        self.tracer: Tracer | None = None  # set at start-up when a tracer provider is configured
        self._tracer_provider = tracer_provider
        self._rate_client: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.running = False

    @property
    def config(self) -> LimiterConfig:
        """The config in force (replaced as a whole on a hot reload)."""
        return self.guard.config

    async def start(self) -> None:
        """Connect to Redis, load the script, read the rate table once, start the rate reader and the config watcher.

        Redis being down does not fail the start: requests are decided by the tiers' failure policies
        until it answers. Starting a running limiter does nothing."""
        if self.running:
            return
        self.running = True
        self._stopping = False
        self.tracer = configured_tracer(self._tracer_provider)
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
            await bucket.warm_up(RATE_CLIENT_TIMEOUT_S)  # a cold start takes > 5 ms: not on the first request
        except Exception as exc:
            log.warning("redis not reachable at start-up, deciding by the failure policies: %s", exc)
        self.reader = RateReader(self._rate_client, lambda: self.guard.config, self.guard.apply_rates, self.metrics)
        await self.reader.poll_once()  # the controller's rates before the first check
        self._spawn(self._keep_reading(self.reader))
        if self.config_path is not None:
            self._spawn(self._watch_config(ConfigWatcher(self.config_path, self.guard.config)))

    async def stop(self) -> None:
        """Stop the background tasks and close the Redis connections (the guard falls back after)."""
        if not self.running:
            return
        self.running = False
        self._stopping = True
        if self.reader is not None:
            self.reader.stop()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_S)
        self._tasks.clear()
        bucket = self.guard.redis_bucket
        self.guard.redis_bucket = None
        if isinstance(bucket, RedisBucket):
            await bucket.aclose()
        if self._rate_client is not None:
            await self._rate_client.aclose()
            self._rate_client = None

    async def __aenter__(self) -> RateLimiter:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def run_lifespan(
        self, app: Any, scope: dict[str, Any], receive: Any, send: Any, on_started: Callable[[], None] | None = None
    ) -> None:
        """Serve an ASGI `lifespan` scope for `app`: start before the app's start-up (then call `on_started`),
        stop after its shut-down."""

        async def receive_and_start() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                if on_started is not None:
                    on_started()
            return message

        async def send_and_stop(message: dict[str, Any]) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed", "lifespan.startup.failed"):
                await self.stop()
            await send(message)

        try:
            await app(scope, receive_and_start, send_and_stop)
        finally:
            await self.stop()  # an app without lifespan support raises here; the server then carries on

    async def _keep_reading(self, reader: RateReader) -> None:
        """The rate reader's polls after the one at start-up, every `rate_table.poll_s`."""
        await asyncio.sleep(self.guard.config.rate_table.poll_s)
        await reader.run()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coroutine))

    async def _watch_config(self, watcher: ConfigWatcher) -> None:
        while not self._stopping:
            await asyncio.sleep(self.reload_s)
            try:
                new = watcher.poll()
                if new is not None:
                    self.tracer = configured_tracer(self._tracer_provider)  # before the middleware sees the new config
                    self.guard.apply_config(new)
                    if self.reader is not None:
                        await self.reader.poll_once()  # re-resolve the controller's rates against it
            except Exception:  # the watcher must outlive any surprise
                log.exception("config watcher failed")

    def charge(self, cost: float = 1.0, tier: str | None = None, client: Callable[..., Any] | None = None) -> Any:
        """A FastAPI dependency that charges the route `cost` tokens (in `tier`, else the client's tier);
        see `limiter.dependencies.charge`."""
        from limiter.dependencies import charge

        return charge(self, cost, tier, client)

    def exempt(self) -> Any:
        """A FastAPI dependency marking a route as never limited; see `limiter.dependencies.exempt`."""
        from limiter.dependencies import exempt

        return exempt()
