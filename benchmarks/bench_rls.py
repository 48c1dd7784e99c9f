"""`ratepilot bench rls`: Envoy's ShouldRateLimit against `ratepilot rls` and against a no-op servicer.

How it measures (all processes local, on this machine's cores):

- a throwaway redis-server;
- `ratepilot rls` itself (the CLI, in its own process, metrics on a side port) with one tier whose
  rates are so high that nothing is refused: every call runs the Lua check-and-consume on Redis;
- a no-op RateLimitService servicer on the same stack (grpc.aio server, default options, own
  process, on the event loop `ratepilot rls` runs on: uvloop when installed) that answers OK with one
  status per descriptor without looking at anything;
- the load generator, a grpc.aio client in a third process (`benchmarks.grpc_load`): one descriptor
  per call (`client_id` from 100 keys in rotation). Saturation: `concurrency` calls kept in flight
  for `duration` seconds, calls/s counted. Latency: OPEN-LOOP at `rate` calls/s (arrivals on a fixed
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
import os
import sys
from pathlib import Path
from typing import Any

from rich.progress import Progress

from benchmarks import grpc_load
from ratepilot.servers import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.7
TARGET_ADDED_P99_MS = 1.0


add_arguments = grpc_load.add_load_arguments


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark: both servers, alternating rounds; the result dict (see the module docstring)."""
    grpc_load.check_load_arguments(args)
    load_before = os.getloadavg()[0]
    with grpc_load.bench_redis("bench-rls-") as (work, _redis_server, config, env):
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
        try:
            rls.start()
            noop.start()
            with Progress() as progress:
                task = progress.add_task("rls vs no-op", total=args.rounds * 4)
                targets = {"rls": (f"127.0.0.1:{rls_port}", grpc_load.server_pid(rls)), "noop": (f"127.0.0.1:{noop_port}", grpc_load.server_pid(noop))}
                result = grpc_load.side_by_side(
                    targets, "rls", args.rounds, args.duration, args.concurrency, args.rate, lambda: progress.advance(task)
                )
            on_redis, total = grpc_load.redis_decisions(metrics_port)
        finally:
            rls.stop()
            noop.stop()
    grpc_load.require_redis_decisions(on_redis, total)
    best, p99 = result.best, result.p99_ms
    ratio = best["rls"] / best["noop"]
    added = p99["rls"] - p99["noop"]
    return {
        "rls_calls_per_s": best["rls"],
        "noop_calls_per_s": best["noop"],
        "rls_over_noop": ratio,
        "rls_added_p99_ms": added,
        "rls_p99_ms": p99["rls"],
        "noop_p99_ms": p99["noop"],
        "rls_p50_ms": result.p50_ms["rls"],
        "noop_p50_ms": result.p50_ms["noop"],
        "rls_calls_per_cpu_s": result.calls_per_cpu_s["rls"],
        "noop_calls_per_cpu_s": result.calls_per_cpu_s["noop"],
        "rls_over_noop_per_cpu_s": result.calls_per_cpu_s["rls"] / result.calls_per_cpu_s["noop"],
        "rounds": {"rls_calls_per_s": result.rounds["rls"], "noop_calls_per_s": result.rounds["noop"]},
        "redis_decision_share": on_redis / total,
        "load_average_1m": [load_before, os.getloadavg()[0]],
        "latency_rate_per_s": args.rate,
        "concurrency": args.concurrency,
        "targets": {"rls_over_noop_min": TARGET_RATIO, "rls_added_p99_ms_max": TARGET_ADDED_P99_MS},
        "targets_met": ratio >= TARGET_RATIO and added <= TARGET_ADDED_P99_MS,
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-noop":
        from limiter.rls.server import loop_factory

        with asyncio.Runner(loop_factory=loop_factory()) as runner:  # the event loop `ratepilot rls` runs on
            runner.run(serve_noop(int(sys.argv[2])))
        sys.exit(0)
    from benchmarks.cli import main as bench_main

    sys.exit(bench_main(["rls", *sys.argv[1:]]))
