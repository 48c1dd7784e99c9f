"""Rate writer, lease and overrides against a real redis-server: what limiters read back, and fencing."""

from __future__ import annotations

import json
from unittest.mock import ANY

import numpy as np
import pytest
import redis

from controller.lease import FENCE_KEY, LEADER_KEY, LeaderLease
from controller.overrides import AUDIT_KEY, OverrideCaps, OverrideRequest, OverrideStore
from controller.rate_store import DECISIONS_KEY, OVERRIDES_KEY, FencedError, RateStore, rates_in_force
from controller.settings import LeaseSettings
from limiter.rate_table import RATES_KEY, VERSION_KEY, parse_entry

LEASE = LeaseSettings(lease_s=2.0, renew_deadline_s=1.5, retry_period_s=0.3)


class FakeClock:
    """A clock the test advances (only our side's clock; Redis keeps its own)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(store: RateStore, lease: LeaderLease, tiers: list[str], rates: list[float], shadow: bool = False) -> int:
    r = np.array(rates)
    version, _ = store.write(
        lease.replica_id, lease.token(), tiers, r, r * 2, ["controller"] * len(tiers), ['{"k":1}'] * len(tiers), not shadow
    )
    return version


def test_written_rates_parse_as_limiter_entries_with_server_clock_expiry(redis_client: redis.Redis) -> None:
    lease = LeaderLease(redis_client, "a", LEASE)
    assert lease.try_acquire_or_renew()
    store = RateStore(redis_client, ttl_s=30.0, decisions_maxlen=100)
    version = write(store, lease, ["free", "pro"], [12.5, 400.0])
    seconds, micros = redis_client.time()
    now = seconds + micros / 1e6
    entries = {k.decode(): parse_entry(v) for k, v in redis_client.hgetall(RATES_KEY).items()}
    assert entries["free"].rate == 12.5 and entries["free"].burst == 25.0 and entries["pro"].rate == 400.0
    assert {e.version for e in entries.values()} == {version} and int(redis_client.get(VERSION_KEY)) == version
    assert all(e.source == "controller" for e in entries.values())
    assert all(abs(e.expires_at - e.written_at - 30.0) < 1e-3 and abs(e.written_at - now) < 2 for e in entries.values())
    assert redis_client.xlen(DECISIONS_KEY) == 2


def test_many_tiers_in_one_script_and_shadow_writes_only_decisions(redis_client: redis.Redis) -> None:
    lease = LeaderLease(redis_client, "a", LEASE)
    lease.try_acquire_or_renew()
    store = RateStore(redis_client, ttl_s=30.0, decisions_maxlen=5000)
    tiers = [f"t{i}" for i in range(1234)]
    write(store, lease, tiers, list(np.linspace(1, 1000, 1234)))
    assert redis_client.hlen(RATES_KEY) == 1234
    assert parse_entry(redis_client.hget(RATES_KEY, "t1233")).rate == 1000.0
    before = redis_client.hgetall(RATES_KEY)
    assert write(store, lease, tiers, [1.0] * 1234, shadow=True) == 0
    assert redis_client.hgetall(RATES_KEY) == before
    assert redis_client.xlen(DECISIONS_KEY) >= 2 * 1234 - 200  # MAXLEN ~ trims in whole nodes


def test_the_store_knows_the_exact_bytes_lua_stored_and_the_next_reading_uses_them(redis_client: redis.Redis) -> None:
    lease = LeaderLease(redis_client, "a", LeaseSettings(enabled=False))
    store = RateStore(redis_client, ttl_s=7.25, decisions_maxlen=100)
    tiers = ["a", "b", "c", "d", "e", "f"]
    rates = np.array([1e-05, 1e16, 0.1 + 0.2, 123456789.125, 5e-324, 1e22])  # repr/Lua number edge cases
    store.write(lease.replica_id, "", tiers, rates, rates * 3, ["controller", "override", "static", "fallback", "controller",
                "controller"], ["{}"] * 6, True)  # fmt: skip
    written = store.last_written
    assert written is not None and written.entries == [redis_client.hget(RATES_KEY, t) for t in tiers]
    world = store.read_world()
    known, parsed = rates_in_force(world, tiers, np.ones(6), written), rates_in_force(world, tiers, np.ones(6))
    assert known.rates.tolist() == parsed.rates.tolist() and known.versions == parsed.versions
    assert known.problems == parsed.problems and list(known.problems) == ["b", "d", "f"]  # beyond MAX_RATE
    assert store.write(lease.replica_id, "", tiers, rates, rates, ["controller"] * 6, ["{}"] * 6, False) == (0, ANY)
    assert store.last_written is written  # a shadow write stores no rates


def test_stale_fencing_token_is_refused_inside_redis(redis_client: redis.Redis) -> None:
    clock = FakeClock()
    old = LeaderLease(redis_client, "old", LEASE, clock=clock)
    assert old.try_acquire_or_renew() and old.fence is not None
    first = old.fence
    store = RateStore(redis_client, ttl_s=30.0, decisions_maxlen=100)
    write(store, old, ["free"], [100.0])
    redis_client.delete(LEADER_KEY)  # the lease ran out while "old" was paused
    new = LeaderLease(redis_client, "new", LEASE)
    assert new.try_acquire_or_renew() and new.fence == first + 1
    write(store, new, ["free"], [50.0])
    # "old" still believes it leads (its own clock did not move) and writes late: refused
    assert old.is_leader()
    with pytest.raises(FencedError, match="lease not held by old"):
        write(store, old, ["free"], [999.0])
    # even if it had the holder id right, a stale token is refused
    redis_client.set(LEADER_KEY, "old", px=2000)
    with pytest.raises(FencedError, match=f"fencing token {first} is stale"):
        write(store, old, ["free"], [999.0])
    assert parse_entry(redis_client.hget(RATES_KEY, "free")).rate == 50.0
    assert [f[b"replica"] for _, f in redis_client.xrange(DECISIONS_KEY)] == [b"old", b"new"]


def test_lease_renews_steps_down_after_deadline_and_follower_takes_over(redis_client: redis.Redis) -> None:
    clock = FakeClock()
    a = LeaderLease(redis_client, "a", LEASE, clock=clock)
    b = LeaderLease(redis_client, "b", LEASE)
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    first = a.fence
    assert a.try_acquire_or_renew() and a.fence == first  # renewing keeps the token
    assert 0 < redis_client.pttl(LEADER_KEY) <= 2000
    clock.now += 1.6  # past the renew deadline without a successful renew
    assert not a.is_leader()
    redis_client.delete(LEADER_KEY)  # the key expired
    assert b.try_acquire_or_renew() and b.fence == first + 1  # type: ignore[operator]
    assert not a.try_acquire_or_renew() and a.fence is None
    b.release()
    assert redis_client.get(LEADER_KEY) is None and not b.is_leader()
    assert a.try_acquire_or_renew() and int(redis_client.get(FENCE_KEY)) == first + 2  # type: ignore[operator]


def test_lease_survives_nothing_when_redis_is_gone(redis_server) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_server.url, socket_timeout=0.5)
    clock = FakeClock()
    lease = LeaderLease(client, "a", LEASE, clock=clock)
    assert lease.try_acquire_or_renew()
    redis_server.stop()
    assert lease.try_acquire_or_renew()  # within the renew deadline we still lead
    clock.now += 2.0
    assert not lease.try_acquire_or_renew()  # then we stop believing it


def test_rates_in_force_follow_the_limiter_rules(redis_client: redis.Redis) -> None:
    lease = LeaderLease(redis_client, "a", LeaseSettings(enabled=False))
    store = RateStore(redis_client, ttl_s=30.0, decisions_maxlen=100)
    write(store, lease, ["free", "pro"], [10.0, 20.0])
    redis_client.hset(RATES_KEY, "pro", "garbage")
    redis_client.hset(RATES_KEY, "internal", json.dumps({"rate": 5, "burst": 5, "version": 1, "source": "controller",
                                                         "written_at": 1.0, "expires_at": 2.0}))  # fmt: skip
    world = store.read_world()
    in_force = rates_in_force(world, ["free", "pro", "internal", "new"], np.array([1.0, 2.0, 3.0, 4.0]))
    assert in_force.rates.tolist() == [10.0, 2.0, 3.0, 4.0]
    assert set(in_force.problems) == {"pro", "internal"} and "expired" in in_force.problems["internal"]


def test_override_put_delete_audited_and_caps(redis_client: redis.Redis) -> None:
    store = OverrideStore(redis_client)
    stored = store.put("free", OverrideRequest(min_rate=5, max_rate=50, who="alice", reason="incident 42", ttl_s=60))
    assert stored.expires_at is not None and abs(stored.expires_at - stored.updated_at - 60) < 1e-6
    store.put("pro", OverrideRequest(pinned_rate=77, who="bob", reason="load test"))
    cache = OverrideCaps()
    caps, problems = cache.caps(store_raw(redis_client), ["free", "pro", "internal"], stored.updated_at + 1)
    assert problems == {}
    assert caps.min_rate[0] == 5 and caps.max_rate[0] == 50 and np.isnan(caps.pinned[0])
    assert caps.pinned[1] == 77 and np.isnan(caps.min_rate[2])
    expired, _ = cache.caps(store_raw(redis_client), ["free"], stored.updated_at + 61)
    assert np.isnan(expired.min_rate[0])
    # a hand-edited garbage entry keeps the last good override
    redis_client.hset(OVERRIDES_KEY, "pro", "{broken")
    caps, problems = cache.caps(store_raw(redis_client), ["free", "pro"], stored.updated_at + 1)
    assert caps.pinned[1] == 77 and "keeping the last good one" in problems["pro"]
    assert store.delete("free", "alice", "incident over")
    assert not store.delete("free", "alice", "again")
    audit = store.audit("free")
    assert [(e["action"], e["who"], e["reason"]) for e in audit] == [("delete", "alice", "incident over"), ("put", "alice", "incident 42")]
    assert redis_client.xlen(AUDIT_KEY) == 3


def store_raw(client: redis.Redis) -> dict[str, bytes]:
    return {k.decode(): v for k, v in client.hgetall(OVERRIDES_KEY).items()}


@pytest.mark.parametrize(
    "body",
    [
        {"min_rate": 50, "max_rate": 5, "who": "a", "reason": "r"},
        {"pinned_rate": 500, "max_rate": 50, "who": "a", "reason": "r"},
        {"who": "a", "reason": "r"},
        {"min_rate": 0, "who": "a", "reason": "r"},
        {"min_rate": float("nan"), "who": "a", "reason": "r"},
        {"min_rate": 5, "who": "", "reason": "r"},
    ],
)
def test_override_requests_that_contradict_themselves_are_invalid(body: dict) -> None:
    with pytest.raises(ValueError):
        OverrideRequest.model_validate(body)
