"""The limiter's and the edge's Prometheus metrics, named as in docs/contracts.md.

Every metric is registered on the registry passed in, so tests use a fresh `CollectorRegistry()`.
Per-tier gauges that describe the tier bucket (`ratepilot_tokens_remaining`,
`token_bucket_utilization`) are computed when scraped, from the last decision refilled to now, so an
idle tier drifts back to 0 % in use instead of freezing at its last value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RATE_SOURCES = ("controller", "override", "static", "fallback")
CHECK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class LimiterMetrics:
    """The limiter's metrics (decisions, check latency, tier buckets, rates in force, Redis errors)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.decisions = Counter(
            "ratepilot_decisions", "Rate-limit decisions", ["tier", "outcome", "source"], registry=registry
        )
        self.decision_tokens = Counter(
            "ratepilot_decision_tokens", "Tokens asked by decisions", ["tier", "outcome"], registry=registry
        )
        self.check_seconds = Histogram(
            "ratepilot_check_seconds", "Time to decide one request", buckets=CHECK_BUCKETS, registry=registry
        )
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
            "ratepilot_rate_table_age_seconds", "Seconds since the controller wrote the tier's entry", ["tier"],
            registry=registry,
        )  # fmt: skip
        self.redis_errors = Counter("ratepilot_redis_errors", "Redis failures by kind", ["kind"], registry=registry)

    def watch_tier(self, tier: str, remaining: Callable[[], float], utilization: Callable[[], float]) -> None:
        """Make the tier-bucket gauges of `tier` read the given callables at scrape time."""
        self.tokens_remaining.labels(tier).set_function(remaining)
        self.utilization.labels(tier).set_function(utilization)

    def set_rate(self, tier: str, rate: float, source: str, age_s: float | None) -> None:
        """Publish the rate in force for a tier, its source (one-hot) and the rate-table entry's age."""
        self.refill_rate.labels(tier).set(rate)
        for name in RATE_SOURCES:
            self.rate_source.labels(tier, name).set(1.0 if name == source else 0.0)
        if age_s is not None:
            self.rate_table_age.labels(tier).set(age_s)

    def forget_tier(self, tier: str) -> None:
        """Drop a tier's series after a config reload removed the tier."""
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
            "ratepilot_backend_request_seconds", "Latency of requests the backend served", ["tier"], registry=registry
        )
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
