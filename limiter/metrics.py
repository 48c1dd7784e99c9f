"""The limiter's and the edge's Prometheus metrics, named as in docs/contracts.md.

Every metric is registered on the registry passed in, so tests use a fresh `CollectorRegistry()`.
The per-request metrics (decisions, tokens, check latency) are plain numbers the request path adds to
(`TierCounters`, `LatencyHistogram`: no lock, no label lookup; the edge decides on one event-loop
thread) and a custom collector turns them into Prometheus samples when scraped. Per-tier gauges that describe the tier bucket (`ratepilot_tokens_remaining`,
`token_bucket_utilization`) are computed when scraped, from the last decision refilled to now, so an
idle tier drifts back to 0 % in use instead of freezing at its last value.
"""

from __future__ import annotations

import contextlib
import math
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

RATE_SOURCES = ("controller", "override", "static", "fallback")
OUTCOMES = ("allowed", "throttled")
DECISION_SOURCES = ("redis", "local", "fail_closed", "lease")  # lease: local mode, decided in process
# Backend latency buckets (s): geometric, x1.25 from 5 ms to ~10 s. The controller reads the p99 with
# histogram_quantile, which interpolates linearly inside a bucket; with the default buckets (0.1, 0.25,
# 0.5, ...) an exponential tail whose true p99 is 115 ms reads as ~170 ms and one of 200 ms as ~240 ms,
# so the policy saw its SLO twice as close as it was. Within x1.25 buckets the error stays under ~10 %.
BACKEND_LATENCY_BUCKETS = tuple(float(f"{0.005 * 1.25**k:.3g}") for k in range(35))
CHECK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


# positions in TierCounters.decisions (list indexing is the cheapest count on the request path)
DECISION_KEYS = tuple((outcome, source) for outcome in OUTCOMES for source in DECISION_SOURCES)
DECISION_INDEX = {key: index for index, key in enumerate(DECISION_KEYS)}
ALLOWED_REDIS = DECISION_INDEX["allowed", "redis"]
ALLOWED_LEASE = DECISION_INDEX["allowed", "lease"]
ALLOWED = OUTCOMES.index("allowed")  # position in TierCounters.tokens


class TierCounters:
    """One tier's decisions by (outcome, source), tokens asked by outcome, and refusals a shadow tier let
    through, as plain numbers.

    `decisions[DECISION_INDEX[outcome, source]]`, `tokens[OUTCOMES.index(outcome)]`, `shadow_refusals`.
    """

    __slots__ = ("decisions", "tokens", "shadow_refusals")

    def __init__(self) -> None:
        self.decisions = [0] * len(DECISION_KEYS)
        self.tokens = [0.0] * len(OUTCOMES)
        self.shadow_refusals = 0  # throttled decisions the middleware admitted because the tier is in shadow mode

    def count(self, outcome: str, source: str, tokens: float) -> None:
        """Count one decision and the tokens it asked for."""
        self.decisions[DECISION_INDEX[outcome, source]] += 1
        self.tokens[OUTCOMES.index(outcome)] += tokens


class LatencyHistogram:
    """A histogram the hot path fills with one bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = CHECK_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation (bucket `le` = the first bound >= it)."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (le, observations <= le)."""
        buckets, running = [], 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            buckets.append((bound, float(running)))
        return buckets


class _RequestPathCollector:
    """Exports the plain-number request metrics at scrape time."""

    def __init__(self, tiers: dict[str, TierCounters], latency: LatencyHistogram):
        self._tiers = tiers
        self._latency = latency

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "ratepilot_decisions", "Rate-limit decisions", labels=["tier", "outcome", "source"]
        )
        tokens = CounterMetricFamily("ratepilot_decision_tokens", "Tokens asked by decisions", labels=["tier", "outcome"])
        shadow = CounterMetricFamily(
            "ratepilot_shadow_refusals", "Requests a shadow-mode tier admitted although it would have refused them",
            labels=["tier"],
        )  # fmt: skip
        for tier, counters in list(self._tiers.items()):
            for (outcome, source), count in zip(DECISION_KEYS, counters.decisions, strict=True):
                decisions.add_metric([tier, outcome, source], count)
            for outcome, asked in zip(OUTCOMES, counters.tokens, strict=True):
                tokens.add_metric([tier, outcome], asked)
            shadow.add_metric([tier], counters.shadow_refusals)
        yield decisions
        yield tokens
        yield shadow
        yield HistogramMetricFamily(
            "ratepilot_check_seconds", "Time to decide one request", buckets=self._latency.cumulative(),
            sum_value=self._latency.total,
        )  # fmt: skip


