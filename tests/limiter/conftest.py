"""Fixtures of the limiter suite: a local three-master Redis Cluster; `backend`, which runs each core
test once against a single redis-server and once against the cluster; `edge_factory`, a served edge."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster

from benchmarks.sync_redis_bucket import SyncRedisBucket
from limiter.config import LimiterConfig, load_config
from limiter.edge import Edge, EdgeOptions
from limiter.redis_bucket import RedisBucket
from ratepilot.servers import RedisServer, ServerError, find_binary, free_port
from tests.limiter.support import BASE_CONFIG, RunningEdge, write_config


@dataclass
class RedisCluster:
    """Three redis-server masters joined into one cluster (no replicas), all on free ports."""

    workdir: Path
    nodes: list[RedisServer] = field(default_factory=list)

    def start(self, masters: int = 3) -> None:
        """Start the nodes, join them with `redis-cli --cluster create`, wait for cluster_state:ok."""
        for i in range(masters):
            node = RedisServer(
                workdir=self.workdir / f"node{i}",
                extra_args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-port", str(free_port()),  # port + 10000 may not exist or be taken
                    "--cluster-node-timeout", "2000",
                ],
            )  # fmt: skip
            node.start()
            self.nodes.append(node)
        create = [find_binary("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)]
        done = subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise ServerError(f"redis-cli --cluster create failed: {done.stdout[-500:]} {done.stderr[-500:]}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [redis.Redis(port=n.port).cluster("info")["cluster_state"] for n in self.nodes]
            if all(state == "ok" for state in states):
                return
            time.sleep(0.1)
        raise ServerError("the Redis Cluster did not reach cluster_state:ok within 30 s")

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    @property
    def url(self) -> str:
        """Seed URL of the first node (the cluster client discovers the others)."""
        return self.nodes[0].url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A local three-master Redis Cluster for the whole session."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Backend:
    """Where a core test runs: a single Redis or a cluster, with factories for buckets and admin clients."""

    name: str
    url: str
    cluster: bool
    admin: Any  # redis.Redis or redis.cluster.RedisCluster, for setup and inspection
    _opened: list[Any] = field(default_factory=list)

    def sync_bucket(self, timeout_s: float = 1.0) -> SyncRedisBucket:
        """A SyncRedisBucket (generous timeout: these tests assert semantics, not speed)."""
        bucket = SyncRedisBucket.from_url(self.url, timeout_s=timeout_s, cluster=self.cluster)
        self._opened.append(bucket)
        return bucket

    def async_bucket(self, timeout_s: float = 1.0, **options: Any) -> RedisBucket:
        """A RedisBucket on a new asyncio client (close it with aclose() inside the event loop)."""
        return RedisBucket.from_url(self.url, timeout_s=timeout_s, cluster=self.cluster, **options)

    def tag(self) -> str:
        """A fresh hash tag, so each test (or hypothesis example) gets buckets of its own."""
        return uuid.uuid4().hex[:12]

    def server_time_us(self, key: str = "") -> int:
        """The server clock in µs (on the node owning `key` in a cluster)."""
        if self.cluster:
            node = self.admin.get_node_from_key(key or "x")
            seconds, micros = self.admin.time(target_nodes=node)
        else:
            seconds, micros = self.admin.time()
        return int(seconds) * 1_000_000 + int(micros)

    def close(self) -> None:
        """Close every client this backend opened."""
        for bucket in self._opened:
            bucket.close()
        self.admin.close()


BACKENDS = ["single", pytest.param("cluster", marks=pytest.mark.cluster)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The same core test against one redis-server and against a three-master Redis Cluster."""
    yield from _backend(request)


@pytest.fixture(scope="module", params=BACKENDS)
def module_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """As `backend`, shared by a module (hypothesis tests need a fixture that outlives examples)."""
    yield from _backend(request)


def _backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "single":
        server: RedisServer = request.getfixturevalue("redis_server_session")
        admin: Any = redis.Redis.from_url(server.url)
        backend = Backend("single", server.url, False, admin)
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        admin = redis.cluster.RedisCluster.from_url(cluster.url)
        backend = Backend("cluster", cluster.url, True, admin)
    try:
        yield backend
    finally:
        backend.close()


def commandstat(client: redis.Redis, name: str) -> int:
    """Calls of one command (`evalsha`, `script|load`) since the last CONFIG RESETSTAT."""
    stats: Any = client.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


@pytest.fixture
def commandstats() -> Callable[[redis.Redis, str], int]:
    """The `commandstat(client, name)` helper."""
    return commandstat


@pytest.fixture
def edge_factory(tmp_path: Path) -> Iterator[Callable[..., RunningEdge]]:
    """Call with (redis_url, config text=BASE_CONFIG, **EdgeOptions fields) to get a started edge."""
    started: list[RunningEdge] = []

    def make(redis_url: str, text: str = BASE_CONFIG, **options: Any) -> RunningEdge:
        path = write_config(tmp_path / f"limiter{len(started)}.yaml", redis_url, text)
        config: LimiterConfig = load_config(path, environ={})
        options.setdefault("backend", "echo")
        options.setdefault("reload_s", 0.1)
        edge = Edge(config, EdgeOptions(config_path=path, **options))
        running = RunningEdge(edge, free_port())
        running.start()
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()
