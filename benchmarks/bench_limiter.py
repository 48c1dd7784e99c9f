"""Limiter checks per second, side by side in one run against one throwaway redis-server.

Single-threaded, the same redis-py client settings for everyone (hiredis parser, no retries,
the same timeout), 1,000 client keys in rotation, every check allowed (the common path).
Each method runs in `--rounds` short slices, interleaved with the others so that background
load on a shared machine hits all methods alike; a method's figure is its total checks over
its total time (the per-slice rates are kept in the JSON). Compared: a trivial `return 1` EVALSHA (the floor any
script-based limiter pays) through redis-py's execute_command and through the lean client path
our SyncRedisBucket uses (one own connection, hiredis-packed commands), our check per call and in pipelined batches of 100, the `limits`
library's fixed, moving and sliding windows on its Redis storage, pyrate-limiter's token bucket
on Redis (StateBucket + TokenBucket + RedisStateStore), and our in-process LocalBucket.
The HTTP figures come from benchmarks/bench_limiter_http.py when it exists.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import time
from collections.abc import Callable
from itertools import cycle
from pathlib import Path
from typing import Any

import hiredis
from rich.progress import Progress

from benchmarks.sync_redis_bucket import SyncRedisBucket
from limiter.bucket import BucketSpec
from limiter.local_bucket import LocalBucket
from limiter.redis_clients import make_sync_client
from ratepilot.servers import RedisServer

KEYS = 1_000  # distinct clients in rotation
RATE = 1_000.0  # tokens/s per client: every check is allowed
BATCH = 100
TIMEOUT_S = 1.0  # generous: a benchmark on a shared machine must not fail on a hiccup
TRIVIAL_SCRIPT = "return 1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `ratepilot bench limiter`."""
    parser.add_argument("--seconds", type=float, default=3.0, help="total measuring time per method (default 3)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved slices the time is cut into (default 30)")
    parser.add_argument("--http-seconds", type=float, default=8.0, help="duration of each HTTP measurement (8 rounds)")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP part")


def measure(operation: Callable[[], int], seconds: float) -> tuple[int, float]:
    """(checks, elapsed s) of calling `operation` (which returns how many checks it made) for `seconds`."""
    checks = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(10):
            checks += operation()
        now = time.perf_counter()
        if now >= deadline:
            return checks, now - started


