"""The live terminal view of a run (rich), redrawn once a second; a plain line every 10 s without a terminal."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.table import Table


@dataclass
class Sample:
    """What the view shows for one second of a run."""

    second: int
    duration_s: int
    phase: str
    demand_rps: float
    sent_rps: float
    admitted_rps: float
    throttled_rps: float
    error_rps: float
    p99_ms: float
    slo_ms: float
    cpu: float
    capacity_rps: float
    rate: float
    rate_source: str
    rule: str


def _num(value: float, fmt: str = "{:.0f}") -> str:
    return "-" if value is None or not math.isfinite(value) else fmt.format(value)


def render(title: str, sample: Sample) -> Table:
    """The table of one sample."""
    table = Table(title=title, show_header=True, header_style="bold", min_width=60)
    table.add_column("", style="bold")
    table.add_column("now", justify="left")
    p99_style = "red" if math.isfinite(sample.p99_ms) and sample.p99_ms > sample.slo_ms else "green"
    rows = [
        ("time", f"{sample.second:>4d} / {sample.duration_s} s   {sample.phase}"),
        ("demand", f"{_num(sample.demand_rps)} req/s scheduled, {_num(sample.sent_rps)} sent"),
        ("admitted", f"[green]{_num(sample.admitted_rps)}[/] req/s"),
        ("throttled", f"[yellow]{_num(sample.throttled_rps)}[/] req/s (429)"),
        ("errors", f"[red]{_num(sample.error_rps)}[/] req/s (5xx, timeouts)"),
        ("p99 latency", f"[{p99_style}]{_num(sample.p99_ms)}[/] ms  (SLO {sample.slo_ms:g} ms)"),
        ("backend CPU", f"{_num(sample.cpu * 100 if math.isfinite(sample.cpu) else math.nan)} %"),
        ("backend capacity", f"{_num(sample.capacity_rps)} req/s"),
        ("rate in force", f"[bold]{_num(sample.rate)}[/] tokens/s  (source: {sample.rate_source})"),
        ("set by", sample.rule),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def line(title: str, sample: Sample) -> str:
    """One plain progress line (logs, CI, no terminal)."""
    return (
        f"[{title}] {sample.second}/{sample.duration_s}s {sample.phase}: demand {_num(sample.demand_rps)} "
        f"admitted {_num(sample.admitted_rps)} throttled {_num(sample.throttled_rps)} errors {_num(sample.error_rps)} "
        f"p99 {_num(sample.p99_ms)} ms cpu {_num(sample.cpu * 100 if math.isfinite(sample.cpu) else math.nan)}% "
        f"rate {_num(sample.rate)} ({sample.rate_source}; {sample.rule})"
    )


class LiveView:
    """Context manager: `show(sample)` redraws the rich table, or prints a line every 10 s off a terminal."""

    def __init__(self, console: Console, title: str, line_every_s: int = 10):
        self.console = console
        self.title = title
        self.line_every_s = line_every_s
        self._live: Live | None = None

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def show(self, sample: Sample) -> None:
        """Draw one sample."""
        if self._live is not None:
            self._live.update(render(self.title, sample), refresh=True)
        elif sample.second % self.line_every_s == 0 or sample.second >= sample.duration_s:
            self.console.print(line(self.title, sample), highlight=False, markup=False)

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
