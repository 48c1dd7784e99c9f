"""Controller replicas as real subprocesses: takeover after a crash, and a paused leader's late write fenced."""

from __future__ import annotations

import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from benchmarks.synthetic_exporter import SyntheticExporter
from controller.lease import FENCE_KEY, LEADER_KEY
from controller.rate_store import DECISIONS_KEY
from policy import rl
from ratepilot.servers import ManagedProcess, PrometheusServer, RedisServer, free_port
from tests.controller.support import make_settings, query, wait_for, write_config

LEASE_S = 2.0
TIERS = {"free": {"static_rate": 100, "min_rate": 10, "max_rate": 1000}}
ROOT = Path(__file__).resolve().parents[2]


def replica(name: str, config: Path, workdir: Path) -> ManagedProcess:
    port = free_port()
    argv = [sys.executable, "-m", "controller.service", "--config", str(config), "--replica-id", name, "--port", str(port)]
    process = ManagedProcess(f"controller-{name}", argv, port, workdir)
    process.workdir.mkdir(parents=True, exist_ok=True)
    return process


def metric(process: ManagedProcess, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{process.port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name}{{{labels}}}"):
                return float(line.split()[-1])
    return 0.0


def holder(client: redis.Redis) -> str | None:
    value = client.get(LEADER_KEY)
    return value.decode() if value else None


@pytest.fixture
def config(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[Path, redis.Redis]]:
    model = rl.save(rl.RLPolicy(rl.PolicyNetwork.zeros()), tmp_path / "policy.npz")
    client = redis.Redis.from_url(redis_server.url)
    yield tmp_path / "controller.yaml", client
    client.close()
    assert model.exists()


def make_config(path: Path, redis_url: str, prometheus_url: str, **changes: object) -> Path:
    settings = make_settings(
        redis_url, prometheus_url, tiers=TIERS, policy={"name": "rl", "model": str(path.parent / "policy.npz")},
        lease={"lease_s": LEASE_S, "renew_deadline_s": 1.5, "retry_period_s": 0.3}, **changes,
    )  # fmt: skip
    data_path = write_config(path, settings)
    return data_path


def test_a_follower_takes_over_within_two_lease_periods(config, redis_server: RedisServer, prometheus: PrometheusServer,
                                                        tmp_path: Path) -> None:  # fmt: skip
    path, client = config
    make_config(path, redis_server.url, prometheus.url)
    a, b = replica("a", path, tmp_path / "a"), replica("b", path, tmp_path / "b")
    try:
        a.start()
        wait_for(lambda: holder(client) == "a")
        b.start()
        wait_for(lambda: metric(b, "ratepilot_controller_ticks_total", 'result="follower"') >= 2)
        assert metric(b, "ratepilot_controller_is_leader", "") == 0.0
        assert a.process is not None
        a.process.kill()  # a crash: no lease release
        killed = time.monotonic()
        wait_for(lambda: holder(client) == "b", timeout_s=3 * LEASE_S)
        assert time.monotonic() - killed < 2 * LEASE_S
        wait_for(lambda: metric(b, "ratepilot_controller_ticks_total", 'result="written"') >= 1)
    finally:
        a.stop()
        b.stop()
    fences = [int(f[b"fence"]) for _, f in client.xrange(DECISIONS_KEY)]
    assert int(client.get(FENCE_KEY)) == fences[-1] == fences[0] + 1  # one acquisition each
    replicas = [f[b"replica"].decode() for _, f in client.xrange(DECISIONS_KEY)]
    assert replicas[0] == "a" and replicas[-1] == "b" and "a" not in replicas[replicas.index("b"):]


def test_a_leader_paused_past_its_lease_has_its_late_write_refused(
    config, redis_server: RedisServer, exporter: SyntheticExporter, prometheus_factory, tmp_path: Path
) -> None:
    path, client = config
    prom: PrometheusServer = prometheus_factory([exporter.target])
    wait_for(lambda: len(query(prom.url, "ratepilot_backend_cpu_utilization")) == 1, timeout_s=30)
    make_config(path, redis_server.url, prom.url, prometheus={"url": prom.url, "window": "3s", "timeout_s": 30})
    a, b = replica("a", path, tmp_path / "a"), replica("b", path, tmp_path / "b")
    try:
        a.start()
        wait_for(lambda: metric(a, "ratepilot_controller_ticks_total", 'result="written"') >= 2)
        b.start()
        wait_for(lambda: metric(b, "ratepilot_controller_ticks_total", 'result="follower"') >= 1)
        prom.pause()  # a's next tick blocks in its Prometheus query, after it checked it leads
        time.sleep(1.0)
        a.pause()  # ... and then a itself stops, past its lease
        wait_for(lambda: holder(client) == "b", timeout_s=3 * LEASE_S)
        a.resume()
        time.sleep(0.5)
        prom.resume()  # a's tick goes on and writes with its old fencing token
        wait_for(lambda: metric(a, "ratepilot_controller_ticks_total", 'result="fenced"') >= 1, timeout_s=15)
        wait_for(lambda: metric(b, "ratepilot_controller_ticks_total", 'result="written"') >= 1, timeout_s=15)
        assert metric(a, "ratepilot_controller_errors_total", 'stage="lease"') >= 1
    finally:
        prom.resume()
        a.stop()
        b.stop()
    log = (tmp_path / "a" / "controller-a.log").read_text()
    assert "write refused by Redis" in log and "lease not held by a" in log
    entries = [(f[b"replica"].decode(), f[b"fence"].decode()) for _, f in client.xrange(DECISIONS_KEY)]
    first_b = next(i for i, (name, _) in enumerate(entries) if name == "b")
    assert all(name == "b" for name, _ in entries[first_b:]), "a wrote after b took over"
    a_fences = {fence for name, fence in entries if name == "a"}
    assert len(a_fences) == 1 and int(entries[-1][1]) == int(a_fences.pop()) + 1
