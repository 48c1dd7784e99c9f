"""`ratepilot bench policy`: the learned policy's cost per tier per tick, beside a baseline and the builder.

Per tick of the controller, a policy costs `ObservationBuilder.build` (metrics -> features, with the
builder's history and capacity estimate) plus `act` (features -> rates). Timed here for 1, 100 and
10,000 tiers, in CPU microseconds per tier (median of `--rounds` interleaved rounds; the machine is
shared, so other processes' load does not count):

* `rl_act_us_per_tier`: `RLPolicy.act` of the committed default policy (numpy inference);
* `aimd_act_us_per_tier`: the AIMD baseline's `act` on the same observations (the peer);
* `build_us_per_tier`: `ObservationBuilder.build` alone (the raw operation both need);
* `rl_over_aimd`: the ratio of the two `act` figures.

Target (issue 18): rl inference under 50 µs per tier; the model file stays a few KB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np

INFERENCE_TARGET_US = 50.0  # µs per tier the issue allows the policy's numpy inference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `ratepilot bench policy`."""
    parser.add_argument("--tiers", default="1,100,10000", help="comma-separated tier counts (default 1,100,10000)")
    parser.add_argument("--ticks", type=int, default=200, help="timed ticks per round for 1 tier, fewer for more tiers (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median counts (default 5)")
    parser.add_argument("--model", default=None, help="policy file (default: the committed default policy)")


def _metrics(rng: np.random.Generator, tiers: int) -> Any:
    from policy.observation import IntervalMetrics

    rate = rng.uniform(100.0, 1000.0, tiers)
    return IntervalMetrics(
        p99_latency_ms=rng.uniform(50.0, 500.0, tiers), error_rate=rng.uniform(0.0, 0.02, tiers),
        cpu=rng.uniform(0.2, 1.0, tiers), admitted_rps=rate * rng.uniform(0.5, 1.0, tiers),
        throttled_rps=rate * rng.uniform(0.0, 0.5, tiers), rate=rate,
    )  # fmt: skip


def _cpu_us(loop: Any) -> float:
    start = time.process_time()
    loop()
    return (time.process_time() - start) * 1e6


def _round(tiers: int, ticks: int, policy: Any, seed: int) -> dict[str, float]:
    """CPU µs per tier per tick of build, rl act and aimd act over `ticks` ticks."""
    from policy.observation import ObservationBuilder
    from policy.registry import make_policy

    rng = np.random.default_rng(seed)
    metrics = [_metrics(rng, tiers) for _ in range(8)]
    builder = ObservationBuilder(slo_ms=np.full(tiers, 300.0), reference_rate=np.full(tiers, 500.0))
    observations = [builder.build(m) for m in metrics]
    aimd = make_policy("aimd")

    def build() -> None:
        for k in range(ticks):
            builder.build(metrics[k % 8])

    def rl() -> None:
        for k in range(ticks):
            policy.act(observations[k % 8])

    def baseline() -> None:
        for k in range(ticks):
            aimd.act(observations[k % 8])

    per = ticks * tiers
    return {"build": _cpu_us(build) / per, "rl": _cpu_us(rl) / per, "aimd": _cpu_us(baseline) / per}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Interleave the tier counts over the rounds; report medians per tier count."""
    from pathlib import Path

    from policy.rl import DEFAULT_MODEL_PATH, load

    tier_counts = [int(t) for t in str(args.tiers).split(",") if t.strip()]
    if not tier_counts or min(tier_counts) < 1 or args.ticks < 1 or args.rounds < 1:
        raise ValueError("--tiers, --ticks and --rounds must be >= 1")
    path = Path(args.model) if args.model else DEFAULT_MODEL_PATH
    policy = load(path)
    samples: dict[int, list[dict[str, float]]] = {t: [] for t in tier_counts}
    for r in range(args.rounds):
        for tiers in tier_counts:
            ticks = max(3, args.ticks // max(1, tiers // 10))
            samples[tiers].append(_round(tiers, ticks, policy, seed=r))
    out: dict[str, Any] = {}
    for tiers, rows in samples.items():
        med = {key: statistics.median(row[key] for row in rows) for key in ("build", "rl", "aimd")}
        out[f"tiers_{tiers}"] = {
            "rl_act_us_per_tier": round(med["rl"], 3),
            "aimd_act_us_per_tier": round(med["aimd"], 3),
            "build_us_per_tier": round(med["build"], 3),
            "rl_over_aimd": round(med["rl"] / med["aimd"], 2) if med["aimd"] > 0 else None,
            "rl_meets_50us": med["rl"] < INFERENCE_TARGET_US,
        }
    out["model"] = {"path": path.name, "bytes": path.stat().st_size, "features": len(policy.meta.get("features", []))}
    out["setup"] = {"rounds": args.rounds, "ticks_1_tier": args.ticks, "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    return out
