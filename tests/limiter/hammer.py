"""A client process for the concurrency and clock tests: `python -m tests.limiter.hammer ...`.

`--mode call|batch|async` hammers one key for `--seconds`; `--mode sequence` makes `--count` checks.
Prints one JSON line: admitted, denied, errors, the client's own clock, and the server times
reported by the script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from benchmarks.sync_redis_bucket import SyncRedisBucket
from limiter.bucket import BucketSpec
from limiter.errors import RedisUnavailable
from limiter.redis_bucket import RedisBucket


def main(argv: list[str]) -> int:
    """Run the checks and print the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--cluster", action="store_true")
    parser.add_argument("--key", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--capacity", type=float, required=True)
    parser.add_argument("--cost", type=float, default=1.0)
    parser.add_argument("--mode", choices=["call", "batch", "async", "sequence"], default="call")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args(argv)

    keys, specs = [args.key], [BucketSpec(args.rate, args.capacity)]
    if args.mode == "async":
        admitted, denied, errors = asyncio.run(hammer_async(args, keys, specs))
        print(json.dumps({"admitted": admitted, "denied": denied, "errors": errors}))
        return 0
    bucket = SyncRedisBucket.from_url(args.url, timeout_s=2.0, cluster=args.cluster)
    admitted = denied = errors = 0
    allowed_list: list[bool] = []
    server_now_us: list[int] = []
    client_time_s = time.time()
    deadline = time.monotonic() + args.seconds
    while True:
        if args.mode == "sequence" and len(allowed_list) >= args.count:
            break
        if args.mode != "sequence" and time.monotonic() >= deadline:
            break
        try:
            if args.mode == "batch":
                results = bucket.check_many_raw([(keys, specs, args.cost)] * 20)
            else:
                results = [bucket.check_raw(keys, specs, args.cost)]
        except RedisUnavailable:
            errors += 1
            continue
        for result in results:
            admitted += result.allowed
            denied += not result.allowed
            if args.mode == "sequence":
                allowed_list.append(result.allowed)
                server_now_us.append(result.now_us)
    bucket.close()
    print(
        json.dumps(
            {
                "admitted": admitted,
                "denied": denied,
                "errors": errors,
                "allowed": allowed_list,
                "server_now_us": server_now_us,
                "client_time_s": client_time_s,
            }
        )
    )
    return 0


async def hammer_async(args: argparse.Namespace, keys: list[str], specs: list[BucketSpec]) -> tuple[int, int, int]:
    """20 tasks on one coalescing RedisBucket until the time is up: (admitted, denied, errors)."""
    bucket = RedisBucket.from_url(args.url, timeout_s=2.0, cluster=args.cluster)
    counts = [0, 0, 0]
    deadline = time.monotonic() + args.seconds

    async def task() -> None:
        while time.monotonic() < deadline:
            try:
                allowed, _ = await bucket.check(keys, specs, args.cost)
                counts[0 if allowed else 1] += 1
            except RedisUnavailable:
                counts[2] += 1

    await asyncio.gather(*(task() for _ in range(20)))
    await bucket.aclose()
    return counts[0], counts[1], counts[2]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
