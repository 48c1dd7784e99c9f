"""Token-bucket rate limiting on Redis: atomic Lua check-and-consume, tiers, ASGI middleware, edge app.

The public API, for any FastAPI / Starlette app (see README "Use it in your FastAPI app"):

    from limiter import LimiterConfig, RateLimiter, RateLimitMiddleware, load_config

Loaded on first use (PEP 562), so importing one submodule (`limiter.rate_table`, say) does not pull in
Redis, Starlette and the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from limiter.config import ConfigError, LimiterConfig, load_config
    from limiter.middleware import RateLimited, RateLimitMiddleware
    from limiter.rate_limiter import RateLimiter

__all__ = ["ConfigError", "LimiterConfig", "RateLimitMiddleware", "RateLimited", "RateLimiter", "load_config"]

_HOME = {
    "ConfigError": "limiter.config",
    "LimiterConfig": "limiter.config",
    "load_config": "limiter.config",
    "RateLimitMiddleware": "limiter.middleware",
    "RateLimited": "limiter.middleware",
    "RateLimiter": "limiter.rate_limiter",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'limiter' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
