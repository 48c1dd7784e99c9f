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
from typing import Any, NamedTuple

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from limiter.config import LimiterConfig
from limiter.guard import Guard, Verdict

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
RESOLVED_LIMIT = 65536  # remembered (descriptor, request cost) -> (tier, client, cost)
RESOLVED_MAX_BYTES = 512  # of a remembered descriptor (serialized): the cache stays under ~40 MB


def rate_limit(rate: float, name: str) -> Any:
    """`RateLimit` of a refill rate (tokens/s): requests per the smallest unit holding at least one."""
    for seconds, unit in UNITS:
        per_unit = rate * seconds
        if per_unit >= 1:
            return Response.RateLimit(name=name, requests_per_unit=min(MAX_UINT32, int(per_unit)), unit=unit)
    return Response.RateLimit(name=name, requests_per_unit=1, unit=UNITS[-1][1])


class DescriptorMap:
    """One limiter config's `rls:` section compiled: descriptor entries -> (tier name, client id, cost).

    A descriptor's answer depends only on its bytes, the request's cost and the config, so it is
    remembered per (serialized descriptor, request cost): Envoy sends the same few descriptors over and
    over. The map is rebuilt when the guard's config is replaced (`RateLimitService`)."""

    def __init__(self, config: LimiterConfig, guard: Guard):
        self.limiter_config = config
        self.config = config.rls
        self._guard = guard
        self._rules = [(rule.key, rule.value, rule.tier) for rule in self.config.rules]
        self._warned: set[str] = set()
        self._resolved: dict[tuple[bytes, float], tuple[str, str, float]] = {}

    def resolve(self, descriptor: Any, request_cost: float) -> tuple[str, str, float]:
        """(tier, client id, cost) of one descriptor."""
        data = descriptor.SerializeToString()
        if len(data) > RESOLVED_MAX_BYTES:  # long entries (e.g. a header's value) are not kept
            return self._resolve(descriptor, request_cost)
        key = (data, request_cost)
        resolved = self._resolved.get(key)
        if resolved is None:
            if len(self._resolved) >= RESOLVED_LIMIT:
                self._resolved.clear()
            resolved = self._resolved[key] = self._resolve(descriptor, request_cost)
        return resolved

    def _resolve(self, descriptor: Any, request_cost: float) -> tuple[str, str, float]:
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
        self._map = DescriptorMap(guard.config, guard)

    def _descriptor_map(self) -> DescriptorMap:
        config = self.guard.config
        if config is not self._map.limiter_config:
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
_replies: dict[tuple[Any, ...], Any] = {}  # a one-descriptor reply's fields -> the reply
CACHE_LIMIT = 4096


class StatusFields(NamedTuple):
    """What one descriptor's status says (its binding bucket: the one that refused, else the one with
    fewer tokens left), and how it ranks for the headers."""

    code: int
    limit_name: str  # TIER/client or TIER/tier
    rate: float  # that bucket's refill rate (tokens/s)
    limit_remaining: int
    duration_s: int  # duration_until_reset
    retry_s: float  # seconds until the cost fits in both buckets (0 when allowed)
    rank: tuple[bool, float]  # (allowed, tokens left in the emptier bucket): the smallest is the most constrained


def status_fields(verdict: Verdict) -> StatusFields:
    """The status fields of one descriptor's verdict."""
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
    return StatusFields(
        OK if verdict.allowed else OVER_LIMIT,
        f"{tier.name}/{name}",
        rate,
        min(MAX_UINT32, int(binding.remaining)),
        math.ceil(wait_s),
        retry_s,
        (verdict.allowed, min(client_d.remaining, tier_d.remaining)),
    )


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

    A one-descriptor reply (Envoy's usual request) is remembered by everything it says: a client under
    its limit gets the same tokens left and the same headers call after call. Such a reply is shared
    by the calls that say the same: read it, never change it (grpc only serializes it)."""
    if len(verdicts) != 1:
        return response_of([status_fields(verdict) for verdict in verdicts], verdicts)
    verdict = verdicts[0]
    fields = status_fields(verdict)
    key = (*fields[:6], verdict.policy_header, verdict.ratelimit_field())
    response = _replies.get(key)
    if response is None:
        if len(_replies) >= CACHE_LIMIT:
            _replies.clear()
        response = _replies[key] = response_of([fields], verdicts)
    return response


def response_of(statuses_fields: list[StatusFields], verdicts: list[Verdict]) -> Any:
    """The reply of these statuses, built in place (`statuses.add()`, cached parts): half the cost of
    nested constructor calls."""
    response = Response()
    statuses = response.statuses
    worst: Verdict | None = None
    worst_fields: StatusFields | None = None
    for fields, verdict in zip(statuses_fields, verdicts, strict=True):
        status = statuses.add(code=fields.code, limit_remaining=fields.limit_remaining)
        status.current_limit.CopyFrom(_cached_limit(fields.limit_name, fields.rate))
        status.duration_until_reset.seconds = fields.duration_s
        if worst_fields is None or fields.rank < worst_fields.rank:
            worst, worst_fields = verdict, fields
    response.overall_code = OK if worst_fields is None or worst_fields.rank[0] else OVER_LIMIT
    if worst is not None and worst_fields is not None:
        headers = response.response_headers_to_add
        headers.append(_policy_header(worst.policy_header))
        headers.add(key="ratelimit", value=worst.ratelimit_field().decode())
        if not worst.allowed:
            headers.add(key="retry-after", value=str(max(1, math.ceil(worst_fields.retry_s))))
    return response
