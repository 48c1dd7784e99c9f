"""`ratepilot bench controller`: tick latency for 1, 100 and 10,000 tiers against real Prometheus and Redis.

For each size: a synthetic exporter serving that many tiers (the limiter/edge metric names), a
Prometheus of its own scraping it, a redis-server, and a controller replica holding the lease with
the RL policy (vectorised numpy inference). A tick is the real one: read the world in one pipeline,
five PromQL queries in parallel (started before the Redis read), observation, policy, safety engine, one fenced EVALSHA that writes
every tier and appends every decision. Besides the whole tick it times the Prometheus read and the
Redis write on their own. Two variants per size: the raw PromQL (no rules loaded: the fallback path)
and the default queries reading the deploy's `ratepilot.controller` recording rules, with
Prometheus's own CPU use and rule-evaluation time recorded beside the tick figures. Target: 10,000 tiers under 1 s per tick, growth no worse than linear.

Ticks are paced as the service runs them: one per `loop.tick_interval_s` (5 s) on average, each
started at a random phase (spacing uniform in 0.5-1.5 intervals) so that the ticks sample every
point of Prometheus's 5 s scrape and rule-evaluation cycle instead of locking onto one.
`--back-to-back` runs them without pause (the measurement of earlier results): the controller then
uses a core continuously and competes with the Prometheus it reads, which a real loop does not do.

Everything runs on this machine. The synthetic exporter stands in for edge replicas that in
production run elsewhere; it serves pre-built series text with the values formatted in (see
benchmarks/synthetic_exporter.py), so its own CPU per scrape is small. Prometheus, the recording rules and
Redis do their real work here and share the cores with the controller.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.progress import Progress

from controller.policies import LoadedPolicy
from controller.runtime import Controller
from controller.settings import default_config_text, raw_queries, settings_from_mapping
from policy import rl
from ratepilot.servers import ManagedProcess, PrometheusServer, RedisServer, free_port

# As in deploy/prometheus/prometheus.yml and the controller's 5 s tick: the 15 s rate windows see 3
# scrapes. A 1 s scrape of 10,000 tiers (170,000 samples, from a Python exporter) would keep
# Prometheus and the exporter busy on the 2 cores the tick itself needs.
SCRAPE_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `ratepilot bench controller`."""
    parser.add_argument("--tiers", type=int, nargs="+", default=[1, 100, 10_000], help="tier counts to measure")
    parser.add_argument("--ticks", type=int, default=20, help="measured ticks per size (after 2 warm-up ticks)")
    parser.add_argument("--raw-only", action="store_true", help="skip the recording-rules variant")
    parser.add_argument("--back-to-back", action="store_true", help="tick without pause instead of once per tick interval")


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def _wait_for_data(url: str, n_tiers: int, timeout_s: float = 90.0, expr: str | None = None) -> None:
    expr = expr or 'count(rate(ratepilot_decision_tokens_total{outcome="allowed"}[15s]) > 0)'
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=5) as r:
                result = json.loads(r.read())["data"]["result"]
            if result and int(float(result[0]["value"][1])) >= n_tiers:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"Prometheus had no rate data for {n_tiers} tiers within {timeout_s:g} s")


def _settings(n: int, redis_url: str, prometheus_url: str, queries: dict[str, Any] | None) -> Any:
    data = yaml.safe_load(default_config_text())
    data["redis"]["url"] = redis_url
    data["prometheus"].update(url=prometheus_url, window="15s", timeout_s=30)
    if queries:
        data["prometheus"]["queries"] = queries
    data["loop"]["decisions_maxlen"] = max(10_000, n)
    data["replica_id"] = "bench"
    data["tiers"] = {f"t{i:05d}": {"static_rate": 100, "min_rate": 10, "max_rate": 1000} for i in range(n)}
    return settings_from_mapping(data, env={})


DEPLOY_RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "rules" / "recording.yml"
CONTROLLER_GROUP = "ratepilot.controller"  # the controller's inputs; the dashboard groups are not the tick's cost


def controller_rules() -> str:
    """The deploy's recording-rule group the controller's default queries read, as a rule file."""
    data = yaml.safe_load(DEPLOY_RULES.read_text())
    data["groups"] = [g for g in data["groups"] if g["name"] == CONTROLLER_GROUP]
    if not data["groups"]:
        raise RuntimeError(f"{DEPLOY_RULES} has no group {CONTROLLER_GROUP}")
    return str(yaml.safe_dump(data))


