"""The demo per tier: which tier each request belonged to, per-tier summaries, their table and plot.

A two-tier demo (`StackSettings.two_tiers`) sends the scenario's `gold_` keys to the top-priority
tier and the `demo_` keys to the bottom one; both share the one synthetic backend. For each run and
tier this reports the share of the tier's requests served 2xx within the SLO, over the whole run and
over the phase in which the backend's capacity is lowest (the scenario's cut), next to the usual
summary metrics of that tier's requests alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from ratepilot.demo.loadgen import RequestPlan, RunRecord
from ratepilot.demo.run import RunResult
from ratepilot.demo.schedule import LoadSchedule
from ratepilot.demo.summary import INTERVAL_S, RunSummary, outcome_masks, summarize

OTHER = "-"  # a request whose key matches no tier's prefix


def request_tiers(plan: RequestPlan | None, n: int, prefixes: dict[str, str], default_tier: str) -> np.ndarray:
    """The tier of each of n scheduled requests, from its API key's prefix (no plan: all default_tier)."""
    if plan is None:
        return np.full(n, default_tier, dtype=object)
    key_tier = np.array([next((t for t, p in prefixes.items() if key.startswith(p)), default_tier) for key in plan.keys], dtype=object)
    return key_tier[plan.key_index]


def subset(record: RunRecord, mask: np.ndarray) -> RunRecord:
    """The record of the requests in `mask` only."""
    part = RunRecord(record.offsets_s[mask])
    part.status[:] = record.status[mask]
    part.latency_s[:] = record.latency_s[mask]
    part.lag_s[:] = record.lag_s[mask]
    return part


def served_within_slo(record: RunRecord, slo_ms: float, start_s: float = 0.0, end_s: float = math.inf) -> float:
    """Share of the requests scheduled in [start_s, end_s) answered 2xx within the SLO (NaN without requests)."""
    window = (record.offsets_s >= start_s) & (record.offsets_s < end_s)
    ok, _, _ = outcome_masks(record.status)
    good = ok & (record.latency_s * 1000 <= slo_ms)
    sent = int(window.sum())
    return float((good & window).sum() / sent) if sent else math.nan


def lowest_capacity_phase(schedule: LoadSchedule) -> tuple[str, float, float]:
    """(name, start s, end s) of the phase with the lowest backend capacity (the cut)."""
    starts = [start for start, _ in schedule.phases] + [schedule.duration_s]
    spans = [(name, starts[i], starts[i + 1]) for i, (_, name) in enumerate(schedule.phases)]
    return min(spans, key=lambda span: float(np.mean(schedule.capacity_rps[span[1] : span[2]])) if span[2] > span[1] else math.inf)


@dataclass(frozen=True)
class TierReport:
    """One tier in one run."""

    summary: RunSummary
    served_within_slo: float  # share of its requests, whole run
    served_within_slo_cut: float  # share of its requests during the lowest-capacity phase

    def to_dict(self) -> dict[str, float | None]:
        """Plain numbers for JSON (NaN as None)."""
        out = self.summary.to_dict()
        out["served_within_slo"] = round(self.served_within_slo, 6)
        out["served_within_slo_cut"] = round(self.served_within_slo_cut, 6)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def tier_reports(
    result: RunResult, tiers: np.ndarray, schedule: LoadSchedule, slo_ms: float, error_budget: float
) -> dict[str, TierReport]:
    """Per tier (in order of first appearance), its report for one run."""
    _, cut_start, cut_end = lowest_capacity_phase(schedule)
    reports = {}
    for tier in dict.fromkeys(tiers.tolist()):
        part = subset(result.record, tiers == tier)
        reports[tier] = TierReport(
            summarize(part, float(schedule.duration_s), slo_ms, error_budget),
            served_within_slo(part, slo_ms),
            served_within_slo(part, slo_ms, cut_start, cut_end),
        )
    return reports


def tier_table(reports: dict[str, dict[str, TierReport]], schedule: LoadSchedule, priority: dict[str, int]) -> Table:
    """Rows tier x metric, one column per run: who kept its traffic when the backend shrank."""
    cut_name, cut_start, cut_end = lowest_capacity_phase(schedule)
    runs = list(reports)
    table = Table(title=f"per tier (priority: higher is served first); cut = '{cut_name}', {cut_start:.0f}-{cut_end:.0f} s")
    table.add_column("tier", style="bold")
    table.add_column("metric")
    for run in runs:
        table.add_column(run, justify="right")
    tiers = sorted(reports[runs[0]], key=lambda t: -priority.get(t, 0))
    for tier in tiers:
        label = f"{tier} (priority {priority[tier]})" if tier in priority else tier
        rows = (
            ("served within SLO, whole run", lambda r: f"{r.served_within_slo:.1%}"),
            ("served within SLO, during the cut", lambda r: f"{r.served_within_slo_cut:.1%}"),
            ("goodput within SLO", lambda r: f"{r.summary.goodput_rps:.1f} req/s"),
            ("throttled", lambda r: f"{r.summary.throttle_frac:.1%}"),
        )
        for i, (name, cell) in enumerate(rows):
            table.add_row(label if i == 0 else "", name, *(cell(reports[run][tier]) if tier in reports[run] else "-" for run in runs))
    return table


def tier_plot(path: Path, results: list[RunResult], tiers: np.ndarray, schedule: LoadSchedule, slo_ms: float) -> Path:
    """Per run: each tier's requests sent and its rate in force; each tier's share served within the SLO per 5 s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = schedule.duration_s
    names = list(dict.fromkeys(tiers.tolist()))
    colors = dict(zip(names, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False))
    fig, axes = plt.subplots(2, len(results), figsize=(6.5 * len(results), 6.5), sharex=True, squeeze=False)
    edges = np.arange(0, seconds + INTERVAL_S, INTERVAL_S)
    for col, result in enumerate(results):
        top, bottom = axes[0][col], axes[1][col]
        record = result.record
        ok, _, _ = outcome_masks(record.status)
        good = ok & (record.latency_s * 1000 <= slo_ms)
        for tier in names:
            mine = tiers == tier
            color = colors.get(tier, "0.3")
            sent = np.bincount(np.clip(record.offsets_s[mine].astype(int), 0, seconds - 1), minlength=seconds)
            top.plot(np.arange(seconds), sent, color=color, lw=0.8, alpha=0.6, label=f"{tier}: sent")
            rate = np.asarray(result.samples.tier_rate.get(tier, []), dtype=float)
            if rate.size:
                top.step(np.arange(1, rate.size + 1), rate, where="post", color=color, lw=1.8, label=f"{tier}: rate in force")
            sent_k, _ = np.histogram(record.offsets_s[mine], edges)
            good_k, _ = np.histogram(record.offsets_s[mine & good], edges)
            share = np.divide(good_k, sent_k, out=np.full(sent_k.shape, np.nan), where=sent_k > 0)
            bottom.step(edges[:-1], share, where="post", color=color, lw=1.5, label=f"{tier}: served within SLO")
        top.step(np.arange(seconds), schedule.capacity_rps, where="post", color="black", ls="--", lw=1, label="backend capacity")
        top.set_ylabel("requests/s")
        top.set_title(f"{result.mode}: per tier")
        bottom.axhline(0.95, color="0.5", ls=":", lw=1, label="95 %")
        bottom.set_ylim(-0.02, 1.05)
        bottom.set_ylabel(f"share of requests within SLO (per {INTERVAL_S} s)")
        bottom.set_xlabel("seconds")
        for ax in (top, bottom):
            for start, _name in schedule.phases[1:]:
                ax.axvline(start, color="0.8", lw=0.8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
