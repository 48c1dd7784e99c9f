"""Play one run: start the stack, drive the load and the backend capacity, sample what the loop does.

Once a second the run sets the synthetic backend's capacity from the schedule, asks Prometheus for
the edge's rate in force, its source and the backend CPU, asks the controller's `/status` which
rule set the rate, checks that every part is still alive, and redraws the live view.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import redis
from rich.console import Console

from controller.decisions import DecisionLog
from ratepilot.demo.loadgen import LoadGenerator, RequestPlan, RunRecord
from ratepilot.demo.schedule import LoadSchedule
from ratepilot.demo.stack import KEY_PREFIX, TIER, Stack, StackSettings, static_rates
from ratepilot.demo.summary import RunSummary, recovery_seconds, summarize, upper_bound_rps, window_stats
from ratepilot.demo.supervisor import Supervisor
from ratepilot.demo.view import LiveView, Sample

DECISIONS_FILE = "decisions.jsonl"  # the controller's decisions of an adaptive run, oldest first (controller/decisions.py)
MAX_DECISIONS = 100_000  # read back at most (a 180 s run with two tiers writes ~80)
CLIENTS = 50  # API keys the load is spread over (each client bucket is far from binding)
ERROR_BUDGET = 0.01  # an interval with more errors than this violates the SLO
PROMQL = (
    '{__name__=~"ratepilot_refill_rate|ratepilot_rate_source|ratepilot_backend_cpu_utilization"}'
)


@dataclass
class Samples:
    """Per-second samples of the loop's state during a run (for the plot)."""

    second: list[int] = field(default_factory=list)  # the schedule's second each sample was taken in
    rate: list[float] = field(default_factory=list)
    capacity: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rule: list[str] = field(default_factory=list)
    tier_rate: dict[str, list[float]] = field(default_factory=dict)  # per tier, the rate in force each second
    load_started_s: float = math.nan  # unix time the load generator started (second 0 of the schedule)


@dataclass
class RunResult:
    """One finished run: its record, summary, samples and where its logs are."""

    mode: str
    record: RunRecord
    summary: RunSummary
    samples: Samples
    workdir: Path


