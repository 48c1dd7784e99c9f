"""Helpers of the controller tests: PromQL queries, waiting on a condition, settings and config files, a cutting TCP proxy."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from controller.settings import ControllerSettings, default_config_text, settings_from_mapping

# "hot" is the tier tests inject latency into; "idle" has no traffic at all (its metrics are NaN/empty)
EXPORTED_TIERS = ["free", "pro", "internal", "hot", "idle"]
TOKEN = "test-admin-token-0123456789"
RECORDING_RULES = Path(__file__).parents[2] / "deploy" / "prometheus" / "rules" / "recording.yml"


def query(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    """Run an instant query against the test Prometheus."""
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]["result"]  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0, step_s: float = 0.2) -> None:
    """Poll until predicate() is true; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def make_settings(redis_url: str, prometheus_url: str, **changes: Any) -> ControllerSettings:
    """The packaged config with fast test timings; `changes` are dotted-path overrides (e.g. loop__mode)."""
    data = yaml.safe_load(default_config_text())
    data["redis"]["url"] = redis_url
    data["prometheus"]["url"] = prometheus_url
    data["prometheus"]["window"] = "3s"
    data["loop"].update(tick_interval_s=0.3, rate_ttl_s=10)
    data["lease"].update(lease_s=2.0, renew_deadline_s=1.5, retry_period_s=0.3)
    data["admin"]["token"] = TOKEN
    data["replica_id"] = "test-replica"
    for key, value in changes.items():
        node = data
        *path, last = key.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return settings_from_mapping(data, env={})


def write_config(path: Path, settings: ControllerSettings, **extra: Any) -> Path:
    """Dump settings (plus top-level extras) as a YAML config file."""
    data = settings.model_dump(mode="json")
    data.update(extra)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class CuttingProxy:
    """A TCP proxy to a local port that cuts one command in the middle of its sending.

    Bytes pass through both ways until the client sends `marker` (e.g. the SHA of the rate-writing
    script in an EVALSHA); from there only `keep_bytes` more are forwarded and the rest is swallowed,
    so the server holds a half-received command, and `cut` is set. Closing either side closes the
    other, as a dying client's connection would.
    """

    def __init__(self, upstream_port: int, marker: bytes, keep_bytes: int):
        self.upstream_port = upstream_port
        self.marker = marker
        self.keep_bytes = keep_bytes
        self.cut = threading.Event()
        self.swallowed = 0  # bytes of the cut command that never reached the server
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        """redis:// URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, watch: bool) -> None:
        tail, budget = b"", None  # budget: bytes still forwarded after the marker (None: not seen)
        while True:
            try:
                data = source.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            if watch and budget is None and not self.cut.is_set():
                if self.marker in tail + data:
                    budget = self.keep_bytes
                tail = (tail + data)[-len(self.marker) :]
            if budget is not None:
                self.swallowed += max(0, len(data) - budget)
                data, budget = data[:budget], budget - min(budget, len(data))
                if budget == 0:
                    self.cut.set()
            try:
                if data:
                    sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
