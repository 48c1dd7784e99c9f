"""The gRPC load generator of `bench rls` and `bench grpc`, run in a process of its own.

    python -m benchmarks.grpc_load '{"target": "127.0.0.1:PORT", "kind": "rls", "mode": "throughput", ...}'

prints one JSON object. Kinds: `rls` (Envoy's ShouldRateLimit, one descriptor whose `client_id` rotates
over 100 keys; OVER_LIMIT replies are counted as refused) and `echo` (a raw-bytes unary call to
`/bench.Echo/Say` with the `x-api-key` metadata rotating over 100 keys). Modes: `throughput`
(`concurrency` calls kept in flight for `duration_s`: calls/s) and `latency` (OPEN-LOOP at `rate`
calls/s, arrivals on a fixed schedule independent of replies; a call's latency counts from its
scheduled start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from ratepilot.servers import RedisServer

ROOT = Path(__file__).resolve().parents[1]
KEYS = 100
ECHO_METHOD = "/bench.Echo/Say"
WARM_UP_CALLS = 200


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the gRPC benchmarks."""
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per round and measurement")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per server")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight at saturation")
    parser.add_argument("--rate", type=float, default=1000.0, help="calls/s of the open-loop latency run")


def check_load_arguments(args: argparse.Namespace) -> None:
    """Raise ValueError on options no run can use (before any server starts)."""
    if not args.duration > 0 or args.rounds < 1 or args.concurrency < 1 or not 0 < args.rate <= 100_000:
        raise ValueError("--duration must be > 0, --rounds and --concurrency >= 1, --rate in (0, 100000]")


def _rls_calls(channel: grpc.aio.Channel) -> list[Callable[[], Awaitable[bool]]]:
    """One call per key; each returns True when refused (OVER_LIMIT)."""
    from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    stub = rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit
    over = rls_pb2.RateLimitResponse.Code.OVER_LIMIT
    entry = RateLimitDescriptor.Entry

    def make(key: str) -> Callable[[], Awaitable[bool]]:
        request = rls_pb2.RateLimitRequest(domain="bench", descriptors=[RateLimitDescriptor(entries=[entry(key="client_id", value=key)])])

        async def call() -> bool:
            return bool((await stub(request)).overall_code == over)

        return call

    return [make(f"key{i}") for i in range(KEYS)]


def _echo_calls(channel: grpc.aio.Channel) -> list[Callable[[], Awaitable[bool]]]:
    """One call per key; a refusal (RESOURCE_EXHAUSTED) raises, so it is never silent."""
    say = channel.unary_unary(ECHO_METHOD)

    def make(key: str) -> Callable[[], Awaitable[bool]]:
        metadata = (("x-api-key", key),)

        async def call() -> bool:
            await say(b"ping", metadata=metadata)
            return False

        return call

    return [make(f"key{i}") for i in range(KEYS)]


async def load(target: str, kind: str, mode: str, duration_s: float, concurrency: int, rate: float) -> dict[str, Any]:
    """Saturation or open-loop latency against one server; counts refused calls."""
    async with grpc.aio.insecure_channel(target) as channel:
        calls = (_rls_calls if kind == "rls" else _echo_calls)(channel)
        for i in range(WARM_UP_CALLS):  # connection, first calls
            await calls[i % KEYS]()
        loop = asyncio.get_running_loop()
        refused = 0
        if mode == "throughput":
            done = 0
            deadline = loop.time() + duration_s

            async def worker(offset: int) -> None:
                nonlocal done, refused
                i = offset
                while loop.time() < deadline:
                    refused += await calls[i % KEYS]()
                    done += 1
                    i += 1

            started = loop.time()
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            return {"calls_per_s": done / (loop.time() - started), "calls": done, "refused": refused}
        latencies: list[float] = []
        interval = 1.0 / rate
        start = loop.time() + 0.05

        async def one(index: int, scheduled: float) -> None:
            nonlocal refused
            refused += await calls[index % KEYS]()
            latencies.append(loop.time() - scheduled)

        tasks = []
        for index in range(int(duration_s * rate)):
            scheduled = start + index * interval
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(index, scheduled)))
        await asyncio.gather(*tasks)
        return {"latencies_s": latencies, "refused": refused}


