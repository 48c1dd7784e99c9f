"""`ratepilot loadtest`: play a load scenario open-loop against an HTTP endpoint (or two, side by side).

    ratepilot loadtest SCENARIO --target URL [--compare URL] [--labels A,B] [--scale X] [--duration S]
                       [--seed N] [--slo-ms MS] [--out DIR] [--json FILE]
    ratepilot loadtest SCENARIO --export-k6 FILE [--scale X] [--duration S] [--target URL]
    ratepilot loadtest --list

SCENARIO is a packaged scenario (`--list`) or a YAML file. Requests leave at Poisson arrival times
that follow the scenario's per-second demand (seeded), whatever the target answers; latency counts
from the scheduled send time (no coordinated omission). With --compare the same arrivals, keys and
requests are played against a second target after the first, and one table shows both.
Writes `loadtest.json` and `loadtest.png` (offered, admitted, throttled, errors, p50/p99 per second)
into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ratepilot.demo.cli import positive_number
from ratepilot.demo.loadgen import LoadGenerator, RequestPlan, RunRecord
from ratepilot.demo.report import comparison_table
from ratepilot.demo.run import ERROR_BUDGET
from ratepilot.demo.schedule import arrival_times
from ratepilot.demo.summary import summarize, window_stats
from ratepilot.loadtest.k6 import DEFAULT_TARGET, export_command, k6_script
from ratepilot.loadtest.plan import request_plan
from ratepilot.loadtest.report import TargetRun, plot, result_json, target_run, write_json
from ratepilot.loadtest.scenario import Scenario, ScenarioError, check_scale, load_scenario, scenario_names

REACH_TIMEOUT_S = 3.0


class UsageError(ValueError):
    """Bad input, reported in one line before any work starts."""


def build_parser() -> argparse.ArgumentParser:
    """The `ratepilot loadtest` argument parser."""
    parser = argparse.ArgumentParser(prog="ratepilot loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", help="a packaged scenario name (see --list) or a YAML file")
    parser.add_argument("--list", action="store_true", help="list the packaged scenarios and exit")
    parser.add_argument("--target", help="base URL to load, e.g. http://127.0.0.1:8080")
    parser.add_argument("--compare", metavar="URL", help="play the same arrivals against this second target too")
    parser.add_argument("--labels", help="names of the target(s) in the table, comma-separated (default A,B)")
    parser.add_argument("--scale", type=positive_number(float), default=1.0, help="multiply the scenario's rates (default 1)")
    parser.add_argument("--duration", type=positive_number(int), help="stretch or shrink the phases to this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrivals, keys and request kinds")
    parser.add_argument("--slo-ms", type=positive_number(float), default=300.0, help="p99 objective for the table (default 300)")
    parser.add_argument("--timeout-s", type=positive_number(float), default=5.0, help="per-request timeout (default 5)")
    parser.add_argument("--key-header", default="x-api-key", help="header that carries the API key (default x-api-key)")
    parser.add_argument("--connections", type=positive_number(int), default=256, help="connection pool size (default 256)")
    parser.add_argument("--out", type=Path, help="folder for loadtest.json and loadtest.png (default loadtest-output/NAME-TIME)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the JSON result here")
    parser.add_argument("--export-k6", type=Path, metavar="FILE", help="write the scenario as a k6 script and exit")
    return parser


def check_url(url: str) -> str:
    """`url` without a trailing slash if it is an http(s) URL with a host; UsageError otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"target must be an http:// or https:// URL with a host, got {url!r}")
    return url.rstrip("/")


def _check_creatable(folder: Path, what: Path) -> None:
    """UsageError unless `folder` is a writable directory or can be created (nothing is created here)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"{what}: {existing} is not writable")


def check_output_file(path: Path) -> Path:
    """`path` if a file can be written there (its folder may still have to be created); UsageError otherwise."""
    if path.is_dir():
        raise UsageError(f"{path} is a directory, expected a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{path} is not writable")
    _check_creatable(path.parent, path)
    return path


def check_output_dir(path: Path) -> Path:
    """`path` if it is, or can be made, a writable folder; UsageError otherwise."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a directory")
    _check_creatable(path, path)
    return path


