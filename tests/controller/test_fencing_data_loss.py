"""Fencing across Redis data loss: a redis-server without persistence SIGKILLed and started again between two leaders."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from controller.lease import FENCE_KEY, LEADER_KEY, LeaderLease
from controller.rate_store import FencedError, RateStore
from controller.settings import LeaseSettings
from limiter.rate_table import RATES_KEY, parse_entry
from ratepilot.servers import RedisServer

LEASE = LeaseSettings(lease_s=2.0, renew_deadline_s=1.5, retry_period_s=0.3)


class FrozenClock:
    """Our side's clock, stopped: the old leader keeps believing it leads (as a paused process would)."""

    def __call__(self) -> float:
        return 1000.0


def write(store: RateStore, lease: LeaderLease, rate: float, token: str | None = None) -> int:
    rates = np.array([rate])
    version, _ = store.write(lease.replica_id, lease.token() if token is None else token, ["free"], rates, rates * 2,
                             ["controller"], ["{}"], True)  # fmt: skip
    return version


def lose_everything(server: RedisServer) -> None:
    """SIGKILL the server and start it again on the same port: without persistence every key is gone."""
    assert server.process is not None
    server.process.kill()
    server.process.wait(timeout=10)
    server.start()


@pytest.mark.parametrize("second_id", ["b", "a"], ids=["another-replica", "same-replica-id-restarted"])
def test_tokens_stay_monotonic_and_the_old_token_is_refused_after_redis_loses_its_data(redis_server: RedisServer,
                                                                                      second_id: str) -> None:  # fmt: skip
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    old = LeaderLease(client, "a", LEASE, clock=FrozenClock())
    assert old.try_acquire_or_renew() and old.fence is not None
    first = old.fence
    store = RateStore(client, ttl_s=30.0, decisions_maxlen=100)
    write(store, old, 100.0)

    lose_everything(redis_server)
    client.connection_pool.disconnect()
    assert client.dbsize() == 0 and client.get(FENCE_KEY) is None

    # a new leader (another replica, or a's replacement with the same id, e.g. a restarted pod)
    new = LeaderLease(client, second_id, LEASE)
    assert new.try_acquire_or_renew() and new.fence is not None
    assert new.fence > first, (new.fence, first)
    assert old.is_leader()  # the old one still believes it leads ...
    with pytest.raises(FencedError, match="lease not held by a" if second_id == "b" else f"fencing token {first} is stale"):
        write(store, old, 999.0, token=str(first))  # ... and its late write is refused inside Redis
    write(store, new, 50.0)
    assert parse_entry(client.hget(RATES_KEY, "free")).rate == 50.0
    assert client.get(LEADER_KEY) == second_id.encode()
    client.close()


def test_a_counter_lost_alone_while_the_holder_renews_restarts_above_the_old_tokens(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    lease = LeaderLease(client, "a", LEASE)
    assert lease.try_acquire_or_renew() and lease.fence is not None
    first = lease.fence
    client.delete(FENCE_KEY)  # a partial loss (hand-deleted): the holder's next renew gets a fresh, larger token
    assert lease.try_acquire_or_renew() and lease.fence is not None and lease.fence > first
    client.close()
