"""Helpers of the limiter service tests: an edge app served by a real uvicorn on a free port, its config."""

from __future__ import annotations

import asyncio
import re
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from limiter.edge import Edge

# The RateLimit field: client bucket, then tier bucket (r = tokens left, t = s until full)
RATELIMIT = re.compile(r'^"client";r=(\d+);t=(\d+), "tier";r=(\d+);t=(\d+)$')

# Refill rates are tiny (one token per ~17 min) so that a test's counts do not depend on how fast it runs.
SLOW = 0.001

# The Redis timeout is generous: tests that count decisions must not see a check on a busy machine
# fall back to the local guard. Fault tests that need a short one replace it.
CONFIG_HEAD = """
redis:
  url: REDIS_URL
  timeout_ms: 1000
client_header: x-api-key
"""
# CONFIG_HEAD plus a `free` tier (anonymous and default: client burst 5, a tier bucket that never binds);
# a test appends its own tiers under it and its own sections after them
FREE_TIER_HEAD = CONFIG_HEAD + f"""anonymous_tier: free
default_tier: free
tiers:
  free:
    client:    {{rate: {SLOW}, burst: 5}}
    aggregate: {{rate: {SLOW}, burst: 1000}}
    key_prefixes: [free_]
"""
BASE_CONFIG = CONFIG_HEAD + f"""anonymous_tier: free
default_tier: free
tiers:
  free:
    client:    {{rate: {SLOW}, burst: 5}}
    aggregate: {{rate: {SLOW}, burst: 8}}
    key_prefixes: [free_]
  pro:
    client:    {{rate: {SLOW}, burst: 12}}
    aggregate: {{rate: {SLOW}, burst: 100}}
    key_prefixes: [pro_]
  closed:
    client:    {{rate: {SLOW}, burst: 5}}
    aggregate: {{rate: {SLOW}, burst: 50}}
    failure_policy: fail_closed
    key_prefixes: [closed_]
clients:
  vip-key: pro
costs:
  default: 1
  routes:
    - {{method: POST, path: /v1/infer, cost: 3}}
rate_table:
  poll_s: 0.2
exempt_paths: [/health, /metrics, /admin/backend]
"""


def write_config(path: Path, redis_url: str, text: str = BASE_CONFIG) -> Path:
    """Write a config file with the Redis URL filled in."""
    path.write_text(textwrap.dedent(text).replace("REDIS_URL", redis_url))
    return path


class ServedApp:
    """Any ASGI app served by uvicorn in a thread (lifespan on); after `stop()`, `leftover_tasks` names the
    asyncio tasks still alive in the server's loop once uvicorn returned (a clean shut-down leaves none)."""

    def __init__(self, app: Any, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
        )
        self.leftover_tasks: list[str] | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self.client = httpx.Client(base_url=self.url, timeout=5.0)

    async def _serve(self) -> None:
        await self.server.serve()
        current = asyncio.current_task()
        self.leftover_tasks = [repr(task.get_coro()) for task in asyncio.all_tasks() if task is not current]

    def start(self) -> None:
        """Serve and wait until uvicorn accepts connections (after the app's start-up)."""
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Shut uvicorn down (the app's lifespan shut-down runs) and join its thread."""
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=15)
        if self.thread.is_alive():
            raise RuntimeError("uvicorn did not stop within 15 s")


class RunningEdge(ServedApp):
    """An Edge served by uvicorn in a thread; `client` is an httpx client on its base URL."""

    def __init__(self, edge: Edge, port: int):
        super().__init__(edge.app, port)
        self.edge = edge
        self.port = port

    def get(self, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        """GET with the API key header when given."""
        headers = {"x-api-key": key} if key else {}
        return self.client.get(path, headers=headers, **kwargs)

    def post(self, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        """POST with the API key header when given."""
        headers = {"x-api-key": key} if key else {}
        return self.client.post(path, headers=headers, **kwargs)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, every_s: float = 0.05) -> bool:
    """Poll until the predicate holds (True) or the bound passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return predicate()


def metric_sum(metrics_text: str, name: str) -> float:
    """The samples of a metric (`NAME{labels} value` lines of a /metrics page) summed over its label values;
    0 while it has none."""
    pattern = rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$"
    return sum(float(value) for value in re.findall(pattern, metrics_text, re.M))
