"""The controller's Prometheus metrics (names fixed in docs/contracts.md); pass a registry in tests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

TICK_RESULTS = ("written", "shadow", "follower", "fenced", "failed")
ERROR_STAGES = ("redis_read", "prometheus", "policy", "safety", "redis_write", "overrides", "lease", "model_load", "candidate_load", "candidate", "tick")


class RateGauge(Collector):
    """`ratepilot_controller_rate{tier}` from the last tick's rate array, turned into samples when scraped.

    A Gauge child per tier cost ~10 ms of every 10,000-tier tick; here a tick only swaps two references.
    """

    NAME, HELP = "ratepilot_controller_rate", "Rate decided for the tier, tokens/s"

    def __init__(self) -> None:
        self._latest: tuple[tuple[str, ...], np.ndarray] = ((), np.empty(0))

    def set(self, tiers: Sequence[str], rates: np.ndarray) -> None:
        """Publish the decided rate per tier (replaces the previous tick's)."""
        self._latest = (tuple(tiers), np.array(rates, dtype=np.float64, copy=True))

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The family without samples (registering does not collect)."""
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["tier"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One sample per tier of the last tick."""
        tiers, rates = self._latest
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["tier"])
        for tier, rate in zip(tiers, rates.tolist(), strict=True):
            family.add_metric([tier], rate)
        yield family


class ControllerMetrics:
    """Ticks by result, tick duration, rates written, rule firings, errors by stage, leadership, last tick."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.ticks = Counter("ratepilot_controller_ticks", "Controller ticks by result", ["result"], registry=r)
        self.tick_seconds = Histogram(
            "ratepilot_controller_tick_seconds",
            "Duration of one tick (read, query, decide, write)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.rate = RateGauge()
        r.register(self.rate)
        self.rule_firings = Counter(
            "ratepilot_controller_rule_firings", "Safety rules that fired, by tier", ["tier", "rule"], registry=r
        )
        self.errors = Counter("ratepilot_controller_errors", "Errors by tick stage", ["stage"], registry=r)
        self.is_leader = Gauge("ratepilot_controller_is_leader", "1 while this replica holds the lease", registry=r)
        self.last_tick = Gauge(
            "ratepilot_controller_last_tick_timestamp_seconds", "Unix time of the last completed leader tick", registry=r
        )
        self.tick_pause = Gauge(
            "ratepilot_controller_tick_pause_seconds",
            "Pause before the next tick: loop.tick_interval_s, longer while backing off after failing ticks",
            registry=r,
        )
        self.failing_ticks = Gauge(
            "ratepilot_controller_failing_ticks",
            "Consecutive ticks that could not read Redis or any Prometheus query (0 when the last tick was good)",
            registry=r,
        )
        self.candidate_loaded = Gauge(
            "ratepilot_controller_candidate_loaded", "1 while a candidate policy decides in shadow beside the champion", registry=r
        )
        for result in TICK_RESULTS:
            self.ticks.labels(result)
        for stage in ERROR_STAGES:
            self.errors.labels(stage)

    def record_rates(self, tiers: Sequence[str], rates: np.ndarray) -> None:
        """Publish the decided rate per tier."""
        self.rate.set(tiers, rates)

    def record_rules(self, tiers: Sequence[str], fired: dict[str, np.ndarray]) -> None:
        """Count each fired rule per tier."""
        for rule, mask in fired.items():
            for i in np.flatnonzero(mask):
                self.rule_firings.labels(tiers[int(i)], rule).inc()
