"""`RateLimitService`: Envoy's `ShouldRateLimit` answered from the limiter's Guard.

Each descriptor of a request becomes one check of its tier's client and aggregate buckets (tier,
client and cost from the `rls:` config, `limiter.rls.settings`); all of a request's checks start in the same
event-loop turn, so the Redis bucket sends them in one EVALSHA. As in envoyproxy/ratelimit, each
descriptor is decided (and charged) on its own and the request is `OVER_LIMIT` when any is.

Per descriptor the reply carries the binding bucket (the one that refused, else the one with fewer
tokens left) as Envoy reads it for its `x-ratelimit-*` headers:

| field                  | value                                                                    |
|------------------------|--------------------------------------------------------------------------|
| `current_limit`        | that bucket's refill rate, as requests per the smallest unit holding ≥ 1 |
| `limit_remaining`      | whole tokens left in it                                                  |
| `duration_until_reset` | OK: seconds until it is full again; OVER_LIMIT: until the cost fits       |

`response_headers_to_add` carries the edge's fields for the most constrained descriptor:
`RateLimit-Policy`, `RateLimit`, and `Retry-After` (whole seconds, ≥ 1) when over the limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from limiter.guard import Guard, Verdict
from limiter.rls.settings import RlsConfig

log = logging.getLogger("ratepilot.rls")

Response = rls_pb2.RateLimitResponse
OK, OVER_LIMIT = Response.Code.OK, Response.Code.OVER_LIMIT
# (seconds per unit, unit): current_limit uses the smallest unit in which the rate is at least 1 request
UNITS = (
    (1, Response.RateLimit.Unit.SECOND),
    (60, Response.RateLimit.Unit.MINUTE),
    (3600, Response.RateLimit.Unit.HOUR),
    (86400, Response.RateLimit.Unit.DAY),
)
MAX_UINT32 = 2**32 - 1


def rate_limit(rate: float, name: str) -> Any:
    """`RateLimit` of a refill rate (tokens/s): requests per the smallest unit holding at least one."""
    for seconds, unit in UNITS:
        per_unit = rate * seconds
        if per_unit >= 1:
            return Response.RateLimit(name=name, requests_per_unit=min(MAX_UINT32, int(per_unit)), unit=unit)
    return Response.RateLimit(name=name, requests_per_unit=1, unit=UNITS[-1][1])


class DescriptorMap:
    """One `rls:` config compiled: descriptor entries -> (tier name, client id)."""

    def __init__(self, config: RlsConfig, guard: Guard):
        self.config = config
        self._guard = guard
        self._rules = [(rule.key, rule.value, rule.tier) for rule in config.rules]
        self._warned: set[str] = set()

    def resolve(self, descriptor: Any, request_cost: float) -> tuple[str, str, float]:
        """(tier, client id, cost) of one descriptor."""
        values = {entry.key: entry.value for entry in descriptor.entries}
        client = values.get(self.config.client_key, "")
        cost = self._cost(values, descriptor, request_cost)
        for key, value, tier in self._rules:
            found = values.get(key)
            if found is not None and (value is None or found == value):
                return tier, client, cost
        if self.config.tier_key is not None:
            named = values.get(self.config.tier_key)
            if named is not None:
                if named in self._guard.tiers:
                    return named, client, cost
                self._warn_once(f"descriptor names unknown tier {named[:64]!r}: charged to the client's tier")
        return self._guard.tier_for(client).name, client, cost

    def _cost(self, values: dict[str, str], descriptor: Any, request_cost: float) -> float:
        """The cost entry, else the descriptor's hits_addend, else the request's; 0 counts as 1 (no check without a charge)."""
        if self.config.cost_key is not None:
            text = values.get(self.config.cost_key)
            if text is not None:
                try:
                    cost = float(text)
                except ValueError:
                    cost = math.nan
                if math.isfinite(cost) and cost > 0:
                    return cost
                self._warn_once(f"descriptor cost {text[:32]!r} is not a positive number: charged its hits_addend")
        if descriptor.HasField("hits_addend"):
            return float(descriptor.hits_addend.value or 1)
        return request_cost

    def _warn_once(self, message: str) -> None:
        if message not in self._warned and len(self._warned) < 1024:
            self._warned.add(message)
            log.warning(message)


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):
    """The servicer: `ShouldRateLimit` over the guard (the rls config is re-read after a hot reload)."""

    def __init__(self, guard: Guard):
        self.guard = guard
        self._map = DescriptorMap(guard.config.rls, guard)

    def _descriptor_map(self) -> DescriptorMap:
        config = self.guard.config.rls
        if config is not self._map.config:
            self._map = DescriptorMap(config, self.guard)
        return self._map

    async def ShouldRateLimit(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802 (gRPC name)
        """Decide every descriptor of the request in one batch; OVER_LIMIT when any is over its limit."""
        mapping = self._descriptor_map()
        config = mapping.config
        if config.domain is not None and request.domain != config.domain:
            return Response(overall_code=OK, statuses=[Response.DescriptorStatus(code=OK) for _ in request.descriptors])
        descriptors = request.descriptors
        if len(descriptors) > config.max_descriptors:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{len(descriptors)} descriptors, more than rls.max_descriptors {config.max_descriptors}"
            )
        request_cost = float(request.hits_addend or 1)
        start_in = self.guard.start_in
        resolve = mapping.resolve
        pending: list[Verdict | asyncio.Future[Verdict]] = [
            start_in(*resolve(descriptor, request_cost)) for descriptor in descriptors
        ]
        verdicts = [item if type(item) is Verdict else await item for item in pending]  # type: ignore[misc]
        return build_response(verdicts)


# Reply parts that repeat from call to call, built once (a tier's rates change rarely).
_limits: dict[tuple[str, float], Any] = {}  # (TIER/bucket, rate) -> RateLimit
_policies: dict[bytes, Any] = {}  # RateLimit-Policy value -> its HeaderValue
CACHE_LIMIT = 4096


def _cached_limit(name: str, rate: float) -> Any:
    limit = _limits.get((name, rate))
    if limit is None:
        if len(_limits) >= CACHE_LIMIT:
            _limits.clear()
        limit = _limits[name, rate] = rate_limit(rate, name)
    return limit


def _policy_header(policy: bytes) -> Any:
    header = _policies.get(policy)
    if header is None:
        if len(_policies) >= CACHE_LIMIT:
            _policies.clear()
        header = _policies[policy] = HeaderValue(key="ratelimit-policy", value=policy.decode())
    return header


def build_response(verdicts: list[Verdict]) -> Any:
    """The reply: one status per descriptor and the RateLimit fields of the most constrained one.

    Built in place (`statuses.add()`, cached parts): half the cost of nested constructor calls."""
    response = Response()
    statuses = response.statuses
    worst: Verdict | None = None
    worst_key: tuple[bool, float] = (True, math.inf)
    worst_retry_s = 0.0
    for verdict in verdicts:
        client_d, tier_d = verdict.decisions  # built once here: Verdict.remaining / retry_after_s would rebuild them
        retry_s = max(client_d.retry_after_s, tier_d.retry_after_s)
        if verdict.allowed:
            binding, name = (client_d, "client") if client_d.remaining <= tier_d.remaining else (tier_d, "tier")
            wait_s = binding.reset_after_s
        else:
            binding, name = (tier_d, "tier") if verdict.limited_by == "tier" else (client_d, "client")
            wait_s = max(1.0, retry_s)
        tier = verdict.tier
        rate = tier.rates.client_rate if name == "client" else tier.rates.rate
        status = statuses.add(code=OK if verdict.allowed else OVER_LIMIT, limit_remaining=min(MAX_UINT32, int(binding.remaining)))
        status.current_limit.CopyFrom(_cached_limit(f"{tier.name}/{name}", rate))
        status.duration_until_reset.seconds = math.ceil(wait_s)
        key = (verdict.allowed, min(client_d.remaining, tier_d.remaining))
        if key < worst_key:
            worst, worst_key, worst_retry_s = verdict, key, retry_s
    response.overall_code = OK if worst_key[0] else OVER_LIMIT
    if worst is not None:
        headers = response.response_headers_to_add
        headers.append(_policy_header(worst.policy_header))
        headers.add(key="ratelimit", value=worst.ratelimit_field().decode())
        if not worst.allowed:
            headers.add(key="retry-after", value=str(max(1, math.ceil(worst_retry_s))))
    return response
