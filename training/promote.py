"""`ratepilot promote`: move the `champion` alias to the `candidate` model only if it is at least as good.

Both versions are evaluated by the harness on the same suite and seeds. The candidate is promoted
when its mean `goodput_ratio` is >= the champion's and its `slo_violation_frac` is <= the
champion's (a first candidate, with no champion yet, is promoted). `--force` promotes anyway and is
recorded as forced. The decision, the reason and both sides' metrics are stored as tags
`promotion.*` on the candidate version, whatever the outcome.

`--min-shadow-ticks N` / `--min-shadow-s S` first require the candidate version to have decided in
shadow beside the champion for that long: read from the controller's decision stream in the Redis
of `--redis-url` (the ticks whose decisions carry a candidate of exactly this version, and the time
from the first to the last). When it has not, promote refuses with a one-line reason (exit 1, tagged
`promotion.decision=refused`) before evaluating anything; `--force` goes on and records the shortfall.
The stream keeps `loop.decisions_maxlen` entries (one per tier per tick), so the period asked for
must fit in what it holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import redis
from rich.console import Console
from rich.table import Table

from limiter.paths import output_problem
from policy.rl import ModelError, load
from training import registry

DECISIONS_STREAM = "ratepilot:decisions"  # the controller's decision stream (docs/contracts.md)
STREAM_BATCH = 1000
COMPARED = ("goodput_ratio", "slo_violation_frac", "p99_latency_ms", "throttle_frac", "error_frac", "rate_tracking_error")


@dataclass(frozen=True)
class Decision:
    """Whether the candidate becomes champion, and why."""

    promote: bool
    forced: bool
    reason: str


def decide(candidate: dict[str, float], champion: dict[str, float] | None, force: bool = False) -> Decision:
    """The promotion rule: goodput at least as good and SLO violations no worse (or no champion yet)."""
    if champion is None:
        return Decision(True, False, "no champion yet")
    goodput_ok = candidate["goodput_ratio"] >= champion["goodput_ratio"]
    slo_ok = candidate["slo_violation_frac"] <= champion["slo_violation_frac"]
    if goodput_ok and slo_ok:
        return Decision(True, False, "goodput at least as good and SLO violations no worse")
    failed = [name for name, ok in (("goodput_ratio lower", goodput_ok), ("slo_violation_frac higher", slo_ok)) if not ok]
    reason = "candidate " + " and ".join(failed)
    if force:
        return Decision(True, True, f"forced although {reason}")
    return Decision(False, False, reason)


@dataclass(frozen=True)
class ShadowPeriod:
    """How long one candidate model decided in shadow: ticks seen in the decision stream, first to last in seconds."""

    model: str
    ticks: int
    span_s: float


def candidate_model(version: str) -> str:
    """The model a controller in shadow names for a registered candidate version (it pins the alias)."""
    return f"models:/{registry.REGISTERED_MODEL}/{version}"


def shadow_period(client: redis.Redis, model: str) -> ShadowPeriod:
    """Ticks (distinct decision times) and seconds during which `model` decided in shadow, over the whole stream."""
    times: set[float] = set()
    needle, lower = orjson.dumps(model), "-"  # the model as the controller's orjson spells it
    while batch := client.xrange(DECISIONS_STREAM, min=lower, max="+", count=STREAM_BATCH):
        for _, fields in batch:
            raw = fields.get(b"decision", b"")
            if needle not in raw:  # most entries: another model, or none; skip the parse
                continue
            try:
                decision = json.loads(raw)
            except ValueError:
                continue
            candidate = decision.get("candidate") if isinstance(decision, dict) else None
            t = decision.get("t") if isinstance(decision, dict) else None
            if isinstance(candidate, dict) and candidate.get("model") == model and isinstance(t, int | float):
                times.add(float(t))
        lower = "(" + batch[-1][0].decode()
    return ShadowPeriod(model, len(times), (max(times) - min(times)) if times else 0.0)


def shadow_shortfall(period: ShadowPeriod, min_ticks: int, min_s: float) -> str | None:
    """Why the shadow period is too short (None when it is long enough)."""
    short = []
    if period.ticks < min_ticks:
        short.append(f"{period.ticks} of --min-shadow-ticks {min_ticks} ticks")
    if period.span_s < min_s:
        short.append(f"{period.span_s:.1f} of --min-shadow-s {min_s:g} s")
    if not short:
        return None
    return f"{period.model} decided in shadow for only " + " and ".join(short)


def comparison_table(candidate: dict[str, float], champion: dict[str, float] | None, versions: tuple[str, str | None]) -> Table:
    """The side-by-side metrics for the terminal."""
    table = Table(title="candidate vs champion (mean over the evaluation suite)")
    table.add_column("metric")
    table.add_column(f"candidate v{versions[0]}", justify="right")
    table.add_column(f"champion v{versions[1]}" if versions[1] else "champion (none)", justify="right")
    for key in COMPARED:
        other = "-" if champion is None else f"{champion.get(key, float('nan')):.4f}"
        table.add_row(key, f"{candidate.get(key, float('nan')):.4f}", other)
    return table


def evaluate_versions(paths: dict[str, Path], suite: str, seeds: int, traces: list[Path]) -> dict[str, dict[str, float]]:
    """Mean metrics per label of the policy files, from the evaluation harness."""
    from training.evaluate import evaluate  # the harness (imported late: it pulls in the simulator)

    policies = {label: load(path) for label, path in paths.items()}
    report = evaluate(policies=policies, suite=suite, seeds=seeds, traces=traces, progress=True)
    return {label: dict(report["summary"][label]) for label in paths}


def build_parser() -> argparse.ArgumentParser:
    """The command line of `ratepilot promote`."""
    parser = argparse.ArgumentParser(prog="ratepilot promote", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="default", help="evaluation suite (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=5, help="evaluation seeds per scenario (default: %(default)s)")
    parser.add_argument("--trace", type=Path, action="append", default=[], help="also evaluate on this trace CSV")
    parser.add_argument("--force", action="store_true", help="promote even if the candidate is worse (recorded)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the project store)")
    parser.add_argument("--json", type=Path, help="write the comparison and decision as JSON to this file")
    parser.add_argument("--min-shadow-ticks", type=int, default=0, metavar="N",
                        help="refuse unless the candidate decided in shadow for N ticks (needs --redis-url)")
    parser.add_argument("--min-shadow-s", type=float, default=0.0, metavar="S",
                        help="refuse unless the candidate decided in shadow over S seconds (needs --redis-url)")
    parser.add_argument("--redis-url", help="the Redis holding the controller's decision stream (ratepilot:decisions)")
    return parser


def shadow_args_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the shadow-period options (None when nothing)."""
    if args.min_shadow_ticks < 0 or not 0 <= args.min_shadow_s <= 1e9:  # also refuses NaN and infinity
        return "--min-shadow-ticks and --min-shadow-s must be >= 0 (seconds at most 1e9)"
    if (args.min_shadow_ticks or args.min_shadow_s) and not args.redis_url:
        return "--min-shadow-ticks/--min-shadow-s need --redis-url (the Redis of the controller's decision stream)"
    if args.redis_url:
        try:
            redis.connection.parse_url(args.redis_url)
        except ValueError as exc:
            return f"--redis-url: not a Redis URL ({exc})"
    return None


