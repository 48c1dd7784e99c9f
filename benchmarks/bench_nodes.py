"""`ratepilot bench nodes`: one client hammering one tier through 1, 3 and 6 real edge processes, local mode
against strict in the same run.

For each fleet size the edges run on one throwaway redis-server with one config holding two tiers
with the same limits: `local` (`mode: local`) and `strict`. One client id hammers the local tier
through every edge for `--seconds` (closed loop, `--connections` per edge), then a fresh client id
the strict tier the same way. Per size the JSON gives what local mode admitted, the stated bound
for that run (burst + rate x the run's span: docs/limiter.md "Many edge nodes"; local mode adds
nothing to it while every node reaches Redis) and what strict mode admitted. Targets: admitted <=
bound and >= 0.95 x strict.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from rich.progress import Progress

from benchmarks.fleet import EdgeNode, hammer, sample, wait_for
from ratepilot.servers import RedisServer

SIZES = (1, 3, 6)
CLIENT_RATE, CLIENT_BURST = 100.0, 50.0  # the client bucket binds; the tier never does
CONFIG = """redis:
  url: {url}
  timeout_ms: 100
default_tier: strict
tiers:
  local:
    client:    {{rate: {rate}, burst: {burst}}}
    aggregate: {{rate: 1000000, burst: 1000000}}
    mode: local
    key_prefixes: [local_]
  strict:
    client:    {{rate: {rate}, burst: {burst}}}
    aggregate: {{rate: 1000000, burst: 1000000}}
    key_prefixes: [strict_]
nodes:
  heartbeat_s: 0.5
  expiry_s: 1.5
local_mode:
  sync_s: {sync_s}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `ratepilot bench nodes`."""
    parser.add_argument("--seconds", type=float, default=5.0, help="hammer time per mode and fleet size (default 5)")
    parser.add_argument("--connections", type=int, default=4, help="keep-alive connections per edge (default 4)")
    parser.add_argument("--sync-s", type=float, default=0.1, help="local_mode.sync_s of the run (default 0.1)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="fleet sizes (default 1,3,6)")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(not 1 <= size <= 16 for size in sizes):
        raise ValueError(f"--sizes must be between 1 and 16 edges each, got {text!r}")
    return sizes


def measure_size(size: int, config: Path, workdir: Path, seconds: float, connections: int) -> dict[str, Any]:
    """Start `size` edges, hammer the local tier then the strict one; stop them."""
    nodes = [EdgeNode(config, workdir / f"n{size}-{i}") for i in range(size)]
    try:
        for node in nodes:
            node.start()
        wait_for(lambda: all(sample(n.metrics(), "ratepilot_live_nodes") == size for n in nodes), 30, f"{size} live nodes")
        urls = [node.url for node in nodes]
        local = hammer(urls, f"local_{secrets.token_hex(4)}", seconds, connections)
        strict = hammer(urls, f"strict_{secrets.token_hex(4)}", seconds, connections)
        lease_share = sum(sample(n.metrics(), "ratepilot_decisions_total", {"tier": "local", "source": "lease"}) for n in nodes)
        local_total = sum(sample(n.metrics(), "ratepilot_decisions_total", {"tier": "local"}) for n in nodes)
    finally:
        for node in nodes:
            node.stop()
    bound = CLIENT_BURST + CLIENT_RATE * local.seconds
    return {
        "admitted": local.admitted,
        "bound": round(bound, 1),
        "strict_admitted": strict.admitted,
        "strict_bound": round(CLIENT_BURST + CLIENT_RATE * strict.seconds, 1),
        "admitted_over_strict": round(local.admitted / max(1, strict.admitted), 4),
        "target_within_bound": local.admitted <= bound + 1,  # + 1: the last request may straddle the span's end
        "target_at_least_095_strict": local.admitted >= 0.95 * strict.admitted,
        "requests_local": sum(sum(s.values()) for s in local.statuses.values()),
        "requests_strict": sum(sum(s.values()) for s in strict.statuses.values()),
        "lease_decision_share": round(lease_share / max(1.0, local_total), 4),
        "seconds": round(local.seconds, 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every fleet size in turn; returns {"nodes": {size: figures}, "setup": ...}."""
    sizes = _sizes(args.sizes)
    if not (args.seconds > 0 and args.connections >= 1 and 0.01 <= args.sync_s <= 10):
        raise ValueError("--seconds must be positive, --connections at least 1 and --sync-s in [0.01, 10]")
    load_at_start = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="ratepilot-bench-nodes-"))
    server = RedisServer(workdir=workdir / "redis")
    server.start()
    results: dict[str, Any] = {}
    try:
        config = workdir / "limiter.yaml"
        config.write_text(CONFIG.format(url=server.url, rate=CLIENT_RATE, burst=CLIENT_BURST, sync_s=args.sync_s))
        with Progress(transient=True) as progress:
            task = progress.add_task("bench nodes", total=len(sizes))
            for size in sizes:
                progress.update(task, description=f"{size} edge(s)")
                results[str(size)] = measure_size(size, config, workdir, args.seconds, args.connections)
                progress.advance(task)
    finally:
        server.stop()
    plot(results, args.json.with_suffix(".png"))
    return {
        "nodes": results,
        "setup": {
            "client_rate": CLIENT_RATE,
            "client_burst": CLIENT_BURST,
            "sync_s": args.sync_s,
            "seconds": args.seconds,
            "connections_per_edge": args.connections,
            "loadavg_1m_start": load_at_start,
            "loadavg_1m_end": os.getloadavg()[0],
        },
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """Grouped bars per fleet size: local admitted, strict admitted, the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results)
    x = range(len(sizes))
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, (key, label, color) in enumerate(
        (("admitted", "local admitted", "tab:orange"), ("strict_admitted", "strict admitted", "tab:gray"), ("bound", "bound", "tab:blue"))
    ):
        ax.bar([i + (offset - 1) * 0.27 for i in x], [results[s][key] for s in sizes], width=0.27, label=label, color=color)
    ax.set_xticks(list(x), [f"{s} edge(s)" for s in sizes])
    ax.set_ylabel("requests admitted (one client id)")
    ax.set_title("ratepilot bench nodes: local mode vs strict")
    ax.legend(loc="lower center", ncols=3, fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
