"""`ratepilot evaluate`: policies x scenarios (or trace files) x seeds in the simulator, one table.

    ratepilot evaluate --suite default --policies static,threshold,aimd,gradient,pid,oracle --seeds 3 --json out.json

Writes `{"scenarios": [{"name", "results": {POLICY: METRICS}}], "summary": {POLICY: METRICS}}`
(metrics: `training.metrics`), a summary table on the terminal and a PNG per scenario. `static`
is tuned per run: a grid of factors of the reference rate, the best mean goodput reported (its
factor as `static_factor`). Every policy runs on the same worlds with the same random numbers, all
in one vectorised batch; the same seeds give the same numbers.

`--calibration FILE` evaluates in worlds with a calibrated backend (`ratepilot calibrate`).

From Python (the trainer logs this to MLflow): `evaluate({"aimd": make_policy("aimd"), ...})`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from limiter.paths import check_outputs
from policy.base import Policy
from policy.registry import UnknownPolicyError, make_policy, policy_names
from training.calibrate import load_calibration
from training.metrics import METRICS, episode_metrics, mean_metrics, to_json_safe
from training.scenarios import (
    DEFAULT_STEPS,
    SUITES,
    calibrated_worlds,
    make_episodes,
    scenario_names,
    trace_episode,
)
from training.sim import BatchSim, Episode, take_rows
from training.traces import TraceError, load_trace

STATIC_TUNED = "static:tuned"  # pass as a policy to have the harness tune a static rate on a grid
STATIC_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)  # x reference rate
PolicySpec = Policy | Callable[[], Policy] | str
_INFO_KEYS = (
    "goodput_tokens", "bound_tokens", "demand_tokens", "capacity_tokens", "optimal_rate", "rate",
    "p99_ms", "slo_violated", "admitted_tokens", "throttled_tokens", "errors", "finished",
)  # fmt: skip


@dataclass
class _Variant:
    """One policy (or one static grid point) evaluated on all episodes of a batch."""

    label: str
    policy: Policy
    reports_as: str


def _as_policy(label: str, spec: PolicySpec) -> Policy:
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        return make_policy(spec)
    made = spec()
    if not isinstance(made, Policy):
        raise TypeError(f"policy factory for {label!r} did not return a Policy")
    return made


def _variants(policies: Mapping[str, PolicySpec], static_grid: Sequence[float]) -> list[_Variant]:
    from policy.baselines import Static

    out = []
    for label, spec in policies.items():
        if isinstance(spec, str) and spec == STATIC_TUNED:
            out += [_Variant(f"{label}@{f:g}", Static(factor=f), label) for f in static_grid]
        else:
            out.append(_Variant(label, _as_policy(label, spec), label))
    return out


def _run_batch(
    episodes: list[Episode], variants: list[_Variant], progress: Callable[[int], None]
) -> dict[str, np.ndarray]:
    """Step every variant over every episode in one BatchSim; returns (T, V*E) per-interval arrays."""
    n_ep = len(episodes)
    sim = BatchSim([e for _ in variants for e in episodes])
    obs = sim.reset()
    for v in variants:
        v.policy.reset()
    record: dict[str, list[np.ndarray]] = {k: [] for k in (*_INFO_KEYS, "reward")}
    rates = np.empty(sim.n)
    done = False
    while not done:
        for i, v in enumerate(variants):
            rows = slice(i * n_ep, (i + 1) * n_ep)
            chosen = np.asarray(v.policy.act(take_rows(obs, rows)), dtype=np.float64).reshape(-1)
            if chosen.shape != (n_ep,) or not np.all(np.isfinite(chosen)):
                raise ValueError(f"policy {v.label!r} returned {chosen!r}: need {n_ep} finite rates")
            rates[rows] = chosen
        obs, reward, done, info = sim.step(rates)
        for k in _INFO_KEYS:
            record[k].append(info[k])
        record["reward"].append(reward)
        progress(1)
    stacked = {k: np.stack(v) for k, v in record.items()}
    stacked["slo_ms"] = np.array([e.params.slo_ms for e in sim.episodes])
    return stacked


def evaluate(
    policies: Mapping[str, PolicySpec],
    suite: str | None = "default",
    seeds: int | Iterable[int] = 3,
    traces: Sequence[str | Path] = (),
    steps: int = DEFAULT_STEPS,
    randomize: bool = True,
    static_grid: Sequence[float] = STATIC_GRID,
    plots_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate policies (instances, factories, registry names or STATIC_TUNED) and return the report.

    `seeds` is a count (seeds 0..n-1) or the seeds themselves; `suite` None evaluates only `traces`.
    Metrics in the report are floats, NaN where undefined (see training.metrics).
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError("need at least one seed")
    if not policies:
        raise ValueError("need at least one policy")
    groups: list[tuple[str, list[Episode]]] = []  # (scenario name, its episodes over seeds)
    if suite:
        for name in scenario_names(suite):
            groups.append((name, make_episodes([name], seed_list, steps=steps, randomize=randomize)))
    for path in traces:
        trace = load_trace(path)
        groups.append((Path(path).stem, [trace_episode(trace, s, randomize=False) for s in seed_list]))
    if not groups:
        raise ValueError("nothing to evaluate: give a suite or trace files")
    variants = _variants(policies, static_grid)
    by_steps: dict[int, list[int]] = {}  # episodes of equal length run in one batch
    for g, (_, eps) in enumerate(groups):
        by_steps.setdefault(eps[0].steps, []).append(g)
    metrics: dict[tuple[str, int], list[dict[str, float]]] = {}  # (variant label, group) -> per seed
    runs: dict[int, tuple[dict[str, np.ndarray], int, int]] = {}  # group -> (batch data, episodes, offset)
    with Progress(
        TextColumn("[bold]evaluate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), disable=not progress,
    ) as bar:  # fmt: skip
        task = bar.add_task("steps", total=sum(by_steps))
        for group_ids in by_steps.values():
            episodes = [e for g in group_ids for e in groups[g][1]]
            n_ep = len(episodes)
            data = _run_batch(episodes, variants, lambda k: bar.advance(task, k))
            for i, v in enumerate(variants):
                rows = slice(i * n_ep, (i + 1) * n_ep)
                per_world = episode_metrics({k: data[k][:, rows] for k in _INFO_KEYS}, data["reward"][:, rows])
                offset = 0
                for g in group_ids:
                    count = len(groups[g][1])
                    metrics[(v.label, g)] = [
                        {k: float(a[j]) for k, a in per_world.items()} for j in range(offset, offset + count)
                    ]
                    runs[g] = (data, n_ep, offset)
                    offset += count
    report = _assemble([name for name, _ in groups], variants, metrics)
    if plots_dir is not None:
        _plot_all(Path(plots_dir), groups, variants, runs, report["_chosen"])
    return report


def _assemble(
    scenarios: list[str], variants: list[_Variant], metrics: dict[tuple[str, int], list[dict[str, float]]]
) -> dict[str, Any]:
    """Scenario means over seeds, a tuned policy resolved to its best grid point, and the summary."""
    labels_by_name: dict[str, list[str]] = {}
    for v in variants:
        labels_by_name.setdefault(v.reports_as, []).append(v.label)
    chosen: dict[str, str] = {}
    for name, labels in labels_by_name.items():
        def suite_goodput(label: str) -> float:
            return float(np.mean([mean_metrics(metrics[(label, g)])["goodput_ratio"] for g in range(len(scenarios))]))

        chosen[name] = max(labels, key=suite_goodput) if len(labels) > 1 else labels[0]
    out_scenarios = []
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    for g, scenario in enumerate(scenarios):
        results = {}
        for name, label in chosen.items():
            m = mean_metrics(metrics[(label, g)])
            if label != name:
                m["static_factor"] = float(label.split("@", 1)[1])
            results[name] = m
            rows[name].append(m)
        out_scenarios.append({"name": scenario, "results": results})
    summary = {name: mean_metrics(r) for name, r in rows.items()}
    return {"scenarios": out_scenarios, "summary": summary, "_chosen": chosen}


def _plot_all(
    folder: Path,
    groups: list[tuple[str, list[Episode]]],
    variants: list[_Variant],
    runs: dict[int, tuple[dict[str, np.ndarray], int, int]],
    chosen: dict[str, str],
) -> list[Path]:
    """One PNG per scenario, its first seed, every reported policy."""
    from training.plots import plot_scenario

    column = {name: next(i for i, v in enumerate(variants) if v.label == label) for name, label in chosen.items()}
    paths = []
    for g, (scenario, episodes) in enumerate(groups):
        data, n_ep, offset = runs[g]
        cols = {name: i * n_ep + offset for name, i in column.items()}
        first = next(iter(cols.values()))
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in scenario)
        paths.append(
            plot_scenario(
                folder / f"{safe}.png", f"{scenario} (seed {episodes[0].seed})",
                data["demand_tokens"][:, first], data["capacity_tokens"][:, first],
                {name: data["rate"][:, c] for name, c in cols.items()},
                {name: data["p99_ms"][:, c] for name, c in cols.items()},
                float(data["slo_ms"][first]),
            )
        )  # fmt: skip
    return paths


def public_report(report: dict[str, Any]) -> dict[str, Any]:
    """The report in the JSON shape of the design (NaN as null, internal keys dropped)."""
    return {
        "scenarios": [
            {"name": s["name"], "results": {p: to_json_safe(m) for p, m in s["results"].items()}} for s in report["scenarios"]
        ],
        "summary": {p: to_json_safe(m) for p, m in report["summary"].items()},
    }


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def summary_table(report: dict[str, Any]) -> Table:
    """Policies x metrics (means over scenarios and seeds)."""
    table = Table(title="evaluation summary (mean over scenarios and seeds)")
    table.add_column("policy")
    for key in METRICS:
        table.add_column(key, justify="right")
    for name, m in report["summary"].items():
        table.add_row(name, *[_fmt(m[k]) if k != "p99_latency_ms" else f"{m[k]:.0f}" for k in METRICS])
    return table


def goodput_table(report: dict[str, Any]) -> Table:
    """Scenarios x policies: goodput_ratio (slo_violation_frac)."""
    names = list(report["summary"])
    table = Table(title="goodput_ratio (slo_violation_frac) per scenario")
    table.add_column("scenario")
    for name in names:
        table.add_column(name, justify="right")
    for s in report["scenarios"]:
        cells = [f"{_fmt(s['results'][n]['goodput_ratio'])} ({_fmt(s['results'][n]['slo_violation_frac'])})" for n in names]
        table.add_row(s["name"], *cells)
    return table


BASELINES = ("static", "threshold", "aimd", "gradient", "pid")


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def scenario_markdown(report: dict[str, Any], previous: dict[str, Any] | None = None, label: str = "previous") -> str:
    """Scenario-by-scenario Markdown table of a public report (`public_report`'s JSON shape).

    Per scenario: rl's goodput_ratio, SLO-violating share and tracking error, the best baseline's
    goodput (and which), the oracle's, and rl against the targets of issue 18 (goodput >= 0.95x
    the oracle's; no baseline ahead by more than 0.01). With `previous` (the same suite evaluated
    with another rl model, named `label` in the header) its rl goodput and tracking error are shown beside.
    When the report has `oracle_late` (the oracle one interval late, `policy.baselines.LateOracle`),
    its goodput, SLO-violating share and tracking error are shown too: what knowing the last interval's
    capacity exactly reaches.
    """
    late = "oracle_late" in report["summary"]
    head = "| scenario | rl goodput | rl SLO-viol. | rl tracking |"
    head += f" {label} rl goodput | {label} rl tracking |" if previous else ""
    head += " best baseline goodput | oracle goodput (SLO-viol.) |"
    head += " oracle one interval late: goodput / SLO-viol. / tracking |" if late else ""
    head += " rl / oracle | baseline ahead by > 0.01 |"
    lines = [head, "|" + "---|" * head.count(" |")]
    before = {s["name"]: s["results"]["rl"] for s in previous["scenarios"]} if previous else {}
    rows = [*report["scenarios"], {"name": "**mean**", "results": report["summary"]}]
    for scenario in rows:
        r = scenario["results"]
        rl, oracle = r["rl"], r["oracle"]
        present = [b for b in BASELINES if b in r]
        best = max(present, key=lambda b: r[b]["goodput_ratio"] or 0.0) if present else None
        cells = [scenario["name"], _cell(rl["goodput_ratio"]), _cell(rl["slo_violation_frac"]), _cell(rl["rate_tracking_error"])]
        if previous:
            old = before.get(scenario["name"], previous["summary"]["rl"] if scenario["name"] == "**mean**" else None)
            cells += [_cell(old["goodput_ratio"]), _cell(old["rate_tracking_error"])] if old else ["-", "-"]
        best_goodput = r[best]["goodput_ratio"] if best else None
        cells.append(f"{_cell(best_goodput)} ({best})" if best else "-")
        cells.append(f"{_cell(oracle['goodput_ratio'])} ({_cell(oracle['slo_violation_frac'])})")
        if late:
            lo = r["oracle_late"]
            cells.append(" / ".join(_cell(lo[k]) for k in ("goodput_ratio", "slo_violation_frac", "rate_tracking_error")))
        ratio = rl["goodput_ratio"] / oracle["goodput_ratio"] if oracle["goodput_ratio"] else None
        cells.append(_cell(ratio))
        ahead = best_goodput is not None and best_goodput - rl["goodput_ratio"] > 0.01
        cells.append(f"yes: +{best_goodput - rl['goodput_ratio']:.3f}" if ahead else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line of `ratepilot evaluate`."""
    parser = argparse.ArgumentParser(prog="ratepilot evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=None, help=f"scenario suite: {', '.join(SUITES)} (default: default, or none with --trace)")
    parser.add_argument("--trace", action="append", default=[], metavar="FILE", help="replay a trace CSV (repeatable)")
    parser.add_argument("--policies", default="static,threshold,aimd,gradient,pid,oracle", help="comma-separated policy names")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per scenario, 0..N-1 (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="control intervals per episode (default: %(default)s)")
    parser.add_argument("--nominal", action="store_true", help="the nominal world instead of domain-randomised ones")
    parser.add_argument("--model", default=None, help="for `rl`: a policy file or models:/ URI instead of the champion")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the report here")
    parser.add_argument("--plots", default=None, metavar="DIR", help="PNG per scenario (default: OUT's folder/<OUT stem>_plots)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--markdown", default=None, metavar="MD", help="also write the scenario-by-scenario Markdown table here (needs rl and oracle)")
    parser.add_argument("--calibration", default=None, metavar="FILE", help="worlds with this calibrated backend (`ratepilot calibrate`)")
    return parser


def _policy_specs(names: list[str], model: str | None) -> dict[str, PolicySpec]:
    specs: dict[str, PolicySpec] = {}
    for name in names:
        if name == "static":
            specs[name] = STATIC_TUNED
        elif name == "rl":
            from training import registry  # lazy: MLflow only when `rl` is evaluated

            try:
                specs[name] = make_policy("rl", spec=str(registry.policy_file(model)))
            except UnknownPolicyError:
                raise ValueError("policy 'rl' is not available yet (policy/registry.py has no 'rl' entry)") from None
            except Exception as exc:  # a model that fails to load is bad input too
                raise ValueError(f"policy 'rl' could not be loaded: {exc}") from None
        else:
            specs[name] = make_policy(name)
    return specs


def main(argv: list[str]) -> int:
    """Entry point of `ratepilot evaluate`."""
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        plots: Path | None = None
        if not args.no_plots:
            if args.plots:
                plots = Path(args.plots)
            elif args.json_out:
                out = Path(args.json_out)
                plots = out.parent / f"{out.stem}_plots"
        check_outputs(files={"--json": args.json_out, "--markdown": args.markdown}, dirs={"--plots": plots})  # before any work
        names = [n.strip() for n in args.policies.split(",") if n.strip()]
        if not names:
            raise ValueError("--policies is empty")
        unknown = [n for n in names if n not in policy_names() and n != "rl"]
        if unknown:
            raise ValueError(f"unknown policy {unknown[0]!r}; available: {', '.join(policy_names())}")
        if args.seeds < 1 or args.steps < 1:
            raise ValueError("--seeds and --steps must be >= 1")
        suite = args.suite if args.suite is not None else (None if args.trace else "default")
        if suite is not None:
            scenario_names(suite)
        calibration = load_calibration(args.calibration) if args.calibration else None
        specs = _policy_specs(names, args.model)
        if args.markdown and not {"rl", "oracle"} <= set(names):
            raise ValueError("--markdown needs the policies rl and oracle")
        with calibrated_worlds(calibration):
            report = evaluate(
                specs, suite=suite, seeds=args.seeds, traces=args.trace, steps=args.steps,
                randomize=not args.nominal, plots_dir=plots, progress=True,
            )  # fmt: skip
    except (ValueError, KeyError, TraceError, UnknownPolicyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"ratepilot evaluate: {message}", file=sys.stderr)
        return 2
    console.print(goodput_table(report))
    console.print(summary_table(report))
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(public_report(report), indent=2) + "\n")
        console.print(f"report: {out}" + (f", plots: {plots}/" if plots else ""))
    if args.markdown:
        md = Path(args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(scenario_markdown(public_report(report)))
        console.print(f"scenario table: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
