"""`LimiterRuntime`: the name the Envoy rate-limit service and the gRPC interceptor use for `RateLimiter`.

One lifecycle for every way the limiter runs (the edge, a user's ASGI app, rls, gRPC): a guard with its
Redis bucket, rate-table reader and config watcher, started and stopped together
(`limiter/rate_limiter.py`).

    runtime = LimiterRuntime(load_config(path), config_path=path)
    await runtime.start()          # connect, load the script, first rate poll, watch the file
    verdict = await runtime.guard.decide(...)   # or guard.start_in(tier, client, cost)
    await runtime.stop()
"""

from __future__ import annotations

from limiter.rate_limiter import RateLimiter as LimiterRuntime

__all__ = ["LimiterRuntime"]
