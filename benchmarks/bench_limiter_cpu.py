"""The limiter's own CPU cost per request, in process: the edge app without and with the limiter.

`python -m benchmarks.bench_limiter_cpu [--requests N] [--callgrind] [--mode limited|local] [--json FILE]`

No sockets for HTTP and no load generator: the edge's ASGI app (`--backend echo`) is called
directly, 32 requests at a time (one event-loop turn, as on a loaded edge: the limited run sends
their 32 checks as one EVALSHA to a real, throwaway redis-server). Three runs: `bare` (no
limiter), `limited` (strict mode: every decision a Redis one) and `local` (the tier in
`mode: local`: decided in process from this node's token leases, which sync with the same Redis
once every `SYNC_EVERY` requests, about 0.1 s of a saturated edge, so the sync's share counts).
What it reports:

- `cpu_us_per_request` (bare, limited): process CPU time per request after a warm-up. Wall-clock
  figures on a shared machine move by ±30 % from run to run;
- with `--callgrind` (needs valgrind): `instructions_per_request`, counted by callgrind over the
  difference of two runs of different length (start-up cancels out). Repeatable to about ±2 %
  whatever else the machine does, so it is the figure to compare versions with;
- `limited_over_bare` and `local_over_bare` for both: the limiter's cost relative to serving the
  request at all; `local_lease_decision_share`: the local run's share of decisions made in process.

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
SYNC_EVERY = 2400  # local mode: requests between two lease syncs (0.1 s at the ~24k req/s of an HTTP edge)
LOCAL_WARMUP = 3 * SYNC_EVERY  # leases start empty and grow to twice an interval's need over two syncs
MODES = ("bare", "limited", "local")


def _scope(i: int) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": "/v1/items", "raw_path": b"/v1/items", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"bench"), (b"x-api-key", b"bench_%d" % (i % 100))],
        "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80), "state": {},
    }  # fmt: skip


async def _serve(mode: str, redis_url: str, requests: int) -> dict[str, Any]:
    """Run `requests` requests through the app; returns CPU seconds spent after the warm-up and the
    decisions by (outcome, source)."""
    import redis.asyncio

    from limiter.config import parse_config
    from limiter.edge import Edge, EdgeOptions
    from limiter.metrics import DECISION_KEYS
    from limiter.redis_bucket import RedisBucket

    tier_mode = "local" if mode == "local" else "strict"
    config = parse_config(BENCH_CONFIG.format(url=redis_url, timeout_ms=10_000, chunk=CHUNK, mode=tier_mode))
    edge = Edge(config, EdgeOptions(backend="echo", limited=mode != "bare", admin=False))
    bucket = sync_client = None
    lease_sync = edge.limiter.node_tasks.lease_sync
    if mode != "bare":
        bucket = RedisBucket.from_url(redis_url, timeout_s=10.0, max_lag_s=10.0)  # no decision falls back
        await bucket.warm_up()
        edge.guard.redis_bucket = bucket
    if mode == "local":
        sync_client = redis.asyncio.Redis.from_url(redis_url)
        lease_sync.connect(sync_client)
    app = edge.app
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    served = 0  # requests so far, warm-up included: local mode syncs every SYNC_EVERY of them

    async def run(count: int) -> None:
        nonlocal served
        for start in range(0, count, CONCURRENCY):
            if sync_client is not None and served % SYNC_EVERY == 0 and not await lease_sync.sync_once():
                raise RuntimeError("a lease sync failed")
            await asyncio.gather(*[app(_scope(i), receive, send) for i in range(start, start + CONCURRENCY)])
            served += CONCURRENCY

    await run(WARMUP if mode != "local" else LOCAL_WARMUP)
    counters = edge.metrics.tier_counters("bench")
    before = list(counters.decisions)
    gc.collect()
    gc.freeze()
    started = time.process_time()
    await run(requests)
    spent = time.process_time() - started
    if bucket is not None:
        await bucket.aclose()
    if sync_client is not None:
        await sync_client.aclose()
    if set(statuses) != {200}:
        raise RuntimeError(f"unexpected statuses {sorted(set(statuses))}")
    decisions = {f"{outcome}_{source}": after - was for (outcome, source), was, after
                 in zip(DECISION_KEYS, before, counters.decisions, strict=True) if after > was}  # fmt: skip
    return {"cpu_s": spent, "decisions": decisions}


def _worker(mode: str, redis_url: str, requests: int) -> None:
    import uvloop

    print(json.dumps(uvloop.run(_serve(mode, redis_url, requests))))


def _instructions(mode: str, redis_url: str, requests: int, workdir: Path) -> int:
    """Total instructions of one worker run under callgrind."""
    out = workdir / f"callgrind-{mode}-{requests}.out"
    env = {**os.environ, "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"}  # no BLAS threads spinning into the count
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m", "benchmarks.bench_limiter_cpu",
         "--worker", mode, "--redis-url", redis_url, "--requests", str(requests)],
        check=True, capture_output=True, env=env, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError(f"no instruction total in {out}")
    return int(match[1])


def run_cpu(requests: int, callgrind: bool, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """Measure CPU per request of `modes` (bare first; instructions per request with callgrind)."""
    if not modes or modes[0] != "bare" or not set(modes) <= set(MODES):
        raise ValueError(f"modes must start with 'bare' and be among {MODES}")
    from ratepilot.servers import RedisServer

    with tempfile.TemporaryDirectory(prefix="ratepilot-bench-cpu-") as tmp:
        redis_server = RedisServer(workdir=Path(tmp))
        redis_server.start()
        try:
            result: dict[str, Any] = {"requests": requests, "concurrency": CONCURRENCY, "cpu_us_per_request": {}}
            for mode in modes:
                samples = []
                for _ in range(3):  # the best of three: other work only ever adds time
                    done = subprocess.run(
                        [sys.executable, "-m", "benchmarks.bench_limiter_cpu", "--worker", mode,
                         "--redis-url", redis_server.url, "--requests", str(requests)],
                        check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                    )  # fmt: skip
                    answer = json.loads(done.stdout.strip().splitlines()[-1])
                    samples.append(answer["cpu_s"] / requests * 1e6)
                result["cpu_us_per_request"][mode] = round(min(samples), 2)
                if mode == "local":
                    result["local_lease_decision_share"] = round(answer["decisions"].get("allowed_lease", 0) / requests, 4)
            cpu = result["cpu_us_per_request"]
            for mode in modes[1:]:
                result[f"cpu_{mode}_over_bare"] = round(cpu[mode] / cpu["bare"], 3)
            if callgrind:
                if shutil.which("valgrind") is None:
                    raise RuntimeError("--callgrind needs valgrind (apt-get install valgrind)")
                short, long = 320, 320 + min(requests, 6400)
                per_request = {}
                for mode in modes:
                    small = _instructions(mode, redis_server.url, short, Path(tmp))
                    large = _instructions(mode, redis_server.url, long, Path(tmp))
                    per_request[mode] = (large - small) // (long - short)
                result["instructions_per_request"] = per_request
                for mode in modes[1:]:
                    result[f"instructions_{mode}_over_bare"] = round(per_request[mode] / per_request["bare"], 3)
                    result[f"instructions_{mode}_added_per_request"] = per_request[mode] - per_request["bare"]
            return result
        finally:
            redis_server.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m benchmarks.bench_limiter_cpu`."""
    parser = argparse.ArgumentParser(prog="bench_limiter_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32_000, help="measured requests per run (multiple of 32)")
    parser.add_argument("--callgrind", action="store_true", help="also count instructions per request (valgrind)")
    parser.add_argument("--mode", choices=MODES[1:], action="append",
                        help="measure only this limited mode beside bare (repeatable; default: both)")  # fmt: skip
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < CONCURRENCY or args.requests % CONCURRENCY:
        parser.error(f"--requests must be a positive multiple of {CONCURRENCY}")
    if args.worker:
        _worker(args.worker, args.redis_url, args.requests)
        return 0
    modes = ("bare", *dict.fromkeys(args.mode)) if args.mode else MODES
    result = run_cpu(args.requests, args.callgrind, modes)
    print_and_save(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
