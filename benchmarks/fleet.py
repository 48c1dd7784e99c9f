"""A fleet of real `ratepilot edge` processes on one Redis, a hammer through all of them, and a network
partition of one node (its own network namespace, link down and up). Used by `ratepilot bench nodes` and
the many-node tests.

The partitioned node runs in a network namespace with two veth pairs to the host: one that clients
reach it by, one it reaches Redis by. `Partition.cut()` takes the Redis link down (this kernel has no
netem: a link down is the fault), `heal()` brings it back up. Namespaces need root and `ip`
(iproute2); `namespaces_available()` says whether they can be made here. Where they cannot,
`BlackholeProxy` is the fallback: the node reaches Redis through a TCP proxy of ours whose `cut()`
silently drops every byte both ways (as a dead link does: nothing is refused, nothing arrives).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ratepilot.servers import free_port, port_open

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 30.0


def sample(metrics_text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` (counter `_total` included) whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for item in family.samples:
            if item.name == name and all(item.labels.get(k) == v for k, v in (labels or {}).items()):
                total += item.value
    return total


@dataclass
class EdgeNode:
    """One `ratepilot edge --backend echo` process (inside `netns` when given)."""

    config: Path
    workdir: Path
    host: str = "127.0.0.1"
    netns: str | None = None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL clients use."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> EdgeNode:
        """Start and wait until it accepts connections."""
        argv = [sys.executable, "-m", "ratepilot.cli", "edge", "--backend", "echo", "--config", str(self.config),
                "--host", self.host, "--port", str(self.port), "--log-level", "info"]  # fmt: skip
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RATEPILOT_")}
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / f"edge-{self.port}.log", "ab") as log:
            self.process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_open(self.port, self.host):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"edge on port {self.port} did not start; see {self.workdir}")
            time.sleep(0.05)
        return self

    def metrics(self) -> str:
        """The edge's /metrics text."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def kill(self) -> None:
        """SIGKILL (no goodbye: its heartbeat has to expire)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM and reap (SIGKILL after 15 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()


# -- the hammer -------------------------------------------------------------------------------------


@dataclass
class HammerResult:
    """What one hammer run saw: statuses per edge URL, and its wall-clock span."""

    statuses: dict[str, dict[int, int]]
    started: float  # time.monotonic() when the first request went out
    ended: float  # ... when the last answer came back

    def count(self, status: int, url: str | None = None) -> int:
        """Responses with `status` (from one edge, or all)."""
        urls = [url] if url is not None else list(self.statuses)
        return sum(self.statuses[u].get(status, 0) for u in urls)

    @property
    def admitted(self) -> int:
        """200 answers from every edge."""
        return self.count(200)

    @property
    def seconds(self) -> float:
        """From the first request sent to the last answer read."""
        return self.ended - self.started


async def _read_status(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if match:
        await reader.readexactly(int(match[1]))
    return int(head[9:12])


async def _connection(url: str, request: bytes, until: float, statuses: dict[int, int], span: list[float]) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
    except (OSError, TimeoutError):
        statuses[-1] = statuses.get(-1, 0) + 1
        return
    try:
        while time.monotonic() < until:
            writer.write(request)
            status = await asyncio.wait_for(_read_status(reader), 10)
            statuses[status] = statuses.get(status, 0) + 1
            span[1] = max(span[1], time.monotonic())
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        statuses[-1] = statuses.get(-1, 0) + 1  # a broken connection is counted, never retried
    finally:
        writer.close()


async def hammer_async(urls: Sequence[str], key: str, seconds: float, connections: int = 4, path: str = "/v1/items") -> HammerResult:
    """One client id through every edge at once, `connections` keep-alive connections per edge, closed loop."""
    request = f"GET {path} HTTP/1.1\r\nHost: fleet\r\nx-api-key: {key}\r\n\r\n".encode()
    statuses: dict[str, dict[int, int]] = {url: {} for url in urls}
    started = time.monotonic()
    span = [started, started]
    until = started + seconds
    await asyncio.gather(*(
        _connection(url, request, until, statuses[url], span) for url in urls for _ in range(connections)
    ))  # fmt: skip
    return HammerResult(statuses, started, span[1])


def hammer(urls: Sequence[str], key: str, seconds: float, connections: int = 4, path: str = "/v1/items") -> HammerResult:
    """hammer_async() in its own event loop."""
    return asyncio.run(hammer_async(urls, key, seconds, connections, path))


def wait_for(condition: Any, timeout_s: float, what: str, poll_s: float = 0.05) -> float:
    """Poll `condition()` until true; returns the seconds it took; raises AssertionError after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)
    return time.monotonic() - started


# -- a partitioned node -----------------------------------------------------------------------------


def namespaces_available() -> bool:
    """True when this process may create network namespaces and veth pairs (root and `ip`)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"rpprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return made


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Partition:
    """A network namespace with a client link and a Redis link to the host (two veth pairs, /30 each).

    Edges inside listen on `client_ip`; Redis is reached at `redis_ip` (the host end of the Redis
    link; the redis-server must listen on it too)."""

    subnet: int = field(default_factory=lambda: 16 + secrets.randbelow(200))  # 10.SUBNET.{1,2}.0/30
    name: str = field(default_factory=lambda: f"rp{secrets.token_hex(3)}")

    @property
    def client_ip(self) -> str:
        """The edge's address inside the namespace, on the client link."""
        return f"10.{self.subnet}.1.2"

    @property
    def redis_ip(self) -> str:
        """The host's address on the Redis link (where the namespace reaches Redis)."""
        return f"10.{self.subnet}.2.1"

    @property
    def redis_link(self) -> str:
        """Host end of the Redis link: the one cut() takes down."""
        return f"{self.name}r0"

    def create(self) -> Partition:
        """Make the namespace and both links."""
        _ip("netns", "add", self.name)
        _ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        for index, kind in ((1, "c"), (2, "r")):
            host_end, ns_end = f"{self.name}{kind}0", f"{self.name}{kind}1"
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", ns_end, "netns", self.name)
            _ip("addr", "add", f"10.{self.subnet}.{index}.1/30", "dev", host_end)
            _ip("link", "set", host_end, "up")
            _ip("netns", "exec", self.name, "ip", "addr", "add", f"10.{self.subnet}.{index}.2/30", "dev", ns_end)
            _ip("netns", "exec", self.name, "ip", "link", "set", ns_end, "up")
        return self

    def cut(self) -> None:
        """Take the Redis link down: the node's Redis traffic goes nowhere."""
        _ip("link", "set", self.redis_link, "down")

    def heal(self) -> None:
        """Bring the Redis link back up."""
        _ip("link", "set", self.redis_link, "up")

    def destroy(self) -> None:
        """Delete the links and the namespace (best effort)."""
        for kind in ("c", "r"):
            subprocess.run(["ip", "link", "del", f"{self.name}{kind}0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class BlackholeProxy:
    """A TCP proxy from `port` on 127.0.0.1 to `target_port`; while cut, bytes both ways are dropped."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.cut_off = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                inbound, _ = self._listener.accept()
            except OSError:
                return
            try:
                outbound = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                inbound.close()
                continue
            for source, sink in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.cut_off.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def cut(self) -> None:
        """Drop every byte from now on (connections stay open, as behind a dead link)."""
        self.cut_off.set()

    def heal(self) -> None:
        """Forward again."""
        self.cut_off.clear()

    def close(self) -> None:
        """Stop accepting."""
        self._closed.set()
        self._listener.close()
