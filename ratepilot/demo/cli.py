"""`ratepilot demo`: the whole closed loop on this machine, then the same load with a static limiter.

    ratepilot demo [--duration S] [--scenario NAME|FILE | --trace FILE] [--scale X] [--no-compare] [--json FILE] [--out DIR]
                   [--policy NAME] [--model PATH] [--slo-ms MS] [--seed N]

Starts a redis-server, the edge with its synthetic backend, Prometheus (1 s scrapes) and the
controller with the committed default policy on free local ports, plays the scenario with an
open-loop load generator while a live view shows the loop (a load scenario of
`ratepilot loadtest`, `demo` by default, or a trace), then (unless --no-compare) plays the same
arrivals against a static limiter and prints the side-by-side table and the plot's path.

Two tiers share the backend: the scenario's `gold_` keys are the top-priority tier `gold`, the
`demo_` keys the tier `demo` (`--one-tier`, a trace or a scenario without `gold_` keys: a single
tier for all keys, so no idle tier holds a share of the rate). A second table and
`demo-tiers.png` show each tier's share of requests served within the SLO, whole run and during the
lowest-capacity phase.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from rich.console import Console

from limiter.paths import check_outputs
from ratepilot.demo.report import comparison_table, plot, write_json
from ratepilot.demo.run import DECISIONS_FILE, ERROR_BUDGET, RunResult, play
from ratepilot.demo.schedule import (
    DEFAULT_DURATION_S,
    DEFAULT_SCENARIO,
    LoadSchedule,
    arrival_times,
    auto_scale,
    clip_demand,
    peak_budget_rps,
    scenario_schedule,
    trace_scenario,
)
from ratepilot.demo.simulated import Simulated, comparison_plot, read_decisions, simulate_demo
from ratepilot.demo.stack import PRIORITY, TIER, TOP_PREFIX, StackSettings, tier_prefixes
from ratepilot.demo.supervisor import PartFailed, log_tail
from ratepilot.demo.tiers import request_tiers, tier_plot, tier_reports, tier_table
from ratepilot.loadtest.plan import request_plan
from ratepilot.loadtest.scenario import Scenario, load_scenario, scenario_names
from ratepilot.servers import ServerError, find_binary
from training.traces import TraceError

MEAN_SERVICE_S = 0.025  # mean service time of the synthetic backend: idle p99 ~ 115 ms, well under the SLO


def positive_number(kind: type) -> Callable[[str], Any]:
    """An argparse type: `kind(text)`, refused unless finite and > 0."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The `ratepilot demo` argument parser."""
    parser = argparse.ArgumentParser(prog="ratepilot demo", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=positive_number(int), help=f"seconds to play (default {DEFAULT_DURATION_S}; a trace is cut to it)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--scenario", default=DEFAULT_SCENARIO,
                        help=f"load scenario: a name ({', '.join(scenario_names())}) or a YAML file (default {DEFAULT_SCENARIO})")  # fmt: skip
    source.add_argument("--trace", type=Path, help="replay a trace CSV (t_s,demand_rps[,capacity_rps]) instead of a scenario")
    parser.add_argument("--scale", type=positive_number(float), help="demo requests/s per scenario request/s (default: fit this machine)")
    parser.add_argument("--no-compare", action="store_true", help="skip the second run with a static limiter")
    parser.add_argument("--json", type=Path, metavar="FILE", help='write {"adaptive": {...}, "static": {...}} here')
    parser.add_argument("--out", type=Path, help="folder for logs, configs and the plot (default demo-output/run-TIME)")
    parser.add_argument("--policy", default="rl", help="controller policy: rl (default) or a baseline (aimd, pid, ...)")
    parser.add_argument("--model", help="rl model file (default: the committed default policy)")
    parser.add_argument("--slo-ms", type=positive_number(float), default=300.0, help="p99 latency SLO (default 300)")
    parser.add_argument("--tick-interval", type=positive_number(float), default=5.0, help="controller tick, s (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrivals and the backend's service times")
    parser.add_argument("--one-tier", action="store_true", help="one tier for every key (default: gold above demo, by priority, when the scenario has gold_ keys)")
    return parser


def build_schedule(args: argparse.Namespace, cores: int) -> tuple[LoadSchedule, float]:
    """The scaled schedule and the scale used; TraceError / ValueError on bad input."""
    duration = args.duration or DEFAULT_DURATION_S
    scenario = None if args.trace else load_scenario(args.scenario)
    if scenario is not None and args.duration is None and scenario.name != DEFAULT_SCENARIO:
        duration = scenario.duration_s  # another scenario plays as written unless --duration stretches it

    def schedule_at(scale: float) -> LoadSchedule:
        if scenario is None:
            return trace_scenario(args.trace, scale, duration)
        return scenario_schedule(scenario, duration, scale)

    unit = schedule_at(1.0)
    scale = args.scale or auto_scale(unit.peak_demand_rps, cores)
    schedule = schedule_at(scale)
    if args.scale is None and schedule.peak_demand_rps > peak_budget_rps(cores) * 1.001:
        schedule = clip_demand(schedule, peak_budget_rps(cores))
    return schedule, scale