def build_methods(url: str) -> dict[str, Callable[[], int]]:
    """One zero-argument callable per compared method, each making one check (or one batch)."""
    from limits import RateLimitItemPerSecond
    from limits.storage import RedisStorage
    from limits.strategies import (
        FixedWindowRateLimiter,
        MovingWindowRateLimiter,
        SlidingWindowCounterRateLimiter,
    )
    from pyrate_limiter import Duration, Limiter, Rate, RedisStateStore, StateBucket, TokenBucket
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client_options: dict[str, Any] = {
        "socket_timeout": TIMEOUT_S,
        "socket_connect_timeout": TIMEOUT_S,
        "retry": Retry(NoBackoff(), 0),
    }
    names = [f"client{i}" for i in range(KEYS)]
    spec = BucketSpec(RATE, RATE)

    raw_client = make_sync_client(url, TIMEOUT_S)
    raw_client.script_load(TRIVIAL_SCRIPT)
    trivial_sha = hashlib.sha1(TRIVIAL_SCRIPT.encode()).hexdigest()
    execute = raw_client.execute_command
    # the same trivial script over one dedicated connection with hiredis-packed commands: the client
    # path SyncRedisBucket itself uses, so ours / this ratio compares the scripts alone
    lean = raw_client.connection_pool.connection_class(**raw_client.connection_pool.connection_kwargs)
    trivial_call: tuple[Any, ...] = ("EVALSHA", trivial_sha, 0)
    lean_command = [bytes(hiredis.pack_command(trivial_call))]

    def lean_raw() -> int:
        lean.send_packed_command(lean_command, check_health=False)
        lean.read_response()
        return 1

    ours = SyncRedisBucket(make_sync_client(url, TIMEOUT_S))
    ours.load_script()
    key_lists = cycle([[f"rp:{{free}}:c:{name}"] for name in names])
    specs = [spec]
    batches = cycle([[(next(key_lists), specs, 1.0) for _ in range(BATCH)] for _ in range(KEYS // BATCH)])

    storage = RedisStorage(url, **client_options)
    item = RateLimitItemPerSecond(int(RATE))
    fixed = FixedWindowRateLimiter(storage)
    moving = MovingWindowRateLimiter(storage)
    sliding = SlidingWindowCounterRateLimiter(storage)
    fixed_names, moving_names, sliding_names = (cycle([f"{kind}:{name}" for name in names]) for kind in "fms")

    pyrate_client = make_sync_client(url, TIMEOUT_S)
    pyrate_limiters = [
        Limiter(
            StateBucket(
                [Rate(int(RATE), Duration.SECOND, burst=int(RATE))],
                algorithm=TokenBucket(),
                store=RedisStateStore(pyrate_client, f"pyrate:{name}"),
            )
        )
        for name in names
    ]
    pyrate_cycle = cycle(pyrate_limiters)

    local = LocalBucket()
    local_keys = cycle([[name] for name in names])

    def expect(allowed: bool) -> int:
        if not allowed:
            raise RuntimeError("a benchmark check was refused: the set-up should allow every check")
        return 1

    return {
        "raw_evalsha_per_s": lambda: (execute("EVALSHA", trivial_sha, 0), 1)[1],
        "raw_evalsha_lean_client_per_s": lean_raw,
        "ours_per_call_per_s": lambda: expect(ours.check(next(key_lists), specs, 1.0)[0]),
        "ours_batch_per_s": lambda: len(ours.check_many(next(batches))),
        "limits_fixed_window_per_s": lambda: expect(fixed.hit(item, next(fixed_names))),
        "limits_moving_window_per_s": lambda: expect(moving.hit(item, next(moving_names))),
        "limits_sliding_window_per_s": lambda: expect(sliding.hit(item, next(sliding_names))),
        "pyrate_token_bucket_per_s": lambda: expect(bool(next(pyrate_cycle).try_acquire("k", blocking=False))),
        "local_bucket_per_s": lambda: expect(local.check(next(local_keys), specs, 1.0)[0]),
    }


def ratios(figures: dict[str, float]) -> dict[str, float]:
    """The ratios the targets are stated in."""
    ours = figures["ours_per_call_per_s"]
    return {
        "ours_over_raw_evalsha": ours / figures["raw_evalsha_per_s"],
        "ours_over_raw_evalsha_lean_client": ours / figures["raw_evalsha_lean_client_per_s"],
        "batch_over_per_call": figures["ours_batch_per_s"] / ours,
        "ours_over_limits_fixed_window": ours / figures["limits_fixed_window_per_s"],
        "ours_over_limits_moving_window": ours / figures["limits_moving_window_per_s"],
        "ours_over_limits_sliding_window": ours / figures["limits_sliding_window_per_s"],
        "ours_over_pyrate_token_bucket": ours / figures["pyrate_token_bucket_per_s"],
    }


def run_http(seconds: float) -> dict[str, Any]:
    """The HTTP figures of benchmarks/bench_limiter_http.py, or {} when that module does not exist."""
    try:
        module = importlib.import_module("benchmarks.bench_limiter_http")
    except ModuleNotFoundError as error:
        if error.name != "benchmarks.bench_limiter_http":
            raise  # the module exists but one of its own imports is missing: say so
        return {}
    result: dict[str, Any] = module.run_http(seconds)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the methods in interleaved slices; return checks/s per method, the ratios and the set-up."""
    if not (args.seconds > 0 and args.rounds >= 1 and args.http_seconds > 0):
        raise ValueError("--seconds and --http-seconds must be positive and --rounds at least 1")
    load_at_start = os.getloadavg()[0]
    slice_s = args.seconds / args.rounds
    server = RedisServer()
    server.start()
    try:
        methods = build_methods(server.url)
        totals = {name: [0, 0.0] for name in methods}
        samples: dict[str, list[float]] = {name: [] for name in methods}
        for operation in methods.values():  # warm-up: connections, scripts, first keys
            measure(operation, 0.05)
        with Progress(transient=True) as progress:
            task = progress.add_task("bench limiter", total=args.rounds * len(methods))
            for _ in range(args.rounds):
                for name, operation in methods.items():
                    progress.update(task, description=name)
                    checks, elapsed = measure(operation, slice_s)
                    totals[name][0] += checks
                    totals[name][1] += elapsed
                    samples[name].append(round(checks / elapsed, 1))
                    progress.advance(task)
    finally:
        server.stop()
    figures = {name: checks / elapsed for name, (checks, elapsed) in totals.items()}
    result: dict[str, Any] = {**figures, "ratios": ratios(figures)}
    result["setup"] = {
        "seconds_per_method": args.seconds,
        "slices": args.rounds,
        "batch_size": BATCH,
        "keys": KEYS,
        "slice_rates": samples,
        "loadavg_1m_start": load_at_start,  # other work on the machine skews absolute figures, less the ratios
        "loadavg_1m_end": os.getloadavg()[0],
        "redis_server": "redis-server 7 (ratepilot.servers.RedisServer), same host",
    }
    if not args.no_http:
        result.update(run_http(args.http_seconds))
    plot(figures, args.json.with_suffix(".png"))
    return result


def plot(figures: dict[str, float], path: Path) -> None:
    """A horizontal bar chart of checks/s per method, next to the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(figures)
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = ["tab:orange" if name.startswith(("ours", "local")) else "tab:gray" for name in names]
    ax.barh([name.removesuffix("_per_s") for name in names], [figures[name] for name in names], color=colors)
    ax.set_xscale("log")
    ax.set_xlabel("checks per second (single thread, log scale)")
    ax.set_title("ratepilot bench limiter")
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
