"""An HTTP load client process for the edge tests: `python -m tests.limiter.http_hammer --url URL --key K ...`.

`--clients` concurrent keep-alive connections (aiohttp, one asyncio task each) send `GET --path` with
the API key for `--seconds`, each a new request as soon as its answer came. Prints one JSON line:
statuses (status -> count), refused_by (the 429 bodies' `limited_by` -> count), errors (transport
failures, the first three in first_errors), seconds (first send to last answer), and with
`--redis-url` the Redis server clock read just before the first send and just after the last answer
(server_start_us, server_end_us: every request of the run falls between them).

aiohttp (a dependency already) rather than httpx: on a loaded 2-core machine one httpx process drove
~60 requests/s over 200 connections, too few to press on a bucket; aiohttp drove ~1,000/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

import aiohttp
import redis


def server_time_us(redis_url: str | None) -> int | None:
    """The Redis server clock in µs (None without a URL)."""
    if redis_url is None:
        return None
    with redis.Redis.from_url(redis_url) as client:
        seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


async def hammer(
    url: str, path: str, key: str, clients: int, seconds: float, redis_url: str | None = None
) -> dict[str, object]:
    """Run the clients; the summary printed by main()."""
    statuses: Counter[int] = Counter()
    refused_by: Counter[str] = Counter()
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10.0)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout, headers={"x-api-key": key}) as session:
        server_start_us = server_time_us(redis_url)
        started = time.monotonic()
        stop_at = started + seconds

        async def one_client() -> None:
            while time.monotonic() < stop_at:
                try:
                    async with session.get(path) as response:
                        body = await response.read()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    errors.append(repr(exc))
                    continue
                statuses[response.status] += 1
                if response.status == 429:
                    refused_by[json.loads(body).get("limited_by", "?")] += 1

        await asyncio.gather(*(one_client() for _ in range(clients)))
        finished = time.monotonic()
        server_end_us = server_time_us(redis_url)
    return {
        "statuses": {str(status): count for status, count in statuses.items()},
        "refused_by": dict(refused_by),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": finished - started,
        "server_start_us": server_start_us,
        "server_end_us": server_end_us,
    }


def main(argv: list[str]) -> int:
    """Hammer the edge and print the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--path", default="/v1/items")
    parser.add_argument("--key", required=True)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--redis-url", help="read this Redis server's clock around the run")
    args = parser.parse_args(argv)
    summary = asyncio.run(hammer(args.url, args.path, args.key, args.clients, args.seconds, args.redis_url))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