def simulated_beside(console: Console, adaptive: RunResult, schedule: LoadSchedule, settings: StackSettings, out: Path) -> Simulated:
    """The same schedule, policy and safety engine in the simulator: its figures, and its ticks beside the real loop's."""
    simulated = simulate_demo(schedule, settings)
    recovery = "not within the run" if math.isnan(simulated.recovery_s) else f"{simulated.recovery_s:.0f} s"
    console.print(
        f"simulator, same schedule, policy and safety engine: goodput / upper bound {simulated.goodput_ratio:.3f}, "
        f"SLO-violating intervals {simulated.slo_violation_frac:.0%}, back to 90 % of capacity after the cut: {recovery}",
        highlight=False,
    )
    decisions = adaptive.workdir / DECISIONS_FILE
    if decisions.is_file():
        real = read_decisions(decisions, TIER, adaptive.samples.load_started_s)
        png = comparison_plot(out / "sim-vs-real.png", {f"real loop (tier {TIER})": real, "simulator": simulated.ticks}, schedule)
        console.print(f"observations, real loop vs simulator, tick by tick: {png}", highlight=False)
    return simulated


def sends_top_tier(scenario: Scenario | None) -> bool:
    """Whether the scenario has `gold_` clients (a trace has no scenario: every request is the bottom tier's)."""
    return scenario is not None and any(group.prefix == TOP_PREFIX for group in scenario.clients)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _fail(console: Console, message: str) -> int:
    console.print(f"ratepilot demo: {message}", style="red", highlight=False, markup=False)
    return 1


def main(argv: list[str]) -> int:
    """Entry point of `ratepilot demo`."""
    args = build_parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # logs and CI: long lines rather than wrapped ones
    err = Console(stderr=True, width=None if console.is_terminal else 120)
    if args.duration is not None and args.duration < 4:
        print("ratepilot demo: --duration must be at least 4 s", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    try:
        check_outputs(files={"--json": args.json}, dirs={"--out": args.out or Path("demo-output")})
        schedule, scale = build_schedule(args, cores)
        for binary in ("redis-server", "prometheus"):
            find_binary(binary)
    except (TraceError, ValueError, ServerError, OSError) as exc:
        print(f"ratepilot demo: {exc}", file=sys.stderr)
        return 2
    capacity = schedule.nominal_capacity_rps
    clipped = bool(args.scale is None and np.any(schedule.demand_rps >= peak_budget_rps(cores)) and args.trace)
    settings = StackSettings(
        nominal_capacity_rps=capacity,
        slo_ms=args.slo_ms,
        tick_interval_s=args.tick_interval,
        workers=max(2, round(capacity * MEAN_SERVICE_S)),
        policy=args.policy,
        model=str(Path(args.model).resolve()) if args.model else None,  # the parts run in their own folders
        seed=args.seed,
        two_tiers=not args.one_tier and sends_top_tier(schedule.scenario),
    )
    # absolute: the parts run with their own folder as working directory and get paths into `out`
    out = (args.out or Path("demo-output") / time.strftime("run-%Y%m%d-%H%M%S")).resolve()
    console.print(
        f"[bold]ratepilot demo[/]: {schedule.name} scenario, {schedule.duration_s} s per run, {cores} cores\n"
        f"  scale {scale:.3g}: nominal backend capacity {capacity:.0f} req/s ({settings.workers} workers), "
        f"peak demand {schedule.peak_demand_rps:.0f} req/s"
        + (" (the trace's higher peaks clipped to it)" if clipped else "")
        + ("" if args.scale else f" (fits {cores} cores x {peak_budget_rps(1):.0f} req/s; --scale overrides)")
        + f"\n  SLO p99 <= {settings.slo_ms:g} ms; static comparison rate = nominal capacity {capacity:.0f} tokens/s"
        + f"\n  output: {out}",
        highlight=False,
    )
    arrivals = arrival_times(schedule.demand_rps, args.seed)
    plan = request_plan(schedule.scenario, arrivals, args.seed) if schedule.scenario is not None else None
    previous = signal.signal(signal.SIGTERM, _terminate)
    results: list[RunResult] = []
    try:
        modes = ["adaptive"] if args.no_compare else ["adaptive", "static"]
        for mode in modes:
            results.append(play(mode, out / mode, settings, schedule, arrivals, console, plan))
    except PartFailed as exc:
        tail = log_tail(exc.log_path)
        err.print(f"ratepilot demo: {exc.part} failed: {exc.reason}\n  log: {exc.log_path}", style="red", highlight=False, markup=False)
        if tail:
            err.print("  last lines:\n    " + tail.replace("\n", "\n    "), highlight=False, markup=False)
        err.print("  every part the demo started has been stopped.", highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print("ratepilot demo: interrupted; every part the demo started has been stopped.", highlight=False)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print(comparison_table([(r.mode, r.summary) for r in results], settings.slo_ms))
    png = plot(out / "demo.png", results, schedule, settings.slo_ms)
    console.print(f"plot: {png}", highlight=False)
    simulated = simulated_beside(console, results[0], schedule, settings, out)
    tiers = request_tiers(plan, arrivals.size, tier_prefixes(settings), TIER)
    by_tier = {r.mode: tier_reports(r, tiers, schedule, settings.slo_ms, ERROR_BUDGET) for r in results}
    console.print(tier_table(by_tier, schedule, PRIORITY if settings.two_tiers else {}))
    tiers_png = tier_plot(out / "demo-tiers.png", results, tiers, schedule, settings.slo_ms)
    console.print(f"plot per tier: {tiers_png}", highlight=False)
    if args.json:
        meta = {"scenario": schedule.name, "duration_s": schedule.duration_s, "scale": scale,
                "nominal_capacity_rps": capacity, "slo_ms": settings.slo_ms, "plot": str(png), "logs": str(out),
                "tier_plot": str(tiers_png), "simulated": simulated.to_dict()}  # fmt: skip
        tier_json = {mode: {tier: report.to_dict() for tier, report in reports.items()} for mode, reports in by_tier.items()}
        write_json(args.json, results, {"meta": meta, "tiers": tier_json})
        console.print(f"json: {args.json}", highlight=False)
    return 0
