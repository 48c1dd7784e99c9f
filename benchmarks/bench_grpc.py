"""`ratepilot bench grpc`: a grpc.aio unary echo server with the rate-limit interceptor vs the same server without it.

How it measures (all processes local): a throwaway redis-server; the same raw-bytes echo server
(`/bench.Echo/Say`, default grpc.aio options, GC frozen after start-up) twice, each in its own
process, once bare and once with `limiter.grpc_interceptor.RateLimitInterceptor` on a tier whose
rates are so high that nothing is refused (every call runs the Lua check-and-consume on Redis); the
load generator (`benchmarks.grpc_load`, `x-api-key` metadata from 100 keys in rotation) in a third
process. Rounds alternate the two servers; throughput is the best round of each, the latency
percentiles (open loop at `rate` calls/s) pool all rounds. A refused or failed call fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from pathlib import Path
from typing import Any

from rich.progress import Progress

from benchmarks.grpc_load import (
    ECHO_METHOD,
    add_load_arguments,
    bench_redis,
    check_load_arguments,
    redis_decisions,
    require_redis_decisions,
    server_pid,
    side_by_side,
)
from ratepilot.servers import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[1]

add_arguments = add_load_arguments


async def serve(port: int, config_path: str | None, metrics_port: int | None) -> None:
    """The echo server, with the interceptor (and its metrics on `metrics_port`) when a limiter config is given."""
    import grpc

    interceptors: list[Any] = []
    runtime = None
    if config_path is not None:
        from prometheus_client import start_http_server

        from limiter.config import load_config
        from limiter.grpc_interceptor import RateLimitInterceptor
        from limiter.runtime import LimiterRuntime

        runtime = LimiterRuntime(load_config(config_path))
        await runtime.start()
        start_http_server(metrics_port or 0, addr="127.0.0.1", registry=runtime.registry)
        interceptors.append(RateLimitInterceptor(runtime.guard))

    async def say(request: bytes, _context: Any) -> bytes:
        return request

    service, method = ECHO_METHOD[1:].split("/")
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(say)})]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    gc.collect()
    gc.freeze()
    await server.wait_for_termination()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark: both servers, alternating rounds; the result dict (see the module docstring)."""
    check_load_arguments(args)
    load_before = os.getloadavg()[0]
    with bench_redis("bench-grpc-") as (work, _redis_server, config, env):
        ports = {"limited": free_port(), "bare": free_port()}
        metrics_port = free_port()
        limited_args = [str(config), str(metrics_port)]
        servers = {
            name: ManagedProcess(
                name,
                [sys.executable, "-m", "benchmarks.bench_grpc", "--serve", str(port), *(limited_args if name == "limited" else [])],
                port, work, env=env,
            )  # fmt: skip
            for name, port in ports.items()
        }
        try:
            for server in servers.values():
                server.start()
            with Progress() as progress:
                task = progress.add_task("interceptor vs bare", total=args.rounds * 4)
                result = side_by_side(
                    {name: (f"127.0.0.1:{port}", server_pid(servers[name])) for name, port in ports.items()}, "echo",
                    args.rounds, args.duration, args.concurrency, args.rate, lambda: progress.advance(task),
                )  # fmt: skip
            on_redis, total = redis_decisions(metrics_port)
        finally:
            for server in servers.values():
                server.stop()
    require_redis_decisions(on_redis, total)
    best, p99, per_cpu = result.best, result.p99_ms, result.calls_per_cpu_s
    return {
        "grpc_limited_calls_per_s": best["limited"],
        "grpc_bare_calls_per_s": best["bare"],
        "grpc_limited_over_bare": best["limited"] / best["bare"],
        "grpc_added_p99_ms": p99["limited"] - p99["bare"],
        "grpc_limited_p99_ms": p99["limited"],
        "grpc_bare_p99_ms": p99["bare"],
        "grpc_limited_p50_ms": result.p50_ms["limited"],
        "grpc_bare_p50_ms": result.p50_ms["bare"],
        "grpc_limited_calls_per_cpu_s": per_cpu["limited"],
        "grpc_bare_calls_per_cpu_s": per_cpu["bare"],
        "grpc_limited_over_bare_per_cpu_s": per_cpu["limited"] / per_cpu["bare"],
        "rounds": {"grpc_limited_calls_per_s": result.rounds["limited"], "grpc_bare_calls_per_s": result.rounds["bare"]},
        "redis_decision_share": on_redis / total,
        "load_average_1m": [load_before, os.getloadavg()[0]],
        "latency_rate_per_s": args.rate,
        "concurrency": args.concurrency,
    }


if __name__ == "__main__":
    if len(sys.argv) in (3, 5) and sys.argv[1] == "--serve":
        limited = len(sys.argv) == 5
        asyncio.run(serve(int(sys.argv[2]), sys.argv[3] if limited else None, int(sys.argv[4]) if limited else None))
        sys.exit(0)
    from benchmarks.cli import main as bench_main

    sys.exit(bench_main(["grpc", *sys.argv[1:]]))
