"""`ratepilot bench rls`: Envoy's ShouldRateLimit against `ratepilot rls` and against a no-op servicer.

How it measures (all processes local, on this machine's cores):

- a throwaway redis-server;
- `ratepilot rls` itself (the CLI, in its own process, metrics on a side port) with one tier whose
  rates are so high that nothing is refused: every call runs the Lua check-and-consume on Redis;
- a no-op RateLimitService servicer on the same stack (grpc.aio server, default options, own
  process) that answers OK with one status per descriptor without looking at anything;
- the load generator, a grpc.aio client in a third process: one descriptor per call
  (`client_id` from 100 keys in rotation). Saturation: `concurrency` calls kept in flight for
  `duration` seconds, calls/s counted. Latency: OPEN-LOOP at `rate` calls/s (arrivals on a fixed
  schedule, independent of replies); a call's latency counts from its scheduled start.

Rounds alternate the two servers, so both see the same background load; throughput is the best
round of each, latency percentiles pool the samples of all rounds; `rls_added_p99_ms` is the rls
p99 minus the no-op p99. The run fails (RuntimeError) if any call errors or is refused, or if the
rls did not decide (nearly) every call on Redis: a figure from fallback decisions would be no figure.

The Python client takes a core of its own; on this 2-core machine it competes with the server
under test, so the absolute calls/s are a floor; the ratio is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from rich.progress import Progress

from ratepilot.servers import ManagedProcess, RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]
KEYS = 100
TARGET_RATIO = 0.7
TARGET_ADDED_P99_MS = 1.0
CONFIG = """
redis: {url: REDIS_URL, timeout_ms: 100}
default_tier: bench
tiers:
  bench:
    client:    {rate: 1000000, burst: 1000000}
    aggregate: {rate: 1000000, burst: 1000000}
