"""PNG per scenario: demand, capacity and each policy's rate; p99 latency per policy against the SLO."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from training.sim import INTERVAL_S  # noqa: E402


def plot_scenario(
    path: Path,
    title: str,
    demand: np.ndarray,
    capacity: np.ndarray,
    rates: dict[str, np.ndarray],
    p99_ms: dict[str, np.ndarray],
    slo_ms: float,
) -> Path:
    """Write one scenario's figure (one seed) to `path`; arrays are per control interval."""
    t = np.arange(1, demand.size + 1) * INTERVAL_S
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, constrained_layout=True)
    top.plot(t, demand, color="0.6", lw=1.5, label="demand")
    top.plot(t, capacity, color="black", lw=2, ls="--", label="capacity")
    for name, rate in rates.items():
        top.plot(t, rate, lw=1.2, label=f"{name} rate")
    top.set_ylabel("tokens/s")
    top.set_yscale("symlog", linthresh=max(float(np.nanmax(capacity)) / 10, 1.0))
    top.set_ylim(0, 4 * max(float(np.nanmax(capacity)), float(np.nanmax(demand))))
    top.legend(loc="upper left", fontsize=8, ncol=3)
    top.set_title(title)
    for name, p99 in p99_ms.items():
        bottom.plot(t, p99, lw=1.2, label=name)
    bottom.axhline(slo_ms, color="red", ls=":", label="SLO")
    bottom.set_yscale("log")
    bottom.set_ylabel("p99 latency (ms)")
    bottom.set_xlabel("time (s)")
    bottom.legend(loc="upper left", fontsize=8, ncol=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
