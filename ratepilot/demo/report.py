"""The end of the demo: the side-by-side table, the JSON and the PNG plot of the runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from rich.table import Table

from ratepilot.demo.run import RunResult
from ratepilot.demo.schedule import LoadSchedule
from ratepilot.demo.summary import RECOVERY_SHARE, RunSummary, per_second

COLUMNS = (
    ("goodput within SLO", "goodput_rps", "{:.1f} req/s"),
    ("upper bound: mean min(demand, capacity)", "upper_bound_rps", "{:.1f} req/s"),
    ("goodput / upper bound", "goodput_ratio", "{:.3f}"),
    ("p99 latency", "p99_latency_ms", "{:.0f} ms"),
    ("throttled", "throttle_frac", "{:.1%}"),
    ("errors", "error_frac", "{:.2%}"),
    ("SLO-violating intervals", "slo_violation_frac", "{:.0%}"),
    (f"back to {RECOVERY_SHARE:.0%} of capacity after the cut", "recovery_s", "{:.0f} s"),
)


def comparison_table(runs: list[tuple[str, RunSummary]], slo_ms: float) -> Table:
    """One row per metric, one column per (label, summary) run."""
    title = " vs ".join(label for label, _ in runs)
    table = Table(title=f"{title} (SLO: p99 <= {slo_ms:g} ms, errors <= 1 %)")
    table.add_column("metric", style="bold")
    for label, _ in runs:
        table.add_column(label, justify="right")
    for label, key, fmt in COLUMNS:
        cells = []
        for _, summary in runs:
            value = getattr(summary, key)
            cells.append("-" if not math.isfinite(value) else fmt.format(value))
        table.add_row(label, *cells)
    table.add_row("requests sent", *(f"{summary.requests}" for _, summary in runs))
    table.add_row("generator lag p99", *(f"{summary.generator_lag_p99_ms:.0f} ms" for _, summary in runs))
    return table


def write_json(path: Path, results: list[RunResult], extra: dict[str, object]) -> None:
    """{"adaptive": {...}, "static": {...}, ...extra} with the summary metrics of each run."""
    payload: dict[str, object] = {result.mode: result.summary.to_dict() for result in results}
    payload.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n")


def plot(path: Path, results: list[RunResult], schedule: LoadSchedule, slo_ms: float) -> Path:
    """Demand, admitted, throttled, rate and capacity; p99 against the SLO; goodput within SLO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = schedule.duration_s
    t = np.arange(seconds)
    fig, axes = plt.subplots(3, len(results), figsize=(6.5 * len(results), 9), sharex=True, squeeze=False)
    for col, result in enumerate(results):
        series = per_second(result.record, seconds, slo_ms)
        top, mid, bottom = axes[0][col], axes[1][col], axes[2][col]
        top.plot(t, schedule.demand_rps, color="0.6", lw=1, label="demand (scheduled)")
        top.plot(t, series.ok, color="tab:green", lw=1, label="admitted and served (2xx)")
        top.plot(t, series.throttled, color="tab:orange", lw=1, label="throttled (429)")
        top.plot(t, series.errors, color="tab:red", lw=1, label="errors")
        top.step(t, schedule.capacity_rps, where="post", color="black", ls="--", lw=1, label="backend capacity")
        rate = np.asarray(result.samples.rate, dtype=float)
        taken = np.asarray(result.samples.second, dtype=float) if result.samples.second else np.arange(rate.size)
        top.step(taken + 1, rate, where="post", color="tab:blue", lw=1.5, label="rate in force")
        top.set_ylabel("requests/s")
        top.set_yscale("symlog", linthresh=max(1.0, schedule.nominal_capacity_rps / 10))
        top.set_title(f"{result.mode}: goodput {result.summary.goodput_rps:.1f} req/s, p99 {result.summary.p99_latency_ms:.0f} ms")
        mid.plot(t, series.p99_ms, color="tab:purple", lw=1, label="p99 latency (admitted)")
        mid.axhline(slo_ms, color="tab:red", ls=":", label=f"SLO {slo_ms:g} ms")
        mid.set_yscale("log")
        mid.set_ylabel("ms")
        bottom.plot(t, series.good, color="tab:green", lw=1, label="served within SLO")
        bottom.step(t, np.minimum(schedule.demand_rps, schedule.capacity_rps), where="post", color="0.5", ls="--",
                    lw=1, label="min(demand, capacity)")  # fmt: skip
        bottom.set_ylabel("goodput, requests/s")
        bottom.set_xlabel("seconds")
        for ax in (top, mid, bottom):
            for start, _name in schedule.phases[1:]:
                ax.axvline(start, color="0.8", lw=0.8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        for start, name in schedule.phases:
            top.annotate(name, (start, 1.0), xycoords=("data", "axes fraction"), fontsize=7, va="bottom")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