def main(argv: list[str]) -> int:
    """Entry point of `ratepilot promote`."""
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        print("ratepilot promote: --seeds must be >= 1", file=sys.stderr)
        return 2
    if problem := output_problem({"--json": args.json}) or shadow_args_problem(args):
        print(f"ratepilot promote: {problem}", file=sys.stderr)
        return 2
    console = Console()
    registry.configure(args.tracking_uri)
    candidate = registry.version_by_alias(registry.CANDIDATE)
    if candidate is None:
        print(f"ratepilot promote: no '{registry.CANDIDATE}' version of {registry.REGISTERED_MODEL}; run `ratepilot train` first", file=sys.stderr)
        return 1
    champion = registry.version_by_alias(registry.CHAMPION)
    if champion is not None and champion.version == candidate.version:
        console.print(f"version {candidate.version} is already the champion; nothing to do")
        return 0
    shadow: dict[str, Any] | None = None
    if args.min_shadow_ticks or args.min_shadow_s:
        try:
            period = shadow_period(redis.Redis.from_url(args.redis_url, socket_timeout=10), candidate_model(candidate.version))
        except redis.RedisError as exc:
            print(f"ratepilot promote: cannot read the decision stream at {args.redis_url}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        shortfall = shadow_shortfall(period, args.min_shadow_ticks, args.min_shadow_s)
        shadow = {**asdict(period), "min_ticks": args.min_shadow_ticks, "min_s": args.min_shadow_s, "shortfall": shortfall}
        if shortfall and not args.force:
            registry.set_version_tags(candidate.version, {"promotion.decision": "refused", "promotion.reason": shortfall,
                                                          "promotion.shadow": shadow})  # fmt: skip
            print(f"ratepilot promote: refused: {shortfall}", file=sys.stderr)
            return 1
    try:
        paths = {"candidate": registry.download_policy(candidate)}
        if champion is not None:
            paths["champion"] = registry.download_policy(champion)
        metrics = evaluate_versions(paths, args.suite, args.seeds, args.trace)
    except (ModelError, FileNotFoundError, ValueError) as exc:
        print(f"ratepilot promote: {exc}", file=sys.stderr)
        return 1
    decision = decide(metrics["candidate"], metrics.get("champion"), args.force)
    if shadow and shadow["shortfall"]:  # only reached with --force
        decision = Decision(True, True, f"{decision.reason}; forced although {shadow['shortfall']}")
    console.print(comparison_table(metrics["candidate"], metrics.get("champion"), (candidate.version, champion.version if champion else None)))
    record: dict[str, Any] = {
        "candidate_version": candidate.version,
        "champion_version": champion.version if champion else None,
        "suite": args.suite,
        "seeds": args.seeds,
        "traces": [str(t) for t in args.trace],
        "metrics": metrics,
        "shadow": shadow,
        **asdict(decision),
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    registry.set_version_tags(
        candidate.version,
        {
            "promotion.decision": "promoted" if decision.promote else "rejected",
            "promotion.forced": decision.forced,
            "promotion.reason": decision.reason,
            "promotion.compared_with": record["champion_version"] or "none",
            "promotion.metrics": metrics,
            "promotion.shadow": shadow or "not required",
            "promotion.decided_at": record["decided_at"],
        },
    )
    if decision.promote:
        registry.client().set_registered_model_alias(registry.REGISTERED_MODEL, registry.CHAMPION, candidate.version)
        console.print(f"[green]promoted[/] version {candidate.version} to champion: {decision.reason}")
    else:
        console.print(f"[yellow]kept[/] champion v{record['champion_version']}: {decision.reason}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2, sort_keys=True))
    return 0