async def _json(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    try:
        async with session.get(url, params=params or None, timeout=aiohttp.ClientTimeout(total=0.8)) as response:
            return await response.json() if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def _edge_state(session: aiohttp.ClientSession, prometheus_url: str) -> tuple[dict[str, float], str, float]:
    """(rate in force per tier, the demo tier's rate source, backend CPU) from Prometheus' latest scrape of the edge."""
    data = await _json(session, f"{prometheus_url}/api/v1/query", query=PROMQL)
    rates: dict[str, float] = {}
    source, cpu = "-", math.nan
    for series in (data or {}).get("data", {}).get("result", []):
        labels, value = series["metric"], float(series["value"][1])
        name = labels.get("__name__")
        if name == "ratepilot_refill_rate" and "tier" in labels:
            rates[labels["tier"]] = value
        elif name == "ratepilot_rate_source" and labels.get("tier") == TIER and value == 1:
            source = labels.get("source", "-")
        elif name == "ratepilot_backend_cpu_utilization":
            cpu = value
    return rates, source, cpu


async def _rule(session: aiohttp.ClientSession, controller_url: str | None) -> str:
    """Which rule set the last rate: the policy, or the safety rule that clamped it."""
    if controller_url is None:
        return "static limiter (no controller)"
    status = await _json(session, f"{controller_url}/status")
    tier = ((status or {}).get("tiers") or {}).get(TIER)
    if not tier:
        return "controller: waiting for the first tick"
    policy = ((status or {}).get("policy") or {}).get("name", "policy")
    rule = tier.get("rule") or "none"
    return f"policy ({policy})" if rule == "none" else f"safety rule: {rule}"


async def _drive(
    stack: Stack, supervisor: Supervisor, schedule: LoadSchedule, arrivals: np.ndarray, view: LiveView,
    slo_ms: float, plan: RequestPlan | None,
) -> tuple[RunRecord, Samples]:  # fmt: skip
    samples = Samples()
    stop = asyncio.Event()
    failure: list[BaseException] = []
    generator = LoadGenerator(stack.edge_url, clients=CLIENTS, key_prefix=KEY_PREFIX)
    assert stack.prometheus is not None
    prometheus_url = stack.prometheus.url
    controller_url = stack.controller.url if stack.controller is not None else None

    async with aiohttp.ClientSession() as session:
        capacity_now = [math.nan]

        async def set_capacity(second: int) -> None:
            wanted = float(schedule.capacity_rps[min(second, schedule.duration_s - 1)])
            if wanted != capacity_now[0]:
                async with session.post(f"{stack.edge_url}/admin/backend", json={"capacity_rps": wanted}) as response:
                    if response.status != 200:
                        raise RuntimeError(f"edge refused capacity {wanted:g}: HTTP {response.status}")
                capacity_now[0] = wanted

        await set_capacity(0)

        async def sample(second: int, record: RunRecord) -> None:
            try:
                supervisor.check()
                await set_capacity(second)
                (rates, source, cpu), rule = await asyncio.gather(
                    _edge_state(session, prometheus_url), _rule(session, controller_url)
                )
            except Exception as exc:  # a dead part or a refused request ends the run
                failure.append(exc)
                stop.set()
                return
            for tier in static_rates(stack.settings):
                samples.tier_rate.setdefault(tier, []).append(rates.get(tier, math.nan))
            rate = float(sum(rates.get(tier, math.nan) for tier in static_rates(stack.settings)))  # all tiers' rates
            samples.second.append(second)
            samples.rate.append(rate)
            samples.capacity.append(capacity_now[0])
            samples.cpu.append(cpu)
            samples.rule.append(rule)
            stats = window_stats(record, float(second))
            index = min(second, schedule.duration_s - 1)
            view.show(
                Sample(
                    second=second, duration_s=schedule.duration_s, phase=schedule.phase_at(second),
                    demand_rps=float(schedule.demand_rps[index]), sent_rps=stats["sent_rps"],
                    admitted_rps=stats["ok_rps"], throttled_rps=stats["throttled_rps"], error_rps=stats["error_rps"],
                    p99_ms=stats["p99_ms"], slo_ms=slo_ms, cpu=cpu, capacity_rps=capacity_now[0], rate=rate,
                    rate_source=source, rule=rule,
                )
            )  # fmt: skip

        sampler: set[asyncio.Task[None]] = set()

        def on_second(second: int, record: RunRecord) -> None:
            if not sampler:  # never let samples pile up behind a slow one
                task = asyncio.get_running_loop().create_task(sample(second, record))
                sampler.add(task)
                task.add_done_callback(sampler.discard)

        samples.load_started_s = time.time()
        record = await generator.run(arrivals, on_second=on_second, stop=stop, plan=plan)
        if sampler:
            await asyncio.wait(sampler, timeout=2)
    if failure:
        raise failure[0]
    return record, samples


def save_decisions(redis_url: str, path: Path) -> int:
    """Write the controller's decisions stream (one JSON per tier per tick, oldest first) to `path`; returns how many."""
    client = redis.Redis.from_url(redis_url)
    try:
        decisions = DecisionLog(client).recent(limit=MAX_DECISIONS)
    finally:
        client.close()
    path.write_bytes(b"".join(orjson.dumps(decision) + b"\n" for decision in reversed(decisions)))
    return len(decisions)


def play(
    mode: str, workdir: Path, settings: StackSettings, schedule: LoadSchedule, arrivals: np.ndarray, console: Console,
    plan: RequestPlan | None = None,
) -> RunResult:  # fmt: skip
    """Run the whole stack for one mode ('adaptive' or 'static'); everything is stopped on return or error.

    `plan` says which request and API key each arrival uses (the scenario's mixes); None: GET with the demo keys.
    """
    supervisor = Supervisor()
    with supervisor:
        stack = Stack(workdir, settings, adaptive=(mode == "adaptive"), supervisor=supervisor)
        console.print(f"[bold]{mode} run[/]: starting redis-server, edge, Prometheus" + (", controller" if stack.adaptive else "") + f" (logs in {workdir})")
        stack.start()
        with LiveView(console, f"ratepilot demo: {mode} run") as view:
            record, samples = asyncio.run(_drive(stack, supervisor, schedule, arrivals, view, settings.slo_ms, plan))
        if stack.adaptive and stack.redis is not None:
            save_decisions(stack.redis.url, workdir / DECISIONS_FILE)
    bound = upper_bound_rps(schedule.demand_rps, schedule.capacity_rps)
    # a static limiter's rate never moves: "recovered" would say nothing about it
    recovery = recovery_seconds(np.array(samples.second), np.array(samples.rate), schedule.capacity_rps) if stack.adaptive else math.nan
    summary = summarize(record, float(schedule.duration_s), settings.slo_ms, ERROR_BUDGET, bound, recovery)
    return RunResult(mode, record, summary, samples, workdir)
