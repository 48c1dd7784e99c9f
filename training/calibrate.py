"""`ratepilot calibrate`: fit the simulator's service model to a backend's history in Prometheus.

    ratepilot calibrate --prometheus-url http://127.0.0.1:9090 --start now-15m --end now --out calibration.json
    ratepilot train --calibration calibration.json ...      # train on worlds with this backend
    ratepilot evaluate --calibration calibration.json ...   # evaluate on them
    ratepilot calibrate --prometheus-url URL --start T --end T --check calibration.json   # replay another recording

Reads the edge's series (`training.history`), fits capacity, the latency-vs-load curve, the error
onset and the metric lag (`training.calibration`), writes the versioned calibration file, a PNG of
the fits beside it, and replays the recorded window in the calibrated simulator
(`training.replay`): the goodput within SLO and p99 it predicts for the recording. `--check FILE`
fits nothing and writes nothing: it replays the recording with an existing calibration (out of
sample: calibrate on one run, check on another).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from limiter.paths import OutputPathError, check_outputs
from training.calibration import (
    Calibration,
    CalibrationError,
    History,
    capacity_series,
    fit_calibration,
    pooled_p99,
)
from training.history import HistoryError, Recording, parse_duration_s, parse_time, read_history
from training.latency import service_p99_ms
from training.replay import ReplayResult, replay

MAX_FILE_BYTES = 1_000_000  # a calibration file is a few hundred bytes; anything this big is not one


def load_calibration(path: str | Path) -> Calibration:
    """The calibration in a file; CalibrationError naming the file when it is missing or not a valid calibration."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise CalibrationError(f"{path}: too large for a calibration file")
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: not JSON ({exc})") from None
    try:
        return Calibration.from_dict(data)
    except CalibrationError as exc:
        raise CalibrationError(f"{path}: {exc}") from None


def write_calibration(calibration: Calibration, path: Path) -> Path:
    """Write the calibration file (JSON, indented)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n")
    return path


def replay_recording(calibration: Calibration, recording: Recording, burst_s: float) -> ReplayResult | None:
    """The calibrated simulator's replay of a 1 s recording (None when it has no rate in force or another step)."""
    h = recording.history
    if h.step_s != 1.0 or not np.isfinite(recording.rate_tps).any():
        return None
    busy = np.flatnonzero(np.nan_to_num(recording.offered_tps) > 0)  # the seconds with traffic
    if busy.size == 0:
        return None
    span = slice(int(busy[0]), int(busy[-1]) + 1)
    rate = recording.rate_tps[span].copy()
    rate[~np.isfinite(rate)] = np.nanmedian(recording.rate_tps)
    demand = np.nan_to_num(recording.offered_tps[span], nan=0.0)
    capacity = capacity_series(h, calibration.capacity_tps)[span]
    try:
        return replay(calibration, demand, rate, capacity, burst_s=burst_s)
    except ValueError:  # shorter than two intervals of traffic
        return None