RAW_QUERIES = {name: {"expr": expr, **({"fill": 0.0} if name.endswith("_rps") else {})} for name, expr in raw_queries().items()}


def _prometheus_self(url: str) -> dict[str, float]:
    """Prometheus's own CPU seconds and the controller rule group's last evaluation time."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    out: dict[str, float] = {}
    for line in lines:
        if line.startswith("process_cpu_seconds_total "):
            out["cpu_s"] = float(line.split()[1])
        elif line.startswith("prometheus_rule_group_last_duration_seconds") and CONTROLLER_GROUP in line:
            out["rule_group_s"] = float(line.split()[1])
    return out


def _pause(interval_s: float, elapsed_s: float, rng: random.Random) -> None:
    """Sleep so that tick starts are on average `interval_s` apart, at a random phase (0: no pause)."""
    if interval_s > 0:
        time.sleep(max(0.0, rng.uniform(0.5, 1.5) * interval_s - elapsed_s))


def measure(n: int, ticks: int, workdir: Path, redis: RedisServer, recorded: bool, back_to_back: bool = False) -> dict[str, float]:
    """Tick, Prometheus-read and Redis-write latencies for n tiers (raw PromQL or recording rules)."""
    tiers = [f"t{i:05d}" for i in range(n)]
    port = free_port()
    exporter = ManagedProcess("exporter", [sys.executable, "-m", "benchmarks.synthetic_exporter", "--tiers", str(n), "--port", str(port)],
                              port, workdir / f"exporter-{n}")  # fmt: skip
    exporter.start()
    rules = workdir / f"rules-{n}.yml"
    rules.write_text(controller_rules())
    prometheus = PrometheusServer([f"127.0.0.1:{port}"], workdir=workdir / f"prom-{n}-{recorded}", scrape_interval_s=SCRAPE_S,
                                  rule_files=[rules] if recorded else None)  # fmt: skip
    prometheus.start()
    try:
        _wait_for_data(prometheus.url, n)
        settings = _settings(n, redis.url, prometheus.url, None if recorded else RAW_QUERIES)
        if recorded:
            _wait_for_data(prometheus.url, n, expr="count(tier:ratepilot_backend_latency_ms:p99_rate15s > 0)")
        policy = rl.RLPolicy(rl.PolicyNetwork.zeros(hidden=16))
        controller = Controller(settings, LoadedPolicy(policy, "rl"))
        controller.redis.flushall()
        if not controller.lease.try_acquire_or_renew():
            raise RuntimeError("the benchmark replica could not take the lease")
        tick_ms, read_ms, write_ms = [], [], []
        interval_s, rng = (0.0 if back_to_back else settings.loop.tick_interval_s), random.Random(n)
        before, started_at = _prometheus_self(prometheus.url), time.monotonic()
        for i in range(ticks + 2):
            controller.lease.try_acquire_or_renew()
            started = time.perf_counter()
            report = controller.loop.tick()
            elapsed = (time.perf_counter() - started) * 1000
            if report.result != "written":
                raise RuntimeError(f"tick {i} with {n} tiers: {report.result} {report.errors}")
            if i >= 2:
                tick_ms.append(elapsed)
            _pause(interval_s, elapsed / 1000, rng)
        after = _prometheus_self(prometheus.url)
        prometheus_cores = (after["cpu_s"] - before["cpu_s"]) / (time.monotonic() - started_at)
        in_force = controller.settings.tier_array("static_rate")
        bursts = in_force * 2
        decisions = ["{}"] * n
        for _ in range(ticks):
            controller.lease.try_acquire_or_renew()
            started = time.perf_counter()
            reading = controller.source.read(in_force)
            if reading.fallbacks and recorded:
                raise RuntimeError(f"the recording rules did not answer {reading.fallbacks}")
            read_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            controller.store.write("bench", controller.lease.token(), tiers, in_force, bursts, ["controller"] * n, decisions, True)
            write_ms.append((time.perf_counter() - started) * 1000)
            _pause(interval_s, (read_ms[-1] + write_ms[-1]) / 1000, rng)
        controller.stop()
    finally:
        prometheus.stop()
        exporter.stop()
    return {
        "tick_ms_p50": statistics.median(tick_ms),
        "tick_ms_p99": _percentile(tick_ms, 99),
        "prometheus_read_ms_p50": statistics.median(read_ms),
        "redis_write_ms_p50": statistics.median(write_ms),
        "ticks": float(len(tick_ms)),
        "prometheus_cpu_cores": prometheus_cores,  # Prometheus's own CPU while the ticks ran (scrapes, rules, queries)
        **({"rule_group_eval_s": after["rule_group_s"]} if "rule_group_s" in after else {}),
    }


def plot(sizes: dict[str, dict[str, float]], path: Path, recorded: dict[str, dict[str, float]] | None = None) -> None:
    """Tick latency against tier count, log-log, with the 1 s target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [int(k) for k in sizes]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("tick_ms_p50", "tick p50"), ("tick_ms_p99", "tick p99"),
                       ("prometheus_read_ms_p50", "Prometheus read p50"), ("redis_write_ms_p50", "Redis write p50")):  # fmt: skip
        ax.plot(n, [sizes[str(k)][key] for k in n], marker="o", label=label)
    if recorded:
        m = sorted(int(k) for k in recorded)
        ax.plot(m, [recorded[str(k)]["tick_ms_p50"] for k in m], marker="s", linestyle=":", label="tick p50, recording rules")
        ax.plot(m, [recorded[str(k)]["tick_ms_p99"] for k in m], marker="s", linestyle=":", label="tick p99, recording rules")
    ax.axhline(1000, color="red", linestyle="--", label="target: 1 s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tiers")
    ax.set_ylabel("ms")
    ax.set_title("ratepilot controller tick latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every size; returns per-size figures, flat tick keys and the growth ratios."""
    if any(n < 1 for n in args.tiers) or args.ticks < 1:
        raise ValueError("--tiers and --ticks must be positive")
    workdir = Path(tempfile.mkdtemp(prefix="ratepilot-bench-controller-"))
    redis = RedisServer(workdir=workdir / "redis")
    redis.start()
    sizes: dict[str, dict[str, float]] = {}
    recorded_sizes: dict[str, dict[str, float]] = {}
    try:
        with Progress() as progress:
            variants = [False] if args.raw_only else [False, True]
            task = progress.add_task("controller ticks", total=len(args.tiers) * len(variants))
            for recorded in variants:
                for n in sorted(args.tiers):
                    progress.update(task, description=f"{n} tiers, {'recording rules' if recorded else 'raw PromQL'}")
                    (recorded_sizes if recorded else sizes)[str(n)] = measure(n, args.ticks, workdir, redis, recorded,
                                                                              getattr(args, "back_to_back", False))  # fmt: skip
                    progress.advance(task)
    finally:
        redis.stop()
    pacing = "back-to-back" if getattr(args, "back_to_back", False) else "one per tick interval (5 s), random phase"
    result: dict[str, Any] = {"sizes": sizes, "scrape_interval_s": SCRAPE_S, "ticks_per_size": args.ticks, "tick_pacing": pacing}
    if recorded_sizes:
        result["recording_rules"] = {"sizes": recorded_sizes}
        for n, figures in recorded_sizes.items():
            result["recording_rules"][f"tick_ms_p50_{n}"] = figures["tick_ms_p50"]
            result["recording_rules"][f"tick_ms_p99_{n}"] = figures["tick_ms_p99"]
    for n, figures in sizes.items():
        result[f"tick_ms_p50_{n}"] = figures["tick_ms_p50"]
        result[f"tick_ms_p99_{n}"] = figures["tick_ms_p99"]
    ordered = sorted(sizes, key=int)
    for small, large in zip(ordered, ordered[1:], strict=False):
        # time ratio against tier ratio: <= 1 means growth no worse than linear
        time_ratio = sizes[large]["tick_ms_p50"] / sizes[small]["tick_ms_p50"]
        result[f"growth_{large}_vs_{small}"] = {"tier_ratio": int(large) / int(small), "tick_p50_ratio": time_ratio,
                                                "per_tier_cost_ratio": time_ratio / (int(large) / int(small))}  # fmt: skip
    if int(ordered[-1]) >= 10_000:
        result["target_met_raw_promql"] = bool(sizes[ordered[-1]]["tick_ms_p99"] < 1000.0)
        if recorded_sizes:
            result["target_met_recording_rules"] = bool(recorded_sizes[ordered[-1]]["tick_ms_p99"] < 1000.0)
    json_path = getattr(args, "json", None)
    if json_path is not None:
        plot(sizes, Path(json_path).with_suffix(".png"), recorded_sizes or None)
    return result
