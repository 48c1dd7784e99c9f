"""A controller SIGKILLed in the middle of writing 10,000 tiers, and rate keys edited by hand: the next
leader's first tick leaves every key correct.

The leader runs as a real `ratepilot controller` process talking to a real redis-server through a TCP
proxy that forwards only the first megabyte of its rate-writing EVALSHA (about 5 MB for 10,000 tiers);
the process is SIGKILLed while the rest is still unsent, so Redis holds half a command when the
connection dies.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from controller.lease import LEADER_KEY, lua
from controller.policies import LoadedPolicy
from controller.rate_store import DECISIONS_KEY
from controller.runtime import Controller
from controller.settings import ControllerSettings
from limiter.rate_table import RATES_KEY, VERSION_KEY, parse_entry
from policy.registry import make_policy
from ratepilot.servers import RedisServer
from tests.controller.support import CuttingProxy, make_settings, wait_for, write_config

N_TIERS = 10_000
NO_PROMETHEUS = "http://127.0.0.1:9"  # a closed port: every tick holds the rates in force (stale_hold)


def tiers() -> dict[str, dict[str, float]]:
    """10,000 tiers with different static rates, so a key holding another tier's rate would show."""
    return {f"t{i:05d}": {"static_rate": 50 + i % 100, "min_rate": 10, "max_rate": 1000} for i in range(N_TIERS)}


def settings_for(redis_url: str, replica: str) -> ControllerSettings:
    return make_settings(redis_url, NO_PROMETHEUS, tiers=tiers(), replica_id=replica, policy={"name": "static"},
                         prometheus={"url": NO_PROMETHEUS, "timeout_s": 1}, admin={"enabled": False})  # fmt: skip


def controller(redis_url: str, replica: str) -> Controller:
    return Controller(settings_for(redis_url, replica), LoadedPolicy(make_policy("static"), "static"))


def test_killed_mid_write_then_hand_edited_the_next_leaders_first_tick_puts_every_key_right(redis_server: RedisServer,
                                                                                            tmp_path: Path) -> None:  # fmt: skip
    client = redis.Redis.from_url(redis_server.url)
    # a complete table from an earlier leader
    first = controller(redis_server.url, "first")
    assert first.lease.try_acquire_or_renew() and first.loop.tick().result == "written"
    first.stop()  # releases the lease
    before = client.hgetall(RATES_KEY)
    version_before = int(client.get(VERSION_KEY))
    assert len(before) == N_TIERS

    # the next leader, a real process, writes through the cutting proxy and is SIGKILLed mid-write
    sha = hashlib.sha1(lua("write_rates.lua").encode()).hexdigest().encode()
    proxy = CuttingProxy(redis_server.port, marker=sha, keep_bytes=1 << 20)
    config = write_config(tmp_path / "a.yaml", settings_for(proxy.url, "killed"))
    argv = [sys.executable, "-m", "controller.service", "--config", str(config), "--log-level", "WARNING"]
    with (tmp_path / "killed.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: proxy.cut.is_set() or process.poll() is not None, timeout_s=120)
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
        finally:
            process.kill()  # SIGKILL, with the rest of the write unsent
            process.wait(timeout=10)
    assert client.get(LEADER_KEY) == b"killed"  # it held the lease when it died
    wait_for(lambda: client.info("clients")["connected_clients"] <= 1, timeout_s=20)  # its connections are gone
    proxy.close()
    assert proxy.swallowed > 1 << 20, proxy.swallowed  # most of the ~5 MB write never reached Redis
    # nothing of the cut write reached the table: one script, all or nothing
    assert client.hgetall(RATES_KEY) == before and int(client.get(VERSION_KEY)) == version_before
    assert not [f for _, f in client.xrange(DECISIONS_KEY) if f[b"replica"] == b"killed"]

    # an operator edits keys by hand
    valid = json.loads(before[b"t00007"])
    client.hset(RATES_KEY, mapping={
        "t00001": "garbage",
        "t00002": json.dumps({**valid, "rate": 0}),
        "t00003": json.dumps({**valid, "rate": 1e6, "expires_at": valid["expires_at"] + 1e6}),  # above max_rate, never expiring
        "t00004": json.dumps({**valid, "rate": 1e300}),  # beyond any sane rate
        "t00005": json.dumps({**valid, "rate": 777.0, "source": "static", "expires_at": valid["expires_at"] + 1e6}),  # plausible
    })  # fmt: skip
    client.hdel(RATES_KEY, "t00006")

    # the next leader's first tick
    nxt = controller(redis_server.url, "next")
    try:
        wait_for(nxt.lease.try_acquire_or_renew, timeout_s=20)  # once the dead leader's lease ran out
        report = nxt.loop.tick()
    finally:
        nxt.stop()
    assert report.result == "written" and report.version == version_before + 1
    decided = report.tiers
    table = client.hgetall(RATES_KEY)
    assert {k.decode() for k in table} == set(tiers())
    settings = tiers()
    for tier, raw in ((k.decode(), v) for k, v in table.items()):
        entry = parse_entry(raw)
        bounds = settings[tier]
        assert entry.version == report.version and entry.source == "controller", (tier, raw)
        assert entry.rate == decided[tier]["rate"] and bounds["min_rate"] <= entry.rate <= bounds["max_rate"], (tier, raw)
    # the unusable edits fell back to the static rate, the out-of-bounds one was clamped, the plausible one held
    # (the killed leader's table has expired meanwhile: rate_ttl_s is 10 s)
    rate = {tier: parse_entry(table[tier.encode()]).rate for tier in ("t00001", "t00002", "t00003", "t00004", "t00005", "t00006")}
    assert rate == {"t00001": 51, "t00002": 52, "t00003": 1000, "t00004": 54, "t00005": 777.0, "t00006": 56}
    assert decided["t00003"]["rule"] == "tier_bounds"
    client.close()


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("ERROR")