def check_reachable(url: str) -> None:
    """UsageError unless something answers HTTP at `url` (any status)."""
    try:
        httpx.get(url, timeout=REACH_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise UsageError(f"target {url} does not answer: {type(exc).__name__}: {exc}") from None


def _stats_text(record: RunRecord, second: int) -> str:
    stats = window_stats(record, float(second))
    p99 = "-" if not math.isfinite(stats["p99_ms"]) else f"{stats['p99_ms']:.0f} ms"
    return (f"sent {stats['sent_rps']:.0f}/s  admitted {stats['ok_rps']:.0f}/s  throttled {stats['throttled_rps']:.0f}/s  "
            f"errors {stats['error_rps']:.0f}/s  p99 {p99}")  # fmt: skip


def play(
    console: Console, label: str, target: str, scenario: Scenario, offsets: np.ndarray, plan: RequestPlan,
    timeout_s: float, connections: int, key_header: str,
) -> RunRecord:  # fmt: skip
    """Play the arrivals against one target with a progress bar of seconds, phase and live rates."""
    generator = LoadGenerator(target, key_header=key_header, timeout_s=timeout_s, connections=connections)
    starts = scenario.phase_starts()
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("s"),
        TimeRemainingColumn(), TextColumn("{task.fields[phase]}", style="cyan"), TextColumn("{task.fields[stats]}"),
    )  # fmt: skip
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"{label} {target}", total=scenario.duration_s, phase=scenario.phases[0].name, stats="")

        def on_second(second: int, record: RunRecord) -> None:
            index = int(np.searchsorted(starts, min(second, scenario.duration_s - 1), side="right")) - 1
            progress.update(task, completed=min(second, scenario.duration_s), phase=scenario.phases[max(index, 0)].name,
                            stats=_stats_text(record, second))  # fmt: skip

        return asyncio.run(generator.run(offsets, on_second=on_second, plan=plan))


def main(argv: list[str]) -> int:
    """Entry point of `ratepilot loadtest`."""
    args = build_parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=140)
    if args.list:
        for name in scenario_names():
            console.print(f"{name:<14} {load_scenario(name).description}", highlight=False, markup=False)
        return 0
    try:
        if not args.scenario:
            raise UsageError("give a SCENARIO (a name from --list or a YAML file)")
        scenario = load_scenario(args.scenario)
        if args.duration is not None:
            scenario = scenario.stretched(args.duration)
        check_scale(args.scale)
        if args.export_k6 is not None:
            script = check_output_file(args.export_k6)
            target = check_url(args.target) if args.target else DEFAULT_TARGET
            script.parent.mkdir(parents=True, exist_ok=True)
            script.write_text(k6_script(scenario, args.scale, target, export_command(args.scenario, args.scale)))
            console.print(f"k6 script: {script} (k6 run -e TARGET=URL {script})", highlight=False)
            return 0
        if not args.target:
            raise UsageError("--target URL is required (or --export-k6 FILE)")
        if not re.fullmatch(r"[A-Za-z0-9-]{1,100}", args.key_header):
            raise UsageError(f"--key-header must be an HTTP header name, got {args.key_header!r}")
        targets = [check_url(args.target)] + ([check_url(args.compare)] if args.compare else [])
        labels = args.labels.split(",") if args.labels else ["A", "B"][: len(targets)]
        if len(labels) != len(targets) or any(not label.strip() for label in labels):
            raise UsageError(f"--labels needs {len(targets)} non-empty name(s), got {args.labels!r}")
        out = check_output_dir(args.out or Path("loadtest-output") / time.strftime(f"{scenario.name}-%Y%m%d-%H%M%S"))
        json_path = check_output_file(args.json) if args.json else None
        for target in targets:
            check_reachable(target)
    except (ScenarioError, UsageError) as exc:
        print(f"ratepilot loadtest: {exc}", file=sys.stderr)
        return 2

    offered = scenario.demand_rps(args.scale)
    offsets = arrival_times(offered, args.seed)
    plan = request_plan(scenario, offsets, args.seed)
    console.print(
        f"[bold]ratepilot loadtest[/]: {scenario.name}, {scenario.duration_s} s, {offsets.size} requests "
        f"(peak {offered.max():.0f} req/s, rates x {args.scale:g}), output {out}", highlight=False,
    )  # fmt: skip
    runs: list[TargetRun] = []
    try:
        for label, target in zip(labels, targets, strict=True):
            record = play(console, label, target, scenario, offsets, plan, args.timeout_s, args.connections, args.key_header)
            summary = summarize(record, float(scenario.duration_s), args.slo_ms, ERROR_BUDGET)
            runs.append(target_run(label, target, record, summary, scenario.duration_s, args.slo_ms))
    except KeyboardInterrupt:
        print("ratepilot loadtest: interrupted", file=sys.stderr)
        return 130
    console.print(comparison_table([(f"{run.label} ({run.target})", run.summary) for run in runs], args.slo_ms))
    out.mkdir(parents=True, exist_ok=True)
    phases = list(zip(scenario.phase_starts(), (p.name for p in scenario.phases), strict=True))
    png = plot(out / "loadtest.png", runs, offered, phases, args.slo_ms, f"{scenario.name}: {scenario.description}")
    meta = {"scenario": scenario.name, "duration_s": scenario.duration_s, "scale": args.scale, "seed": args.seed,
            "slo_ms": args.slo_ms, "requests": int(offsets.size), "plot": str(png)}  # fmt: skip
    payload = result_json(runs, offered, meta)
    for path in (out / "loadtest.json", json_path):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, payload)
    console.print(f"json: {out / 'loadtest.json'}" + (f" and {json_path}" if json_path else "") + f"\nplot: {png}", highlight=False)
    return 0
