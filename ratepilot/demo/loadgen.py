"""The open-loop load generator: requests leave on a fixed schedule, whatever the server answers.

Each request is sent at its scheduled time on its own task, over a pool of keep-alive connections
(aiohttp; httpx's pool serialises badly past a few hundred requests in flight). Latency is measured
from the *scheduled* send time, so a slow server or a full connection pool shows up as latency
instead of silently delaying later requests (no coordinated omission). The generator's own lag
(actual minus scheduled send time) is recorded too, to tell when the generator itself fell behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np

TRANSPORT_ERROR = 0  # status recorded when no HTTP answer came (timeout, reset, refused)


@dataclass(frozen=True)
class Request:
    """One kind of request the generator sends."""

    method: str = "GET"
    path: str = "/v1/items"
    body: bytes = b""


@dataclass(frozen=True)
class RequestPlan:
    """What each scheduled request sends and with which API key: indices into `requests` and `keys`."""

    requests: tuple[Request, ...]
    keys: tuple[str, ...]
    request_index: np.ndarray  # one per arrival
    key_index: np.ndarray  # one per arrival

    def __post_init__(self) -> None:
        if not self.requests or not self.keys:
            raise ValueError("a request plan needs at least one request kind and one key")
        if self.request_index.shape != self.key_index.shape:
            raise ValueError("request_index and key_index must have one entry per arrival")


@dataclass
class RunRecord:
    """What happened to every scheduled request; arrays indexed like the arrival offsets."""

    offsets_s: np.ndarray  # scheduled send time since the start
    status: np.ndarray = field(init=False)  # HTTP status, TRANSPORT_ERROR, or -1 while in flight / never sent
    latency_s: np.ndarray = field(init=False)  # completion minus *scheduled* send time
    lag_s: np.ndarray = field(init=False)  # actual minus scheduled send time

    def __post_init__(self) -> None:
        n = self.offsets_s.size
        self.status = np.full(n, -1, dtype=np.int16)
        self.latency_s = np.full(n, np.nan)
        self.lag_s = np.full(n, np.nan)

    @property
    def completed(self) -> np.ndarray:
        """Mask of requests that have an outcome."""
        return self.status >= 0


class LoadGenerator:
    """Plays arrival offsets against `base_url`: each request as its plan says, else GET `path` with
    the `clients` API keys taken in turn."""

    def __init__(
        self,
        base_url: str,
        path: str = "/v1/items",
        clients: int = 50,
        key_header: str = "x-api-key",
        key_prefix: str = "demo_",
        timeout_s: float = 5.0,
        connections: int = 256,
    ):
        if clients < 1 or connections < 1 or not timeout_s > 0:
            raise ValueError("clients and connections must be >= 1 and timeout_s > 0")
        self.base_url = base_url.rstrip("/")
        self.path = path
        self.clients = clients
        self.key_header = key_header
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.connections = connections

    async def run(
        self,
        offsets_s: np.ndarray,
        on_second: Callable[[int, RunRecord], None] | None = None,
        stop: asyncio.Event | None = None,
        plan: RequestPlan | None = None,
    ) -> RunRecord:
        """Send every request at its offset; call `on_second(second, record)` once per elapsed second."""
        record = RunRecord(np.asarray(offsets_s, dtype=np.float64))
        plan = plan or self.default_plan(record.offsets_s.size)
        if plan.request_index.size != record.offsets_s.size:
            raise ValueError(f"the plan has {plan.request_index.size} requests for {record.offsets_s.size} arrivals")
        kinds = [(request.method, self.base_url + request.path, request.body or None) for request in plan.requests]
        headers = [{self.key_header: key} for key in plan.keys]
        connector = aiohttp.TCPConnector(limit=self.connections, force_close=False, ttl_dns_cache=None)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            start = time.perf_counter()
            pending: set[asyncio.Task[None]] = set()
            next_second = 1
            n = record.offsets_s.size
            i = 0
            while i < n and not (stop is not None and stop.is_set()):
                now = time.perf_counter() - start
                while i < n and record.offsets_s[i] <= now:
                    method, url, body = kinds[plan.request_index[i]]
                    send = self._send(session, record, i, start, method, url, body, headers[plan.key_index[i]])
                    task = asyncio.create_task(send)
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    i += 1
                if on_second is not None and now >= next_second:
                    on_second(next_second, record)
                    next_second = int(now) + 1
                wake = min(record.offsets_s[i] if i < n else now + 0.01, float(next_second))
                await asyncio.sleep(max(0.0, wake - (time.perf_counter() - start)))
            if pending:
                await asyncio.wait(pending, timeout=self.timeout_s + 1)
            for task in list(pending):
                task.cancel()
            if on_second is not None:
                on_second(next_second, record)
        return record

    def default_plan(self, n: int) -> RequestPlan:
        """GET `path` for every request, the API keys taken in turn."""
        keys = tuple(f"{self.key_prefix}{i:04d}" for i in range(self.clients))
        index = np.arange(n)
        return RequestPlan((Request("GET", self.path),), keys, np.zeros(n, dtype=np.int64), index % self.clients)

    async def _send(
        self, session: aiohttp.ClientSession, record: RunRecord, i: int, start: float,
        method: str, url: str, body: bytes | None, headers: dict[str, str],
    ) -> None:  # fmt: skip
        scheduled = start + record.offsets_s[i]
        record.lag_s[i] = time.perf_counter() - scheduled
        status = TRANSPORT_ERROR
        try:
            async with session.request(method, url, data=body, headers=headers) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            status = TRANSPORT_ERROR
        record.latency_s[i] = time.perf_counter() - scheduled
        record.status[i] = status