def plot_fit(path: Path, calibration: Calibration, history: History) -> Path:
    """p99 against CPU with the fitted curve, and the error share against offered utilisation with the onset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = calibration
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    left.scatter(history.cpu, history.p99_ms, s=8, alpha=0.4, label="recorded (step)")
    rho_bins, p99_bins, _ = pooled_p99(history, history.cpu)
    left.scatter(rho_bins, p99_bins, s=30, marker="D", color="tab:orange", label="answers pooled per CPU bin (fitted)")
    rho = np.linspace(0.0, 0.97, 200)
    left.plot(rho, service_p99_ms(rho, c.base_latency_ms, c.knee_a, c.knee_k), color="black", label="fitted curve")
    left.axhline(c.slo_ms, color="red", ls=":", label="SLO")
    left.set_xlabel("backend CPU (utilisation)")
    left.set_ylabel("p99 latency (ms)")
    left.set_title(f"base {c.base_latency_ms:.0f} ms, knee a={c.knee_a:.2g} k={c.knee_k:g}")
    left.legend(fontsize=8)
    with np.errstate(invalid="ignore", divide="ignore"):
        util = history.admitted_tps / capacity_series(history, c.capacity_tps)
        share = np.nan_to_num(history.error_rps) / history.finished_rps
    right.scatter(util, share, s=8, alpha=0.5, label="recorded (step)")
    u = np.linspace(0.0, max(1.5, float(np.nanmax(util)) if np.isfinite(util).any() else 1.5), 200)
    if c.error_onset_slope > 0:
        onset = 1.0 / (1.0 + np.exp(-np.clip(c.error_onset_slope * (u - c.error_onset_util), -50, 50)))
        right.plot(u, np.maximum(onset, c.base_error_rate), color="black", label="fitted onset")
    right.set_xlabel("offered utilisation (admitted / capacity at the time)")
    right.set_ylabel("error share")
    right.set_title(f"capacity {c.capacity_tps:.1f} tokens/s, lag {c.lag_s:.1f} s")
    right.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary_table(calibration: Calibration, predicted: ReplayResult | None) -> Table:
    """The fitted model and its quality figures."""
    table = Table(title="calibration")
    table.add_column("parameter")
    table.add_column("value", justify="right")
    for key, value in calibration.to_dict()["model"].items():
        table.add_row(key, "-" if value is None else f"{value:.4g}")
    for key, value in calibration.quality.items():
        table.add_row(f"[dim]{key}[/]", f"{value:.4g}")
    if predicted is not None:
        table.add_row("replay: goodput within SLO (req/s)", f"{predicted.goodput_rps:.2f}")
        table.add_row("replay: p99 (ms)", f"{predicted.p99_ms:.0f}")
        table.add_row("replay: error share", f"{predicted.error_frac:.3f}")
    return table


def build_parser() -> argparse.ArgumentParser:
    """The `ratepilot calibrate` argument parser."""
    parser = argparse.ArgumentParser(prog="ratepilot calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus-url", required=True, help="the Prometheus that scraped the edge, e.g. http://127.0.0.1:9090")
    parser.add_argument("--start", required=True, help="start of the recording: unix seconds, ISO 8601 (UTC) or now-15m")
    parser.add_argument("--end", required=True, help="end of the recording (same forms; now for the present)")
    parser.add_argument("--out", type=Path, default=Path("calibration.json"), help="the calibration file (default calibration.json)")
    parser.add_argument("--plot", type=Path, help="PNG of the fits (default: OUT with .png)")
    parser.add_argument("--slo-ms", type=float, default=300.0, help="the latency SLO the backend runs under (default 300)")
    parser.add_argument("--step", type=float, default=1.0, help="seconds between samples (default 1; 1 also replays the recording)")
    parser.add_argument("--window", default="5s", help="rate window of the fitted series (default 5s, the simulator's interval)")
    parser.add_argument("--instant-window", default="2s", help="shortest rate window, two scrapes (default 2s)")
    parser.add_argument("--view-window", default="10s", help="the controller's rate window, whose lag is measured (default 10s)")
    parser.add_argument("--burst-s", type=float, default=1.0, help="the limiter's burst, seconds of the rate, for the replay (default 1)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="seconds to wait for each Prometheus answer (default 10)")
    parser.add_argument("--check", type=Path, metavar="FILE", help="replay the recording with this calibration instead of fitting (writes nothing)")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `ratepilot calibrate`."""
    args = build_parser().parse_args(argv)
    console = Console()
    plot_path = args.plot or args.out.with_suffix(".png")
    try:
        checked = load_calibration(args.check) if args.check else None
        if checked is None:
            check_outputs(files={"--out": args.out, "--plot": plot_path})
        start, end = parse_time(args.start, "--start"), parse_time(args.end, "--end")
        for option, value, top in (("--slo-ms", args.slo_ms, 1e6), ("--burst-s", args.burst_s, 3600), ("--timeout-s", args.timeout_s, 600)):
            if not (math.isfinite(value) and 0 < value <= top):
                raise HistoryError(f"{option} {value!r}: must be a positive number up to {top:g}")
        instant_s = parse_duration_s(args.instant_window, "--instant-window")
        with console.status(f"reading the recording from {args.prometheus_url}"):
            recording = read_history(
                args.prometheus_url, start, end, args.step, args.window, args.instant_window, args.view_window, args.timeout_s
            )
        source = {"prometheus_url": args.prometheus_url, "start": args.start, "end": args.end, "start_unix": f"{start:.3f}",
                  "end_unix": f"{end:.3f}", "window": args.window, "view_window": args.view_window}  # fmt: skip
        calibration = checked or fit_calibration(recording.history, args.slo_ms, instant_s, source)
        predicted = replay_recording(calibration, recording, args.burst_s)
        if checked is not None and predicted is None:
            raise HistoryError("--check: the recording has no rate in force (ratepilot_refill_rate) or fewer than 10 s of traffic at --step 1")
    except (HistoryError, CalibrationError, OutputPathError) as exc:
        print(f"ratepilot calibrate: {exc}", file=sys.stderr)
        return 2
    if checked is not None:
        console.print(summary_table(calibration, predicted))
        return 0
    out = write_calibration(calibration, args.out)
    png = plot_fit(plot_path, calibration, recording.history)
    console.print(summary_table(calibration, predicted))
    console.print(f"calibration: {out}\nplot: {png}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
