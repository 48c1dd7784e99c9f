"""A slow but alive Redis: every reply comes later than the check timeout while Redis itself is healthy
(a `DelayProxy` in front of a real redis-server). Checks fail fast to the tier's failure policy, the edge
does not flap between Redis and its local guard, and a timed-out check is never sent again."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from limiter.redis_bucket import RedisBucket
from ratepilot.servers import RedisServer
from tests.limiter.delay_proxy import DelayProxy
from tests.limiter.support import CONFIG_HEAD, SLOW, RunningEdge

EdgeFactory = Callable[..., RunningEdge]

TIMEOUT_S = 0.1  # the check timeout of SLOW_CONFIG
REPLY_DELAY_S = 1.0  # every Redis reply, 10x the check timeout; a request that waited for one takes >= 1 s
SLOW_PHASE_S = 3.0
CAP_S, JITTER = 2.0, 0.1  # limiter.backoff.Backoff defaults: the longest probe interval is CAP_S * (1 + JITTER)
# The rate table is read once at start-up only, so every connection the proxy accepts later is a probe of
# the request path. `open` never runs dry in this test (burst 1000); `closed` refuses without Redis.
SLOW_CONFIG = CONFIG_HEAD.replace("timeout_ms: 1000", f"timeout_ms: {TIMEOUT_S * 1000:g}") + f"""default_tier: open
tiers:
  open:
    client:    {{rate: {SLOW}, burst: 1000}}
    aggregate: {{rate: {SLOW}, burst: 100000}}
  closed:
    client:    {{rate: {SLOW}, burst: 1000}}
    aggregate: {{rate: {SLOW}, burst: 100000}}
    failure_policy: fail_closed
    key_prefixes: [closed_]
rate_table:
  poll_s: 3600
"""


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[DelayProxy]:
    """A DelayProxy in front of the test's own redis-server (no delay until the test sets one)."""
    with DelayProxy(redis_server.port) as running:
        yield running


def fast_checks(edge: RunningEdge) -> tuple[float, float]:
    """(checks decided within 50 ms, all checks) from `ratepilot_check_seconds`."""
    text = edge.get("/metrics").text
    fast = re.search(r'^ratepilot_check_seconds_bucket\{le="0\.05"\} (\S+)$', text, re.M)
    total = re.search(r"^ratepilot_check_seconds_count (\S+)$", text, re.M)
    assert fast is not None and total is not None
    return float(fast[1]), float(total[1])


def test_slow_redis_fails_fast_without_flapping_or_replay(
    edge_factory: EdgeFactory, redis_server: RedisServer, proxy: DelayProxy, commandstats: Callable[[redis.Redis, str], int]
) -> None:
    edge = edge_factory(proxy.url, SLOW_CONFIG)
    bucket = edge.edge.guard.redis_bucket
    assert isinstance(bucket, RedisBucket)
    admin = redis.Redis(port=redis_server.port)  # straight to Redis, past the proxy
    assert edge.get("/rating", key="open_warm").json()["source"] == "redis"
    assert edge.get("/v1/items", key="closed_warm").status_code == 200
    admin.config_resetstat()
    connections, trips = proxy.connections, bucket.round_trips
    fast_before, checks_before = fast_checks(edge)

    proxy.reply_delay_s = REPLY_DELAY_S
    open_answers: list[tuple[float, str]] = []  # (seconds the request took, decision source)
    closed_answers: list[tuple[float, int, str]] = []
    with httpx.Client(base_url=edge.url, timeout=10.0) as client:
        started = time.monotonic()
        while time.monotonic() - started < SLOW_PHASE_S:
            sent = time.monotonic()
            rating = client.get("/rating", headers={"x-api-key": "open_a"})
            open_answers.append((time.monotonic() - sent, rating.json()["source"]))
            sent = time.monotonic()
            refused = client.get("/v1/items", headers={"x-api-key": "closed_a"})
            closed_answers.append((time.monotonic() - sent, refused.status_code, refused.json().get("limited_by", "")))
            time.sleep(0.01)
    probes = proxy.connections - connections
    slow_trips = bucket.round_trips - trips
    fast_after, checks_after = fast_checks(edge)

    # the failure policy decided every request: fail_open on the local guard, fail_closed refused
    assert len(open_answers) >= 20
    assert {source for _, source in open_answers} == {"local"}  # never Redis: no flapping back and forth
    assert {(status, limited_by) for _, status, limited_by in closed_answers} == {(429, "redis_unavailable")}
    # fast: no request waited for a reply (>= 1 s); only the checks that went to Redis waited, each for the
    # check timeout, the others were decided at once while the bucket backed off
    assert max(seconds for seconds, *_ in open_answers + closed_answers) < REPLY_DELAY_S  # type: ignore[operator]
    checks = checks_after - checks_before
    assert checks == len(open_answers) + len(closed_answers)
    waited = checks - (fast_after - fast_before)
    assert waited == slow_trips
    # probes follow the back-off (0.05 s doubling; each attempt also waits for its timeout): a handful in 3 s
    assert 3 <= probes <= 7, probes
    assert slow_trips == probes + 1  # the probes, plus the one batch that went out on the old connection

    # no replay, counted by Redis itself: that one batch ran once and was never sent again, each probe
    # loaded the script once (each a fresh connection whose late answer is never read)
    assert commandstats(admin, "evalsha") == 1
    assert commandstats(admin, "script|load") == probes
    # ... and it consumed its token exactly once: the client's bucket holds burst - 1 tokens
    state = admin.get("rp:{open}:c:open_a")
    assert state is not None and int(state.split(b":")[0]) == 999_000_000

    # healed: Redis decides again at the next probe, at most one probe interval later, and stays
    proxy.reply_delay_s = 0.0
    healed = time.monotonic()
    first_redis = None
    sources = []
    while time.monotonic() - healed < CAP_S * (1 + JITTER) + 3.0 and len(sources) < 30:
        source = edge.get("/rating", key="open_b").json()["source"]
        if source == "redis" and first_redis is None:
            first_redis = time.monotonic() - healed
        if first_redis is not None:
            sources.append(source)
        time.sleep(0.01)
    assert first_redis is not None and first_redis <= CAP_S * (1 + JITTER) + 0.5, first_redis
    assert sources == ["redis"] * len(sources) and len(sources) == 30
    admin.close()