rate_table: {poll_s: 5}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options."""
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per round and measurement")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per server")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight at saturation")
    parser.add_argument("--rate", type=float, default=1000.0, help="calls/s of the open-loop latency run")


# -- the no-op servicer (its own process: `python -m benchmarks.bench_rls --serve-noop PORT`) ----------


async def serve_noop(port: int) -> None:
    """A RateLimitService answering OK to everything, on a default grpc.aio server."""
    import grpc
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    response = rls_pb2.RateLimitResponse
    ok = response.Code.OK

    class Noop(rls_pb2_grpc.RateLimitServiceServicer):
        async def ShouldRateLimit(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC name)
            return response(overall_code=ok, statuses=[response.DescriptorStatus(code=ok) for _ in request.descriptors])

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(Noop(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# -- the load generator (its own process: `python -m benchmarks.bench_rls --load JSON`) -----------------


async def load(target: str, mode: str, duration_s: float, concurrency: int, rate: float) -> dict[str, Any]:
    """Saturation (`mode="throughput"`) or open-loop latency (`mode="latency"`) against one server."""
    import grpc
    from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    entry = RateLimitDescriptor.Entry
    requests = [
        rls_pb2.RateLimitRequest(
            domain="bench", descriptors=[RateLimitDescriptor(entries=[entry(key="client_id", value=f"key{i}")])]
        )
        for i in range(KEYS)
    ]
    over = rls_pb2.RateLimitResponse.Code.OVER_LIMIT
    async with grpc.aio.insecure_channel(target) as channel:
        call = rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit
        for i in range(200):  # warm-up: connection, first calls
            await call(requests[i % KEYS])
        refused = 0
        if mode == "throughput":
            done = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + duration_s

            async def worker(offset: int) -> None:
                nonlocal done, refused
                i = offset
                while loop.time() < deadline:
                    reply = await call(requests[i % KEYS])
                    refused += reply.overall_code == over
                    done += 1
                    i += 1

            started = loop.time()
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            return {"calls_per_s": done / (loop.time() - started), "refused": refused}
        latencies: list[float] = []
        loop = asyncio.get_running_loop()
        interval = 1.0 / rate
        start = loop.time() + 0.05
        count = int(duration_s * rate)

        async def one(index: int, scheduled: float) -> None:
            nonlocal refused
            reply = await call(requests[index % KEYS])
            refused += reply.overall_code == over
            latencies.append(loop.time() - scheduled)

        tasks = []
        for index in range(count):
            scheduled = start + index * interval
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(index, scheduled)))
        await asyncio.gather(*tasks)
        return {"latencies_s": latencies, "refused": refused}


def run_load(target: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One load run in a fresh process (its own GIL and core); raises RuntimeError if a call failed or was refused."""
    spec = json.dumps(
        {"target": target, "mode": mode, "duration_s": args.duration, "concurrency": args.concurrency, "rate": args.rate}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_rls", "--load", spec],
        capture_output=True, text=True, cwd=ROOT, timeout=args.duration * 10 + 60,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed against {target}: {proc.stderr.strip().splitlines()[-1:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    if result["refused"]:
        raise RuntimeError(f"{result['refused']} calls were refused against {target}: the bench tier must admit all")
    return result


def percentile(samples: list[float], q: float) -> float:
    """The q-quantile (0..1) of the samples, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def redis_decisions(metrics_port: int) -> tuple[float, float]:
    """(decisions made on Redis, all decisions) from the rls's Prometheus metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    on_redis = total = 0.0
    for line in text.splitlines():
        if line.startswith("ratepilot_decisions_total{"):
            value = float(line.rsplit(" ", 1)[1])
            total += value
            if 'source="redis"' in line:
                on_redis += value
    return on_redis, total


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark: both servers, alternating rounds; the result dict (see the module docstring)."""
    if args.duration <= 0 or args.rounds < 1 or args.concurrency < 1 or not 0 < args.rate <= 100_000:
        raise ValueError("--duration must be > 0, --rounds and --concurrency >= 1, --rate in (0, 100000]")
    with tempfile.TemporaryDirectory(prefix="bench-rls-") as tmp:
        work = Path(tmp)
        redis_server = RedisServer(workdir=work / "redis")
        redis_server.start()
        config = work / "limiter.yaml"
        config.write_text(CONFIG.replace("REDIS_URL", redis_server.url))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        rls_port, noop_port, metrics_port = free_port(), free_port(), free_port()
        rls = ManagedProcess(
            "rls",
            [sys.executable, "-m", "ratepilot.cli", "rls", "--config", str(config), "--port", str(rls_port),
             "--metrics-port", str(metrics_port), "--log-level", "warning"],
            rls_port, work, env=env,
        )  # fmt: skip
        noop = ManagedProcess(
            "noop", [sys.executable, "-m", "benchmarks.bench_rls", "--serve-noop", str(noop_port)], noop_port, work, env=env
        )
        servers = {"rls": f"127.0.0.1:{rls_port}", "noop": f"127.0.0.1:{noop_port}"}
        throughput: dict[str, list[float]] = {"rls": [], "noop": []}
        latencies: dict[str, list[float]] = {"rls": [], "noop": []}
        try:
            rls.start()
            noop.start()
            with Progress() as progress:
                task = progress.add_task("rls vs no-op", total=args.rounds * 4)
                for round_index in range(args.rounds):
                    order = ["noop", "rls"] if round_index % 2 == 0 else ["rls", "noop"]
                    for name in order:
                        throughput[name].append(run_load(servers[name], "throughput", args)["calls_per_s"])
                        progress.advance(task)
                    for name in order:
                        latencies[name] += run_load(servers[name], "latency", args)["latencies_s"]
                        progress.advance(task)
            on_redis, total = redis_decisions(metrics_port)
        finally:
            rls.stop()
            noop.stop()
            redis_server.stop()
    if total == 0 or on_redis / total < 0.99:
        raise RuntimeError(f"only {on_redis:g} of {total:g} rls decisions were made on Redis: no figure")
    rls_best, noop_best = max(throughput["rls"]), max(throughput["noop"])
    p99 = {name: percentile(samples, 0.99) * 1000 for name, samples in latencies.items()}
    p50 = {name: percentile(samples, 0.50) * 1000 for name, samples in latencies.items()}
    ratio = rls_best / noop_best
    added = p99["rls"] - p99["noop"]
    return {
        "rls_calls_per_s": rls_best,
        "noop_calls_per_s": noop_best,
        "rls_over_noop": ratio,
        "rls_added_p99_ms": added,
        "rls_p99_ms": p99["rls"],
        "noop_p99_ms": p99["noop"],
        "rls_p50_ms": p50["rls"],
        "noop_p50_ms": p50["noop"],
        "rounds": {"rls_calls_per_s": throughput["rls"], "noop_calls_per_s": throughput["noop"]},
        "redis_decision_share": on_redis / total,
        "latency_rate_per_s": args.rate,
        "concurrency": args.concurrency,
        "targets": {"rls_over_noop_min": TARGET_RATIO, "rls_added_p99_ms_max": TARGET_ADDED_P99_MS},
        "targets_met": ratio >= TARGET_RATIO and added <= TARGET_ADDED_P99_MS,
    }


def _internal(argv: list[str]) -> int:
    """The helper processes: `--serve-noop PORT` or `--load JSON` (prints its result as JSON)."""
    if argv[0] == "--serve-noop":
        asyncio.run(serve_noop(int(argv[1])))
        return 0
    spec = json.loads(argv[1])
    print(json.dumps(asyncio.run(load(spec["target"], spec["mode"], spec["duration_s"], spec["concurrency"], spec["rate"]))))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("--serve-noop", "--load"):
        sys.exit(_internal(sys.argv[1:]))
    from benchmarks.cli import main as bench_main

    sys.exit(bench_main(["rls", *sys.argv[1:]]))
