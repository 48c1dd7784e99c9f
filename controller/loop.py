"""One tick of the control loop: read the world, query Prometheus, decide, clamp, write, record.

Level-triggered like kubernetes/sample-controller's syncHandler: every tick reads the rate table,
the overrides and the mode fresh from Redis and converges the table on the decision, so a rate key
edited or deleted by hand is put right on the next tick, and running a tick twice is harmless. A
tick never raises: each failing stage is logged as a key-value line, counted in
`ratepilot_controller_errors_total{stage}` and handled so the rates stay safe:

| stage       | on failure                                                       | retried       |
|-------------|------------------------------------------------------------------|---------------|
| redis_read  | nothing is written (the limiters keep the entries until expiry)  | next tick     |
| overrides   | an unparseable entry keeps that tier's last good override         | next tick     |
| prometheus  | the metric is NaN: the safety engine holds, then decays to static | next tick     |
| policy      | raised / NaN / wrong shape: the rate in force is kept             | next tick     |
| redis_write | nothing was written (one script: all tiers or none)              | next tick     |
| lease       | Redis refused the write as fenced: this replica steps down        | lease retries |

A leader tick that could not read Redis (read or write failed) or got no answer to any Prometheus
query is a failing tick; after each one in a row the pause to the next tick doubles, up to
`LoopSettings.backoff_cap_s` (`pause_s`, published as `ratepilot_controller_tick_pause_seconds`
with `ratepilot_controller_failing_ticks`), so a dead dependency is not hammered at the tick rate.
The first good tick (or a follower tick, which touches nothing) restores the configured interval.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from opentelemetry.trace import StatusCode

from controller.decisions import decision_texts
from controller.lease import LeaderLease
from controller.metrics import ControllerMetrics
from controller.overrides import OverrideCaps
from controller.policies import PolicyHolder
from controller.prometheus_source import PrometheusSource
from controller.rate_store import FencedError, RateStore, rates_in_force
from controller.settings import QUERY_NAMES, ControllerSettings
from controller.shadow import ShadowCandidate
from limiter.bucket import MAX_RATE
from limiter.tracing import configured_tracer
from policy.observation import ObservationBuilder
from policy.safety import SafePolicy, SafetyEngine, SafetyResult

log = logging.getLogger("ratepilot.controller.loop")
MAX_TIER_LOG_LINES = 20  # per tick; the decisions stream has every tier
TICK_SPAN = "ratepilot.controller.tick"  # child spans: ratepilot.controller.{redis_read,prometheus,policy,redis_write}
NO_SPAN = nullcontext()


@dataclass(frozen=True)
class TickReport:
    """What one tick did; the last one is served by GET /status."""

    tick: int
    started_at: float  # unix seconds, our clock
    duration_s: float
    result: str  # written, shadow, follower, fenced, failed
    mode: str
    version: int | None = None
    fence: str | None = None
    errors: dict[str, str] = field(default_factory=dict)  # stage -> reason
    decisions: dict[str, str] = field(default_factory=dict, repr=False)  # tier -> decision JSON (as in the stream)

    @property
    def tiers(self) -> dict[str, dict[str, Any]]:
        """Per tier: rate, rule, rules, source, observation, proposed rate and action (parsed on demand)."""
        return {tier: json.loads(text) for tier, text in self.decisions.items()}

    def summary(self) -> dict[str, Any]:
        """The report without the per-tier details."""
        return {k: v for k, v in self.__dict__.items() if k != "decisions"}


class ControlLoop:
    """Holds what a tick needs between ticks: the observation builder's last features and the stale counters."""

    def __init__(
        self,
        settings: ControllerSettings,
        store: RateStore,
        source: PrometheusSource,
        policies: PolicyHolder,
        lease: LeaderLease,
        metrics: ControllerMetrics,
        clock: Callable[[], float] = time.time,
        shadow: ShadowCandidate | None = None,
    ):
        self.settings = settings
        self.tiers = settings.tier_names
        self.store = store
        self.source = source
        self.policies = policies
        self.lease = lease
        self.metrics = metrics
        self._clock = clock
        self.shadow = shadow  # the candidate deciding beside the champion, never written
        self.static = settings.tier_array("static_rate")
        self.burst_s = settings.tier_array("burst_s")
        self.engine = SafetyEngine(settings.safety_limits())
        self.builder = ObservationBuilder(slo_ms=settings.tier_array("slo_ms"), reference_rate=self.static)
        self.override_caps = OverrideCaps()
        self.safe = SafePolicy(policies.current.policy, self.engine)  # the policy in force, clamped
        self._count = 0
        self.tracer = configured_tracer()  # OpenTelemetry: a span per tick when a provider is set (at start-up)
        self._prometheus_down = False  # this tick: every query failed
        self.failing_ticks = 0  # consecutive failing leader ticks
        self.pause_s = settings.loop.tick_interval_s  # before the next tick
        metrics.tick_pause.set(self.pause_s)
        self.last_report: TickReport | None = None
        self.last_leader_report: TickReport | None = None

    def on_leadership(self, leader: bool) -> None:
        """Lease callback: publish leadership; a new term starts from fresh deltas and counters."""
        self.metrics.is_leader.set(1.0 if leader else 0.0)
        if leader:
            self.builder.reset()
            self.safe.inner = self.policies.current.policy
            self.safe.reset()
            if self.shadow is not None:
                self.shadow.reset()

    def tick(self) -> TickReport:
        """Run one tick; never raises."""
        self._count += 1
        started, t0 = self._clock(), time.perf_counter()
        errors: dict[str, str] = {}
        self._prometheus_down = False
        try:
            report = self._traced_tick(started, t0, errors)
        except Exception as exc:  # noqa: BLE001 - the loop must survive anything; the reason is logged and counted
            log.exception("event=tick_crashed tick=%d error=%r", self._count, str(exc))
            self.metrics.errors.labels("tick").inc()
            errors["tick"] = f"{type(exc).__name__}: {exc}"
            report = TickReport(self._count, started, time.perf_counter() - t0, "failed", self.settings.loop.mode, errors=errors)
        self.metrics.ticks.labels(report.result).inc()
        self.metrics.tick_seconds.observe(report.duration_s)
        self.last_report = report
        if report.result != "follower":
            self.last_leader_report = report
        self._pace(report)
        log.log(
            logging.INFO if report.result in ("written", "shadow", "follower") else logging.WARNING,
            "event=tick tick=%d result=%s mode=%s tiers=%d version=%s fence=%s duration_ms=%.1f errors=%s",
            report.tick, report.result, report.mode, len(self.tiers), report.version, report.fence,
            report.duration_s * 1000, json.dumps(report.errors) if report.errors else "{}",
        )  # fmt: skip
        return report

    def _pace(self, report: TickReport) -> None:
        """Set the pause before the next tick: doubled per failing tick in a row, the interval after a good one."""
        failing = report.result == "failed" or self._prometheus_down
        self.failing_ticks = self.failing_ticks + 1 if failing else 0
        self.pause_s = self.settings.loop.pause_after(self.failing_ticks)
        self.metrics.failing_ticks.set(self.failing_ticks)
        self.metrics.tick_pause.set(self.pause_s)
        if failing:
            log.warning("event=tick_backoff tick=%d failing_ticks=%d next_tick_in_s=%.3g", self._count, self.failing_ticks, self.pause_s)

    def _traced_tick(self, started: float, t0: float, errors: dict[str, str]) -> TickReport:
        """`_tick` inside a `ratepilot.controller.tick` span (its stages are child spans) when tracing is on."""
        if self.tracer is None:
            return self._tick(started, t0, errors)
        with self.tracer.start_as_current_span(TICK_SPAN) as span:
            report = self._tick(started, t0, errors)
            span.set_attributes({
                "ratepilot.tick": report.tick, "ratepilot.result": report.result, "ratepilot.mode": report.mode,
                "ratepilot.tiers": len(self.tiers), "ratepilot.version": report.version or 0,
            })  # fmt: skip
            for stage, reason in report.errors.items():
                span.add_event("stage_error", {"ratepilot.stage": stage, "ratepilot.reason": reason})
            if report.result in ("failed", "fenced"):
                span.set_status(StatusCode.ERROR, report.result)
            return report

    def _stage(self, name: str) -> AbstractContextManager[Any]:
        """A child span of the tick for one stage (nothing when tracing is off)."""
        if self.tracer is None:
            return NO_SPAN
        return self.tracer.start_as_current_span(f"ratepilot.controller.{name}")

    def _fail(self, errors: dict[str, str], stage: str, reason: str) -> None:
        errors[stage] = reason
        self.metrics.errors.labels(stage).inc()
        log.warning("event=stage_error tick=%d stage=%s reason=%r", self._count, stage, reason)

    def _tick(self, started: float, t0: float, errors: dict[str, str]) -> TickReport:
        mode: str = self.settings.loop.mode
        if not self.lease.is_leader():
            return TickReport(self._count, started, time.perf_counter() - t0, "follower", mode)
        fence = self.lease.token()
        # the queries run while Redis is read: a tick costs max(Prometheus, Redis read), not the sum
        pending = self.source.start()
        try:
            with self._stage("redis_read"):
                world = self.store.read_world()
        except redis.RedisError as exc:
            self._fail(errors, "redis_read", f"{type(exc).__name__}: {exc}")
            return TickReport(self._count, started, time.perf_counter() - t0, "failed", mode, fence=fence, errors=errors)
        mode = world.mode or mode
        in_force = rates_in_force(world, self.tiers, self.static, self.store.last_written)
        for tier, problem in list(in_force.problems.items())[:MAX_TIER_LOG_LINES]:
            log.info("event=rate_entry_ignored tier=%s reason=%r action=rewrite", tier, problem)
        caps, override_problems = self.override_caps.caps(world.overrides, self.tiers, world.server_now_s)
        if override_problems:
            first = next(iter(override_problems.items()))
            self._fail(errors, "overrides", f"{len(override_problems)} tier(s), e.g. {first[0]}: {first[1]}")

        with self._stage("prometheus"):
            reading = pending.result(in_force.rates)
        self._prometheus_down = len(reading.errors) == len(QUERY_NAMES)
        if reading.errors:
            self._fail(errors, "prometheus", "; ".join(f"{k}: {v}" for k, v in reading.errors.items()))
        observation = self.builder.build(reading.metrics)

        loaded = self.policies.current
        self.safe.inner, self.safe.caps = loaded.policy, caps
        with self._stage("policy"):  # the policy's proposal, clamped by the safety engine
            safety = self.safe.decide(observation)
        if self.safe.last_error is not None:
            self._fail(errors, "policy", f"{loaded.name}: {self.safe.last_error}")
        rates = safety.rates
        bursts = np.clip(rates * self.burst_s, 1.0, MAX_RATE)
        sources = safety.source
        candidate = None if self.shadow is None else self.shadow.decide(observation, caps, self.engine)
        decisions = decision_texts(observation, in_force.rates, safety, mode, loaded.name, world.server_now_s, candidate)

        try:
            with self._stage("redis_write"):
                version, _ = self.store.write(
                    self.lease.replica_id, fence, self.tiers, rates, bursts, sources, decisions, write_rates=(mode == "active")
                )
        except FencedError as exc:
            self._fail(errors, "lease", f"write refused by Redis: {exc}")
            self.lease.step_down(str(exc))
            return TickReport(self._count, started, time.perf_counter() - t0, "fenced", mode, fence=fence, errors=errors)
        except redis.RedisError as exc:
            self._fail(errors, "redis_write", f"{type(exc).__name__}: {exc}")
            return TickReport(self._count, started, time.perf_counter() - t0, "failed", mode, fence=fence, errors=errors)

        self.metrics.record_rates(self.tiers, rates)
        self.metrics.record_rules(self.tiers, safety.fired)
        self.metrics.last_tick.set(self._clock())
        self._log_rules(safety)
        result = "written" if mode == "active" else "shadow"
        return TickReport(
            self._count, started, time.perf_counter() - t0, result, mode, version or None, fence, errors,
            dict(zip(self.tiers, decisions, strict=True)),
        )  # fmt: skip

    def _log_rules(self, safety: SafetyResult) -> None:
        rules = safety.deciding_rule
        logged = 0
        for i, tier in enumerate(self.tiers):
            if rules[i] != "none" and logged < MAX_TIER_LOG_LINES:
                log.info("event=rule_fired tick=%d tier=%s rule=%s rules=%s rate=%.6g", self._count, tier, rules[i],
                         ",".join(safety.fired_rules(i)), safety.rates[i])  # fmt: skip
                logged += 1
