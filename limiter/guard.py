"""The per-request decision: tier lookup, weighted cost, client + tier bucket in one atomic check.

`Guard.decide()` never raises because Redis is gone. When the Redis bucket cannot decide (down,
hung past its timeout, backing off) the tier's failure policy applies:

- `fail_open`: the in-process `LocalBucket` decides with the same rates times the node's share
  (1 / live edge nodes, or a fixed `local_guard.fraction`), so a dead Redis never means unlimited;
- `fail_closed`: the request is refused (429, `Retry-After: 1`).

Nothing needs resetting when Redis returns: the next check that gets through uses Redis again (the
Redis bucket's back-off decides when to probe).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from limiter.bucket import MICRO, BucketError, BucketSpec, Decision
from limiter.check_encoding import (
    CheckTemplate,
    EncodedCheck,
    RawOutcome,
    check_template,
    keys_resp,
)
from limiter.config import LimiterConfig
from limiter.costs import CostTable
from limiter.leases import SyncItem
from limiter.local_mode import NodeShare, local_fraction
from limiter.metrics import ALLOWED, ALLOWED_REDIS, LimiterMetrics
from limiter.pending_checks import Resolver
from limiter.rate_reader import TierRates, static_rates
from limiter.verdict import FieldParts, Verdict, refused

log = logging.getLogger("ratepilot.guard")
_new_tuple = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (hot path)

MAX_CLIENT_ID = 128  # longer API keys are hashed into the bucket key
TIER_CACHE_LIMIT = 65536  # remembered client -> tier lookups
TEMPLATE_CACHE_LIMIT = 256  # distinct request costs remembered per tier
FAIL_CLOSED_RETRY_S = 1.0


class AsyncBucket(Protocol):
    """What the guard needs of the Redis bucket (limiter.redis_bucket.RedisBucket)."""

    def submit_to(self, check: EncodedCheck, future: asyncio.Future[Any], resolve: Resolver | None, context: Any) -> None:
        """Queue an atomic all-or-nothing check-and-consume; `resolve(future, context, outcome)` settles the future."""
        ...


class SyncBucket(Protocol):
    """What the guard needs of the local guard bucket."""

    def check(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> tuple[bool, list[Decision]]:
        """Atomic all-or-nothing check-and-consume."""
        ...


def client_key(tier: str, client: str) -> str:
    """Redis key of a client's bucket in a tier (`rp:{TIER}:c:CLIENT`; anonymous is the empty client)."""
    return f"rp:{{{tier}}}:c:{client}"


def tier_key(tier: str) -> str:
    """Redis key of a tier's aggregate bucket."""
    return f"rp:{{{tier}}}:tier"


def policy_header(rates: TierRates) -> bytes:
    """`RateLimit-Policy` value (draft-ietf-httpapi-ratelimit-headers): quota = burst, window = time to refill it."""
    client_w = max(1, round(rates.client_burst / rates.client_rate))
    tier_w = max(1, round(rates.burst / rates.rate))
    return (
        f'"client";q={int(rates.client_burst)};w={client_w}, "tier";q={int(rates.burst)};w={tier_w}'
    ).encode()


