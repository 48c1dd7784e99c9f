"""`ratepilot rls`: Envoy's global rate-limit service (gRPC) on the limiter's buckets and adaptive rates.

    ratepilot rls --config limiter.yaml --port 8081 --metrics-port 9091

Envoy's `envoy.filters.http.ratelimit` filter (or Istio's EnvoyFilter) points its `rate_limit_service`
at this port; the descriptors its route actions send map to tiers and clients by the `rls:` section of
the config (`limiter.rls.settings`). The limiter's Prometheus metrics are served on `--metrics-port`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from prometheus_client import start_http_server

from limiter.config import ConfigError, load_config, resolve_config_path
from limiter.edge import setup_logging
from limiter.rate_limiter import RateLimiter
from limiter.rls.service import RateLimitService

log = logging.getLogger("ratepilot.rls")

GRACE_S = 2.0  # in-flight calls may finish this long after SIGTERM


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (grpc.aio runs on it; ~15 % less CPU per call), else None
    (asyncio's default)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


async def serve(runtime: RateLimiter, address: str) -> None:
    """Bind `address`, start the runtime and a grpc.aio server; run until SIGTERM/SIGINT (or cancellation).
    Raises OSError when the address cannot be bound (before Redis is touched)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitService(runtime.guard), server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises this when the port is taken
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    try:
        await runtime.start()
        await server.start()
        gc.collect()
        gc.freeze()  # start-up objects leave the cyclic GC's generations: no long pauses under load
        log.info("rls serving", extra={"fields": {"address": address}})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread: cancel instead
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await server.stop(GRACE_S)
        await runtime.stop()


def build_parser() -> argparse.ArgumentParser:
    """The `ratepilot rls` argument parser."""
    parser = argparse.ArgumentParser(
        prog="ratepilot rls", description="Serve Envoy's rate-limit service (envoy.service.ratelimit.v3) over gRPC."
    )
    parser.add_argument("--config", help="limiter.yaml (default: $RATEPILOT_CONFIG, else the packaged example)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="gRPC port Envoy calls")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics here (0: off)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `ratepilot rls`."""
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536 or not 0 <= args.metrics_port < 65536:
        print("ratepilot rls: --port must be in 1..65535 and --metrics-port in 0..65535", file=sys.stderr)
        return 2
    try:
        config_path: Path = resolve_config_path(args.config)
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"ratepilot rls: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    runtime = RateLimiter(config, config_path=config_path)
    if args.metrics_port:
        try:
            start_http_server(args.metrics_port, addr=args.host, registry=runtime.registry)
        except OSError as exc:
            print(f"ratepilot rls: cannot serve metrics on port {args.metrics_port}: {exc}", file=sys.stderr)
            return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve(runtime, f"{args.host}:{args.port}"))
    except OSError as exc:
        print(f"ratepilot rls: {exc}", file=sys.stderr)
        return 1
    return 0
