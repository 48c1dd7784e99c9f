"""The bucket script is effect-replicated: a replica (`--replicaof`) and a primary restarted from its AOF
hold exactly the primary's bucket state after load (the script reads the server clock, so a replica or
an AOF replaying the script itself would compute other states)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from benchmarks.sync_redis_bucket import SyncRedisBucket
from limiter.bucket import BucketSpec
from limiter.check_encoding import CheckRequest
from limiter.guard import client_key, tier_key
from limiter.redis_bucket import RedisBucket
from ratepilot.servers import RedisServer

CLIENT = BucketSpec(0.01, 5)  # drained clients stay drained for minutes: keys neither refill nor expire meanwhile
TIER = BucketSpec(0.05, 300)
TIERS = ("alpha", "beta")
CLIENTS = 60


def bucket_keys(tier: str, client: int) -> list[str]:
    return [client_key(tier, f"c{client}"), tier_key(tier)]


def snapshot(client: redis.Redis) -> dict[bytes, tuple[bytes, int]]:
    """Every `rp:*` key: (its state string, its PTTL in ms)."""
    return {key: (client.get(key), client.pttl(key)) for key in client.scan_iter(match="rp:*", count=1000)}  # type: ignore[misc]


def same_state(
    first: dict[bytes, tuple[bytes, int]], second: dict[bytes, tuple[bytes, int]], ttl_slack_ms: int
) -> None:
    """Equal key sets and state strings; PTTLs within the slack (they tick down between the two reads)."""
    assert first.keys() == second.keys()
    assert {key: state for key, (state, _) in first.items()} == {key: state for key, (state, _) in second.items()}
    drift = [abs(first[key][1] - second[key][1]) for key in first]
    assert max(drift) <= ttl_slack_ms, max(drift)


def wait_for_link(replica: redis.Redis) -> None:
    deadline = time.monotonic() + 30
    while replica.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica did not link up within 30 s"
        time.sleep(0.05)


def wait_for_sync(source: redis.Redis, replica: redis.Redis) -> None:
    """After WAIT: the replica linked, not in a (re)sync (a syncing replica serves its stale data set), and
    holding as many keys as the primary, within 30 s (the key states themselves are compared after)."""
    deadline = time.monotonic() + 30
    while True:
        info = replica.info("replication")
        if info.get("master_link_status") == "up" and not info.get("master_sync_in_progress") and (
            replica.dbsize() == source.dbsize()
        ):
            return
        assert time.monotonic() < deadline, f"the replica did not catch up within 30 s: {info}"
        time.sleep(0.05)


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with an AOF fsynced on every write."""
    server = RedisServer(
        workdir=tmp_path / "primary", extra_args=["--appendonly", "yes", "--appendfsync", "always", "--repl-diskless-sync-delay", "0"]
    )
    server.start()
    yield server
    server.stop()


def load(url: str) -> int:
    """Checks through both front ends: per call and batched (sync), and the edge's pipelined asyncio path
    (one EVALSHA deciding a turn's checks). Returns how many were refused (drained clients and tiers)."""
    refused = 0
    sync = SyncRedisBucket.from_url(url, timeout_s=5.0)
    try:
        for i in range(CLIENTS):
            tier = TIERS[i % 2]
            allowed, _ = sync.check(bucket_keys(tier, i), [CLIENT, TIER], 1.5)
            refused += not allowed
        many = [CheckRequest(bucket_keys(TIERS[i % 2], i % 40), [CLIENT, TIER], 1.0) for i in range(300)]
        refused += sum(not allowed for allowed, _ in sync.check_many(many))
    finally:
        sync.close()

    async def pipelined() -> int:
        bucket = RedisBucket.from_url(url, timeout_s=5.0)
        try:
            answers = await asyncio.gather(
                *(bucket.check(bucket_keys(TIERS[i % 2], i % CLIENTS), [CLIENT, TIER], 0.5) for i in range(400))
            )
        finally:
            await bucket.aclose()
        return sum(not allowed for allowed, _ in answers)

    return refused + asyncio.run(pipelined())


def test_replica_and_aof_restarted_primary_hold_the_primarys_bucket_state(tmp_path: Path, primary: RedisServer) -> None:
    replica_server = RedisServer(workdir=tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
    replica_server.start()
    source = redis.Redis(port=primary.port)
    replica = redis.Redis(port=replica_server.port)
    try:
        wait_for_link(replica)
        refused = load(primary.url)
        assert refused >= 100  # buckets really ran dry: states of every shape, not only full ones
        assert source.wait(1, 10_000) == 1  # the replica has acknowledged every write
        wait_for_sync(source, replica)
        on_primary, on_replica = snapshot(source), snapshot(replica)
        assert len(on_primary) >= CLIENTS
        same_state(on_primary, on_replica, ttl_slack_ms=1000)

        # effects, not the script: the replica ran plain writes, and the AOF holds no script call
        commands = replica.info("commandstats")
        assert "cmdstat_set" in commands
        assert not {"cmdstat_evalsha", "cmdstat_eval", "cmdstat_evalsha_ro", "cmdstat_fcall"} & set(commands)
        assert source.info("commandstats")["cmdstat_evalsha"]["calls"] >= 3
        aof = b"".join(path.read_bytes() for path in (primary.workdir / "appendonlydir").glob("*.incr.aof"))
        assert b"rp:{alpha}" in aof and b"rp:{beta}" in aof
        assert b"EVALSHA" not in aof.upper() and b"\r\nEVAL\r\n" not in aof.upper()

        # SIGKILL the primary (no shutdown save) and restart it from its AOF on the same port
        killed_at = time.monotonic()
        assert primary.process is not None
        primary.process.send_signal(signal.SIGKILL)
        primary.process.wait(timeout=10)
        primary.start()
        elapsed_ms = int((time.monotonic() - killed_at) * 1000)
        source.close()
        source = redis.Redis(port=primary.port)
        same_state(on_primary, snapshot(source), ttl_slack_ms=elapsed_ms + 1000)

        # the state is live, not a copy: a client drained before the restart is still refused after it
        drained = next(
            key.decode() for key, (state, _) in on_primary.items() if b":c:" in key and int(state.split(b":")[0]) < 1_000_000
        )
        tier = drained.split("{")[1].split("}")[0]
        bucket = SyncRedisBucket.from_url(primary.url, timeout_s=5.0)
        try:
            allowed, decisions = bucket.check([drained, tier_key(tier)], [CLIENT, TIER], 1.0)
        finally:
            bucket.close()
        assert not allowed and decisions[0].remaining < 1

        # and the replica, resynced from the restarted primary, holds that state again
        wait_for_link(replica)
        assert source.wait(1, 10_000) == 1
        wait_for_sync(source, replica)
        same_state(snapshot(source), snapshot(replica), ttl_slack_ms=1000)
    finally:
        source.close()
        replica.close()
        replica_server.stop()