def run_load(target: str, kind: str, mode: str, duration_s: float, concurrency: int, rate: float) -> dict[str, Any]:
    """One load run in a fresh process (its own GIL); raises RuntimeError if a call failed or was refused."""
    spec = {"target": target, "kind": kind, "mode": mode, "duration_s": duration_s, "concurrency": concurrency, "rate": rate}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.grpc_load", json.dumps(spec)],
        capture_output=True, text=True, cwd=ROOT, timeout=duration_s * 10 + 60,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"load generator failed against {target}: {tail}")
    result: dict[str, Any] = json.loads(proc.stdout)
    if result["refused"]:
        raise RuntimeError(f"{result['refused']} calls were refused by {target}: the bench tier must admit all")
    return result


def percentile(samples: list[float], q: float) -> float:
    """The q-quantile (0..1) of the samples, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Comparison(NamedTuple):
    """Two servers side by side: per name, best calls/s, calls/s per round, calls per CPU-second of the
    server process (all rounds; robust to a loaded machine: it counts only the server's own work),
    and p50 / p99 ms of the pooled open-loop latencies."""

    best: dict[str, float]
    rounds: dict[str, list[float]]
    calls_per_cpu_s: dict[str, float]
    p50_ms: dict[str, float]
    p99_ms: dict[str, float]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# One tier whose rates are so high that nothing is refused: every call runs the check-and-consume on Redis.
BENCH_CONFIG = """
redis: {url: REDIS_URL, timeout_ms: 1000}
default_tier: bench
tiers:
  bench:
    client:    {rate: 1000000, burst: 1000000}
    aggregate: {rate: 1000000, burst: 1000000}
rate_table: {poll_s: 5}
"""


@contextlib.contextmanager
def bench_redis(prefix: str) -> Iterator[tuple[Path, RedisServer, Path, dict[str, str]]]:
    """A work folder, a started throwaway redis-server, a limiter config on it, the environment for the servers."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        redis_server = RedisServer(workdir=work / "redis")
        redis_server.start()
        try:
            config = work / "limiter.yaml"
            config.write_text(BENCH_CONFIG.replace("REDIS_URL", redis_server.url))
            yield work, redis_server, config, {**os.environ, "PYTHONPATH": str(ROOT)}
        finally:
            redis_server.stop()


def server_pid(server: Any) -> int:
    """The pid of a started `ratepilot.servers.ManagedProcess`."""
    if server.process is None:
        raise RuntimeError(f"{server.name} is not running")
    return int(server.process.pid)


def side_by_side(
    targets: dict[str, tuple[str, int]], kind: str, rounds: int, duration_s: float, concurrency: int, rate: float,
    advance: Callable[[], None],
) -> Comparison:  # fmt: skip
    """Alternating rounds over the servers of `targets` (name -> (address, server pid))."""
    names = list(targets)
    throughput: dict[str, list[float]] = {name: [] for name in names}
    latencies: dict[str, list[float]] = {name: [] for name in names}
    calls = dict.fromkeys(names, 0)
    cpu = dict.fromkeys(names, 0.0)
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            address, pid = targets[name]
            before = cpu_seconds(pid)
            result = run_load(address, kind, "throughput", duration_s, concurrency, rate)
            cpu[name] += cpu_seconds(pid) - before  # includes the run's 200 warm-up calls
            calls[name] += result["calls"] + WARM_UP_CALLS
            throughput[name].append(result["calls_per_s"])
            advance()
        for name in order:
            latencies[name] += run_load(targets[name][0], kind, "latency", duration_s, concurrency, rate)["latencies_s"]
            advance()
    return Comparison(
        best={name: max(values) for name, values in throughput.items()},
        rounds=throughput,
        calls_per_cpu_s={name: calls[name] / cpu[name] if cpu[name] else math.inf for name in names},
        p50_ms={name: percentile(samples, 0.50) * 1000 for name, samples in latencies.items()},
        p99_ms={name: percentile(samples, 0.99) * 1000 for name, samples in latencies.items()},
    )


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


def require_redis_decisions(on_redis: float, total: float) -> None:
    """RuntimeError unless (nearly) every decision was made on Redis: a figure from fallbacks is no figure."""
    if total == 0 or on_redis / total < 0.99:
        raise RuntimeError(f"only {on_redis:g} of {total:g} decisions were made on Redis: no figure")


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(load(**spec))))
