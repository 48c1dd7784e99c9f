"""Weighted request costs: tokens by route/method plus a surcharge by body size (pure, no I/O)."""

from __future__ import annotations

from limiter.config import CostsConfig

CACHE_LIMIT = 4096  # distinct (method, path) pairs remembered; unbounded paths must not grow memory


class CostTable:
    """Compiled cost rules; `cost(method, path, content_length)` is the hot-path lookup."""

    __slots__ = ("_rules", "_default", "_bytes_per_token", "_max_extra", "_cache")

    def __init__(self, config: CostsConfig):
        self._rules = config.routes  # first match wins, as the config documents
        self._default = config.default
        self._bytes_per_token = config.payload.bytes_per_token
        self._max_extra = config.payload.max_extra
        self._cache: dict[tuple[str, str], float] = {}

    def route_cost(self, method: str, path: str) -> float:
        """Tokens for a method and path before the size surcharge."""
        key = (method, path)
        cost = self._cache.get(key)
        if cost is None:
            cost = self._match(method, path)
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = cost
        return cost

    def _match(self, method: str, path: str) -> float:
        for rule in self._rules:
            if rule.method not in ("*", method):
                continue
            if rule.path.endswith("*"):
                if path.startswith(rule.path[:-1]):
                    return rule.cost
            elif path == rule.path:
                return rule.cost
        return self._default

    def cost(self, method: str, path: str, content_length: int = 0) -> float:
        """Tokens this request costs: its route's cost plus one per started size unit beyond the first."""
        cost = self._cache.get((method, path))  # route_cost() inlined: this runs for every request
        if cost is None:
            cost = self.route_cost(method, path)
        if self._max_extra and content_length > self._bytes_per_token:
            extra = (content_length - 1) // self._bytes_per_token
            cost += min(float(extra), self._max_extra)
        return cost