class LimiterMetrics:
    """The limiter's metrics (decisions, check latency, tier buckets, rates in force, Redis errors)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._tier_counters: dict[str, TierCounters] = {}
        self.check_latency = LatencyHistogram()
        registry.register(_RequestPathCollector(self._tier_counters, self.check_latency))  # type: ignore[arg-type]
        self.tokens_remaining = Gauge(
            "ratepilot_tokens_remaining", "Tokens in the tier bucket, refilled to now", ["tier"], registry=registry
        )
        self.utilization = Gauge(
            "token_bucket_utilization",
            "Percent of the tier bucket in use: 100 * (1 - remaining / burst)",
            ["tier"],
            registry=registry,
        )
        self.refill_rate = Gauge("ratepilot_refill_rate", "Tier refill rate in force, tokens/s", ["tier"], registry=registry)
        self.rate_source = Gauge(
            "ratepilot_rate_source", "1 for the source of the tier rate in force", ["tier", "source"], registry=registry
        )
        self.rate_table_age = Gauge(
            "ratepilot_rate_table_age_seconds",
            "Server-clock seconds since the newest controller entry read for the tier was written; +Inf: none read",
            ["tier"],
            registry=registry,
        )
        self.redis_errors = Counter("ratepilot_redis_errors", "Redis failures by kind", ["kind"], registry=registry)

    def tier_counters(self, tier: str) -> TierCounters:
        """The decision counters of a tier (created on first use)."""
        counters = self._tier_counters.get(tier)
        if counters is None:
            counters = self._tier_counters[tier] = TierCounters()
        return counters

    def watch_tier(self, tier: str, remaining: Callable[[], float], utilization: Callable[[], float]) -> None:
        """Make the tier-bucket gauges of `tier` read the given callables at scrape time."""
        self.tokens_remaining.labels(tier).set_function(remaining)
        self.utilization.labels(tier).set_function(utilization)

    def set_rate(self, tier: str, rate: float, source: str, table_age_s: float | None) -> None:
        """Publish the rate in force for a tier, its source (one-hot) and the age of the controller's entry.

        `table_age_s` is the server-clock age of the newest controller entry this limiter has read for
        the tier, whether it is still in force or not (it keeps growing while the tier falls back to
        static rates); None means no entry has been read for the tier yet, exported as +Inf so that the
        staleness alert (`> 30`) fires when the controller has never written the tier.
        """
        self.refill_rate.labels(tier).set(rate)
        for name in RATE_SOURCES:
            self.rate_source.labels(tier, name).set(1.0 if name == source else 0.0)
        self.rate_table_age.labels(tier).set(math.inf if table_age_s is None else table_age_s)

    def forget_tier(self, tier: str) -> None:
        """Drop a tier's series after a config reload removed the tier."""
        self._tier_counters.pop(tier, None)
        for gauge in (self.tokens_remaining, self.utilization, self.refill_rate, self.rate_table_age):
            with contextlib.suppress(KeyError):
                gauge.remove(tier)
        for name in RATE_SOURCES:
            with contextlib.suppress(KeyError):
                self.rate_source.remove(tier, name)


class BackendMetrics:
    """The backend's health as the edge sees it (synthetic backend or a forwarded one)."""

    def __init__(self, registry: CollectorRegistry):
        self.request_seconds = Histogram(
            "ratepilot_backend_request_seconds", "Latency of requests the backend served", ["tier"], registry=registry,
            buckets=BACKEND_LATENCY_BUCKETS,
        )  # fmt: skip
        self.requests = Counter(
            "ratepilot_backend_requests", "Backend requests by outcome", ["tier", "outcome"], registry=registry
        )
        self.cpu_utilization = Gauge(
            "ratepilot_backend_cpu_utilization", "Busy workers / workers of the synthetic backend", registry=registry
        )
        self.capacity_rps = Gauge(
            "ratepilot_backend_capacity_rps", "Nominal capacity of the synthetic backend, cost-1 requests/s",
            registry=registry,
        )  # fmt: skip
