"""The limiter's own CPU cost per request, in process: the edge app without and with the limiter.

`python -m benchmarks.bench_limiter_cpu [--requests N] [--callgrind] [--json FILE]`

No sockets for HTTP and no load generator: the edge's ASGI app (`--backend echo`) is called
directly, 32 requests at a time (one event-loop turn, as on a loaded edge: the limited run sends
their 32 checks as one EVALSHA to a real, throwaway redis-server). What it reports:

- `cpu_us_per_request` (bare, limited): process CPU time per request after a warm-up. Wall-clock
  figures on a shared machine move by ±30 % from run to run;
- with `--callgrind` (needs valgrind): `instructions_per_request`, counted by callgrind over the
  difference of two runs of different length (start-up cancels out). Repeatable to about ±2 %
  whatever else the machine does, so it is the figure to compare versions with;
- `limited_over_bare` for both: the limiter's cost relative to serving the request at all.

The HTTP benchmark (`bench_limiter_http`) measures the same through uvicorn and the kernel; this
one isolates the Python the limiter adds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_limiter_http import BENCH_CONFIG, CHUNK
from benchmarks.cli import print_and_save

CONCURRENCY = 32
WARMUP = 320


def _scope(i: int) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": "/v1/items", "raw_path": b"/v1/items", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"bench"), (b"x-api-key", b"bench_%d" % (i % 100))],
        "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80), "state": {},
    }  # fmt: skip


async def _serve(limited: bool, redis_url: str, requests: int) -> float:
    """Run `requests` requests through the app; returns CPU seconds spent after the warm-up."""
    from limiter.config import parse_config
    from limiter.edge import Edge, EdgeOptions
    from limiter.redis_bucket import RedisBucket

    edge = Edge(parse_config(BENCH_CONFIG.format(url=redis_url, timeout_ms=10_000, chunk=CHUNK, mode="strict")), EdgeOptions(backend="echo", limited=limited, admin=False))
    bucket = None
    if limited:
        bucket = RedisBucket.from_url(redis_url, timeout_s=10.0, max_lag_s=10.0)  # every decision a Redis one
        await bucket.warm_up()
        edge.guard.redis_bucket = bucket
    app = edge.app
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def run(count: int) -> None:
        for start in range(0, count, CONCURRENCY):
            await asyncio.gather(*[app(_scope(i), receive, send) for i in range(start, start + CONCURRENCY)])

    await run(WARMUP)
    gc.collect()
    gc.freeze()
    started = time.process_time()
    await run(requests)
    spent = time.process_time() - started
    if bucket is not None:
        await bucket.aclose()
    if set(statuses) != {200}:
        raise RuntimeError(f"unexpected statuses {sorted(set(statuses))}")
    return spent


def _worker(mode: str, redis_url: str, requests: int) -> None:
    import uvloop

    spent = uvloop.run(_serve(mode == "limited", redis_url, requests))
    print(json.dumps({"cpu_s": spent}))


def _instructions(mode: str, redis_url: str, requests: int, workdir: Path) -> int:
    """Total instructions of one worker run under callgrind."""
    out = workdir / f"callgrind-{mode}-{requests}.out"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m", "benchmarks.bench_limiter_cpu",
         "--worker", mode, "--redis-url", redis_url, "--requests", str(requests)],
        check=True, capture_output=True, env=env, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError(f"no instruction total in {out}")
    return int(match[1])


def run_cpu(requests: int, callgrind: bool) -> dict[str, Any]:
    """Measure bare vs limited CPU per request (and instructions per request with callgrind)."""
    from ratepilot.servers import RedisServer

    with tempfile.TemporaryDirectory(prefix="ratepilot-bench-cpu-") as tmp:
        redis_server = RedisServer(workdir=Path(tmp))
        redis_server.start()
        try:
            result: dict[str, Any] = {"requests": requests, "concurrency": CONCURRENCY, "cpu_us_per_request": {}}
            for mode in ("bare", "limited"):
                samples = []
                for _ in range(3):  # the best of three: other work only ever adds time
                    done = subprocess.run(
                        [sys.executable, "-m", "benchmarks.bench_limiter_cpu", "--worker", mode,
                         "--redis-url", redis_server.url, "--requests", str(requests)],
                        check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                    )  # fmt: skip
                    samples.append(json.loads(done.stdout.strip().splitlines()[-1])["cpu_s"] / requests * 1e6)
                result["cpu_us_per_request"][mode] = round(min(samples), 2)
            cpu = result["cpu_us_per_request"]
            result["cpu_limited_over_bare"] = round(cpu["limited"] / cpu["bare"], 3)
            if callgrind:
                if shutil.which("valgrind") is None:
                    raise RuntimeError("--callgrind needs valgrind (apt-get install valgrind)")
                short, long = 320, 320 + min(requests, 6400)
                per_request = {}
                for mode in ("bare", "limited"):
                    small = _instructions(mode, redis_server.url, short, Path(tmp))
                    large = _instructions(mode, redis_server.url, long, Path(tmp))
                    per_request[mode] = (large - small) // (long - short)
                result["instructions_per_request"] = per_request
                result["instructions_limited_over_bare"] = round(per_request["limited"] / per_request["bare"], 3)
                result["instructions_added_per_request"] = per_request["limited"] - per_request["bare"]
            return result
        finally:
            redis_server.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m benchmarks.bench_limiter_cpu`."""
    parser = argparse.ArgumentParser(prog="bench_limiter_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32_000, help="measured requests per run (multiple of 32)")
    parser.add_argument("--callgrind", action="store_true", help="also count instructions per request (valgrind)")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--worker", choices=["bare", "limited"], help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < CONCURRENCY or args.requests % CONCURRENCY:
        parser.error(f"--requests must be a positive multiple of {CONCURRENCY}")
    if args.worker:
        _worker(args.worker, args.redis_url, args.requests)
        return 0
    result = run_cpu(args.requests, args.callgrind)
    print_and_save(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
