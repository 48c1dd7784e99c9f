"""What a load test wrote: per-second series and summaries of each target as JSON, and one PNG of them side by side."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ratepilot.demo.loadgen import RunRecord
from ratepilot.demo.summary import RunSummary, SecondSeries, per_second


@dataclass(frozen=True)
class TargetRun:
    """One scenario played against one target."""

    label: str
    target: str
    record: RunRecord
    summary: RunSummary
    series: SecondSeries


def series_json(series: SecondSeries, offered: np.ndarray) -> dict[str, list[float | None]]:
    """Per-second series for JSON: offered (scheduled demand), sent, admitted, throttled, errors, p50/p99 ms."""

    def clean(values: np.ndarray, digits: int) -> list[float | None]:
        return [round(float(v), digits) if math.isfinite(v) else None for v in values]

    return {
        "offered_rps": clean(offered, 3),
        "sent": clean(series.sent, 0),
        "admitted": clean(series.ok, 0),
        "throttled": clean(series.throttled, 0),
        "errors": clean(series.errors, 0),
        "p50_ms": clean(series.p50_ms, 2),
        "p99_ms": clean(series.p99_ms, 2),
    }


def result_json(runs: list[TargetRun], offered: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """{"meta": ..., "runs": {label: {"target", "summary", "series"}}}."""
    return {
        "meta": meta,
        "runs": {
            run.label: {"target": run.target, "summary": run.summary.to_dict(), "series": series_json(run.series, offered)}
            for run in runs
        },
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write the result (NaN and infinities as null)."""
    text = json.dumps(payload, indent=1, allow_nan=False, default=str)
    path.write_text(text + "\n")
    return path


def plot(path: Path, runs: list[TargetRun], offered: np.ndarray, phases: list[tuple[int, str]], slo_ms: float, title: str) -> Path:
    """Per target, one column: offered / admitted / throttled / errors per second above p50 / p99 latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(offered.size)
    fig, axes = plt.subplots(2, len(runs), figsize=(6.5 * len(runs), 6.5), sharex=True, squeeze=False)
    top_limit = max(float(offered.max(initial=0.0)), *(float(r.series.sent.max(initial=0.0)) for r in runs), 1.0) * 1.1
    for col, run in enumerate(runs):
        top, bottom = axes[0][col], axes[1][col]
        top.plot(t, offered, color="0.55", lw=1, label="offered (scheduled)")
        top.plot(t, run.series.ok, color="tab:green", lw=1, label="admitted (2xx)")
        top.plot(t, run.series.throttled, color="tab:orange", lw=1, label="throttled (429)")
        top.plot(t, run.series.errors, color="tab:red", lw=1, label="errors")
        top.set_ylim(0, top_limit)
        top.set_ylabel("requests/s")
        top.set_title(f"{run.label}: {run.target}", fontsize=9, pad=14)
        bottom.plot(t, run.series.p50_ms, color="tab:blue", lw=1, label="p50 (not throttled)")
        bottom.plot(t, run.series.p99_ms, color="tab:purple", lw=1, label="p99 (not throttled)")
        bottom.axhline(slo_ms, color="tab:red", ls=":", lw=1, label=f"SLO {slo_ms:g} ms")
        bottom.set_yscale("log")
        bottom.set_ylabel("latency from scheduled send, ms")
        bottom.set_xlabel("seconds")
        for ax in (top, bottom):
            for start, _name in phases[1:]:
                ax.axvline(start, color="0.8", lw=0.8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper right")
        for start, name in phases:
            top.annotate(name, (start, 1.0), xycoords=("data", "axes fraction"), fontsize=7, va="bottom")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def target_run(label: str, target: str, record: RunRecord, summary: RunSummary, seconds: int, slo_ms: float) -> TargetRun:
    """A finished run with its per-second series."""
    return TargetRun(label, target, record, summary, per_second(record, seconds, slo_ms))