class TierRuntime:
    """A tier's precomputed request-path state: specs in force, keys, header bytes, metric children."""

    __slots__ = (
        "name", "failure_policy", "rates", "specs", "local_specs", "tier_key", "client_prefix",
        "policy_header", "counters", "clock", "last_remaining", "last_time", "templates", "field_parts",
        "local", "max_cost", "local_fraction",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        failure_policy: str,
        rates: TierRates,
        local_fraction: float,
        metrics: LimiterMetrics,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.name = name
        self.failure_policy = failure_policy
        self.tier_key = tier_key(name)
        self.client_prefix = client_key(name, "")
        self.counters = metrics.tier_counters(name)
        self.clock = clock  # the guard's: last_time is a reading of it
        self.last_remaining = rates.burst
        self.last_time = clock()
        self.local = False  # mode: local (decided from this node's leases: limiter.local_mode)
        self.max_cost = 0.0  # the largest request cost: a local-guard burst never drops below it
        self.set_rates(rates, local_fraction)

    def set_rates(self, rates: TierRates, local_fraction: float) -> None:
        """Switch to new rates (the bucket state carries over: only the refill changes)."""
        self.rates = rates
        self.specs = [BucketSpec(rates.client_rate, rates.client_burst), BucketSpec(rates.rate, rates.burst)]
        self.set_local_fraction(local_fraction)
        self.policy_header = policy_header(rates)
        self.templates: dict[float, CheckTemplate] = {}  # cost -> its encoded check (for these specs)
        self.field_parts: FieldParts = ({}, {})  # RateLimit field parts by tokens µt, client and tier bucket

    def set_local_fraction(self, fraction: float) -> None:
        """The fail-open local guard's share of every rate and burst (a burst at least the largest cost)."""
        self.local_fraction = fraction
        self.local_specs = [
            BucketSpec(s.rate * fraction, max(s.capacity * fraction, min(s.capacity, self.max_cost))) for s in self.specs
        ]

    def template(self, cost: float) -> CheckTemplate:
        """The encoded check of `cost` on this tier's buckets; raises BucketError if no bucket can hold it."""
        template = self.templates.get(cost)
        if template is None:
            template = check_template(self.specs, cost)
            if len(self.templates) >= TEMPLATE_CACHE_LIMIT:
                self.templates.clear()
            self.templates[cost] = template
        return template

    def remaining_now(self) -> float:
        """Tier-bucket tokens: the last decision's remainder refilled to now (scrape time)."""
        elapsed = self.clock() - self.last_time
        return min(self.rates.burst, self.last_remaining + self.rates.rate * elapsed)

    def utilization_now(self) -> float:
        """Percent of the tier bucket in use now."""
        return 100.0 * (1.0 - self.remaining_now() / self.rates.burst)


class PreparedCheck(NamedTuple):
    """A route's check of one cost, encoded once: what goes to Redis and what the resolver needs of it."""

    check: EncodedCheck
    context: tuple[Any, ...]  # (tier, client, keys, cost, buckets, field parts): Guard._resolve unpacks it


class Route(NamedTuple):
    """What an API key resolves to, cached per raw header value (dropped when a tier's rates change)."""

    tier: TierRuntime
    client: str
    keys: list[str]  # [client bucket key, tier bucket key]
    keys_resp: bytes  # their RESP bytes
    prepared: dict[float, PreparedCheck]  # by request cost


class Guard:
    """Decides requests: `await guard.decide(client_id, method, path, content_length) -> Verdict`.

    `guard.config` is the config in force (replaced as a whole by `apply_config`).
    """

    def __init__(
        self,
        config: LimiterConfig,
        redis_bucket: AsyncBucket | None,
        local_bucket: SyncBucket,
        metrics: LimiterMetrics,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.redis_bucket = redis_bucket  # set or replaced by the edge at start-up
        self._local = local_bucket
        self._metrics = metrics
        self._clock = clock
        self._latency = metrics.check_latency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tiers: dict[str, TierRuntime] = {}
        self._tier_cache: dict[str, TierRuntime] = {}
        self._routes: dict[bytes | tuple[str, str], Route] = {}  # API key, or (tier, client) for start_in()
        self.nodes = NodeShare(self._latency, clock)  # many edge nodes: the live count, local mode's leases
        self.apply_config(config)

    @property
    def tiers(self) -> dict[str, TierRuntime]:
        """Tier name -> its runtime state."""
        return self._tiers

    def apply_config(self, config: LimiterConfig) -> None:
        """Switch to a new validated config; tiers that stay keep their controller rates."""
        fraction = local_fraction(config, self.nodes.live_nodes)
        max_cost = config.costs.max_cost()
        tiers: dict[str, TierRuntime] = {}
        for name, tier in config.tiers.items():
            old = self._tiers.get(name)
            if old is not None and old.rates.source in ("controller", "override"):
                rates = old.rates  # the next rate poll re-resolves against the new config
            else:
                rates = static_rates(tier)
            runtime = old or TierRuntime(name, tier.failure_policy, rates, fraction, self._metrics, self._clock)
            runtime.failure_policy = tier.failure_policy
            runtime.local, runtime.max_cost = tier.mode == "local", max_cost
            runtime.set_rates(rates, fraction)
            self.nodes.respec(runtime)
            tiers[name] = runtime
            if old is None:
                self._metrics.watch_tier(name, runtime.remaining_now, runtime.utilization_now)
                self._metrics.set_rate(name, rates.rate, rates.source, rates.age_s)
        for name in set(self._tiers) - set(tiers):
            self._metrics.forget_tier(name)
        self.config = config
        self._costs = CostTable(config.costs)
        self._cost = self._costs.cost
        self._clients = dict(config.clients)
        self._prefixes = sorted(
            ((prefix, tiers[name]) for name, tier in config.tiers.items() for prefix in tier.key_prefixes),
            key=lambda item: -len(item[0]),  # longest prefix wins
        )
        self._default = tiers[config.default_tier]
        self._anonymous = tiers[config.anonymous_tier or config.default_tier]
        self._tiers = tiers
        self._tier_cache = {}
        self._routes = {}

    def apply_rates(self, rates: dict[str, TierRates]) -> None:
        """Switch tiers to the rates the rate reader resolved (unknown tiers are ignored)."""
        fraction = local_fraction(self.config, self.nodes.live_nodes)
        for name, tier_rates in rates.items():
            runtime = self._tiers.get(name)
            if runtime is not None and tier_rates != runtime.rates:
                runtime.set_rates(tier_rates, fraction)
                self.nodes.respec(runtime)
                self._routes = {}  # their encoded checks carry the old rates

    def set_live_nodes(self, live_nodes: int) -> None:
        """The live edge-node count (limiter.membership): every tier's fail-open share becomes
        1 / live_nodes, unless `local_guard.fraction` fixes it."""
        self.nodes.live_nodes = live_nodes
        fraction = local_fraction(self.config, live_nodes)
        for runtime in self._tiers.values():
            runtime.set_local_fraction(fraction)

    def leases_synced(self, items: Sequence[SyncItem], tokens_left: Sequence[int]) -> None:
        """A lease sync's answer (limiter.lease_sync): local tiers' gauges follow their Redis tier bucket."""
        self.nodes.synced(self._tiers.values(), items, tokens_left)

    def tier_for(self, client: str) -> TierRuntime:
        """The tier of an API key: exact client entry, else longest key prefix, else the default tier."""
        if not client:
            return self._anonymous
        runtime = self._tier_cache.get(client)
        if runtime is None:
            name = self._clients.get(client)
            if name is not None:
                runtime = self._tiers[name]
            else:
                runtime = next((t for prefix, t in self._prefixes if client.startswith(prefix)), self._default)
            if len(self._tier_cache) >= TIER_CACHE_LIMIT:
                self._tier_cache.clear()
            self._tier_cache[client] = runtime
        return runtime

    def cost(self, method: str, path: str, content_length: int = 0) -> float:
        """Tokens a request costs."""
        return self._costs.cost(method, path, content_length)

    def _route(self, key: bytes) -> Route:
        """An API key's tier, client id, bucket keys, their RESP bytes and its encoded checks by cost (cached
        per raw header value; dropped when a tier's rates change)."""
        route = self._routes.get(key)
        if route is None:
            client = key.decode("latin-1").strip()
            tier = self.tier_for(client)
            bucket_client = client if len(client) <= MAX_CLIENT_ID else hashlib.sha256(client.encode()).hexdigest()
            keys = [tier.client_prefix + bucket_client, tier.tier_key]
            route = Route(tier, client, keys, keys_resp(keys), {})
            if len(self._routes) >= TIER_CACHE_LIMIT:
                self._routes.clear()
            self._routes[key] = route
        return route

    async def decide(self, client: str, method: str, path: str, content_length: int = 0) -> Verdict:
        """Check and consume the request's cost from its client and tier buckets; never raises on Redis."""
        try:
            key = client.encode("latin-1")  # what an HTTP header decodes from
        except UnicodeEncodeError:
            key = client.encode()  # not from a header: a stable key all the same
        pending = self.start(key, method, path, content_length)
        return pending if type(pending) is Verdict else await pending  # type: ignore[misc]

    def start(self, key: bytes, method: str, path: str, content_length: int = 0) -> Verdict | asyncio.Future[Verdict]:
        """decide() without a coroutine, for the middleware's hot path: the Verdict when it is known at once
        (Redis backing off or absent, a cost no bucket holds), else a future that gets it (never an
        exception). `key` is the API-key header as it came (b"" is anonymous)."""
        started = self._clock()
        route = self._routes.get(key)
        if route is None:
            route = self._route(key)
        return self._submit(route, self._cost(method, path, content_length), started)

    def _submit(self, route: Route, cost: float, started: float) -> Verdict | asyncio.Future[Verdict]:
        """A route's check of `cost`: decided in process (local mode, a failure), or sent to the Redis bucket."""
        try:
            prepared = route.prepared.get(cost)
            if prepared is None:
                prepared = self._prepare(route, cost)
            if route.tier.local:  # mode: local decides in process when this node's leases can
                verdict = self.nodes.decide(prepared.context, started)
                if verdict is not None:
                    return verdict
            bucket = self.redis_bucket
            if bucket is None:
                raise ConnectionError("no Redis bucket configured")
            loop = self._loop
            if loop is None:  # asyncio.get_running_loop() costs a getpid() system call on Python 3.11
                loop = self._loop = asyncio.get_running_loop()
            future: asyncio.Future[Verdict] = loop.create_future()
            bucket.submit_to(prepared.check, future, self._resolve, (prepared.context, started))
        except BucketError as exc:
            return self._refuse_cost(route.tier, route.client, cost, exc, started)
        except Exception as exc:  # Redis down, hung or refusing: the tier's failure policy decides
            return self._fall_back(route.tier, route.client, route.keys, cost, exc, started)
        return future

    # -- checks by a known tier, client and cost (Envoy's rate-limit service, the gRPC interceptor) --

    def start_in(self, tier: str, client: str, cost: float) -> Verdict | asyncio.Future[Verdict]:
        """start() for a caller that already knows the tier (a configured name), the client id and the
        cost: no header, tier or cost lookup. Checks started in one event-loop turn share one EVALSHA."""
        started = self._clock()
        route = self._routes.get((tier, client))
        if route is None:
            runtime = self._tiers[tier]
            bucket_client = client if len(client) <= MAX_CLIENT_ID else hashlib.sha256(client.encode()).hexdigest()
            keys = [runtime.client_prefix + bucket_client, runtime.tier_key]
            route = Route(runtime, client, keys, keys_resp(keys), {})
            if len(self._routes) >= TIER_CACHE_LIMIT:
                self._routes.clear()
            self._routes[tier, client] = route
        return self._submit(route, cost, started)

    @staticmethod
    def _prepare(route: Route, cost: float) -> PreparedCheck:
        """A route's encoded check of `cost` and what the resolver needs of it; raises BucketError if no bucket holds it."""
        tier, client, keys, resp, prepared = route
        template = tier.template(cost)
        if len(prepared) >= TEMPLATE_CACHE_LIMIT:
            prepared.clear()
        argv, buckets, argv_resp = template
        context = (tier, client, keys, cost, buckets, tier.field_parts)
        entry = prepared[cost] = PreparedCheck(_new_tuple(EncodedCheck, (keys, argv, buckets, argv_resp, resp)), context)
        return entry

    def _resolve(self, future: asyncio.Future[Verdict], context: tuple[Any, ...], outcome: RawOutcome | Exception) -> None:
        """The Redis bucket's answer for one check: its Verdict to the request's future (never raises)."""
        (tier, client, keys, cost, buckets, parts), started = context
        if type(outcome) is not tuple:
            future.set_result(self._fall_back(tier, client, keys, cost, outcome, started))  # type: ignore[arg-type]
            return
        allowed, tokens, _ = outcome
        now = self._clock()
        tier.last_remaining = tokens[1] / MICRO  # the tier bucket's µt
        tier.last_time = now
        counters = tier.counters
        if allowed:
            counters.decisions[ALLOWED_REDIS] += 1
            counters.tokens[ALLOWED] += cost
            verdict: Verdict = _new_tuple(
                Verdict, (True, tier, client, cost, "redis", None, None, tokens, buckets, tier.policy_header, parts)
            )
        else:
            verdict = refused(tier, client, cost, "redis", tokens, buckets, parts)
        latency = self._latency  # LatencyHistogram.observe, inlined
        latency.counts[bisect_left(latency.bounds, now - started)] += 1
        latency.total += now - started
        future.set_result(verdict)

    def _fall_back(self, tier: TierRuntime, client: str, keys: list[str], cost: float, exc: Exception, started: float) -> Verdict:
        """Redis could not decide: fail_closed refuses, fail_open asks the local guard bucket."""
        self._metrics.redis_errors.labels(type(exc).__name__).inc()
        if tier.failure_policy == "fail_closed":
            source = "fail_closed"
            allowed, decisions = False, self._closed_decisions(tier)
        else:
            source = "local"
            try:
                allowed, decisions = self._local.check(keys, tier.local_specs, cost)
            except BucketError as local_exc:
                return self._refuse_cost(tier, client, cost, local_exc, started)
        limited_by = None
        if not allowed:
            if source == "fail_closed":
                limited_by = "redis_unavailable"
            else:
                client_d, tier_d = decisions
                limited_by = "client" if client_d.retry_after_s >= tier_d.retry_after_s else "tier"
        now = self._clock()
        tier.last_remaining = decisions[1].remaining  # the tier bucket's
        tier.last_time = now
        tier.counters.count("allowed" if allowed else "throttled", source, cost)
        self._latency.observe(now - started)
        return Verdict(allowed, tier, client, cost, source, decisions, limited_by)

    def _closed_decisions(self, tier: TierRuntime) -> list[Decision]:
        return [
            Decision(False, 0.0, FAIL_CLOSED_RETRY_S, FAIL_CLOSED_RETRY_S, spec.capacity, "fail_closed")
            for spec in tier.specs
        ]

    def _refuse_cost(self, tier: TierRuntime, client: str, cost: float, exc: Exception, started: float) -> Verdict:
        """A cost no bucket can hold (rates changed under a cost rule): refuse, log, never raise."""
        log.error("request cost %g cannot pass tier %s: %s", cost, tier.name, exc)
        tier.counters.count("throttled", "redis", cost)
        self._latency.observe(self._clock() - started)
        decisions = [Decision(False, 0.0, FAIL_CLOSED_RETRY_S, 0.0, spec.capacity, "redis") for spec in tier.specs]
        return Verdict(False, tier, client, cost, "redis", decisions, "cost")
