"""`ratepilot_rate_table_age_seconds`: the age of the newest controller entry a limiter has read for a
tier, growing once the entry expires or goes missing (the tier then runs on static rates), +Inf before
any entry has been read; with it the `age > 30` alert fires when the controller is dead or never wrote."""

from __future__ import annotations

import asyncio
import math
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio
from prometheus_client import CollectorRegistry

from limiter.config import LimiterConfig, parse_config
from limiter.metrics import LimiterMetrics
from limiter.rate_reader import RateReader, newest_written, table_age
from limiter.rate_table import RATES_KEY, RateEntry
from ratepilot.servers import RedisServer, find_binary
from tests.limiter.support import BASE_CONFIG

T0 = 1_800_000_000.0
ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / "alerts.yml"


@pytest.fixture
def config() -> LimiterConfig:
    return parse_config(BASE_CONFIG.replace("REDIS_URL", "redis://127.0.0.1:1/0"), {})


def entry(written_at: float, ttl_s: float = 30, rate: float = 4.0) -> str:
    return RateEntry(rate, 50, 1, "controller", written_at, written_at + ttl_s).to_json()


class FakeRedis:
    """Answers the reader's one EVAL with a table and a server clock the test sets; `down` makes it fail."""

    def __init__(self) -> None:
        self.now = T0
        self.table: dict[bytes, bytes] = {}
        self.down = False

    async def eval(self, script: str, numkeys: int, *keys: str) -> list[object]:
        if self.down:
            raise redis.ConnectionError("connection refused")
        seconds, fraction = divmod(self.now, 1)
        flat = [item for pair in self.table.items() for item in pair]
        return [[int(seconds), round(fraction * 1e6)], flat]


def age(registry: CollectorRegistry, tier: str) -> float | None:
    return registry.get_sample_value("ratepilot_rate_table_age_seconds", {"tier": tier})


def source(registry: CollectorRegistry, tier: str) -> str:
    ones = [
        name
        for name in ("controller", "override", "static", "fallback")
        if registry.get_sample_value("ratepilot_rate_source", {"tier": tier, "source": name}) == 1.0
    ]
    assert len(ones) == 1, ones
    return ones[0]


# --- pure parts -----------------------------------------------------------------------------------


def test_newest_written_counts_expired_entries_keeps_the_known_and_ignores_garbage() -> None:
    tiers = ["free", "pro", "closed"]
    table = {b"free": entry(T0 - 100, ttl_s=30), b"pro": b"not json", b"gold": entry(T0)}
    assert newest_written(table, tiers, {}) == {"free": T0 - 100}  # expired still tells when; garbage, unknown tier: no
    known = {"free": T0 - 50, "pro": T0 - 60, "gone": T0}
    assert newest_written(table, tiers, known) == {"free": T0 - 50, "pro": T0 - 60}  # newest wins; dropped tiers go
    assert newest_written({"free": entry(T0 - 1)}, tiers, known) == {"free": T0 - 1, "pro": T0 - 60}


def test_table_age() -> None:
    assert table_age(T0 - 7.5, T0) == 7.5
    assert table_age(T0 + 1, T0) == 0.0  # never negative
    assert table_age(None, T0) is None
    assert table_age(T0, None) is None


def test_set_rate_exports_inf_when_no_entry_was_read() -> None:
    registry = CollectorRegistry()
    metrics = LimiterMetrics(registry)
    metrics.set_rate("free", 10.0, "static", None)
    assert age(registry, "free") == math.inf
    metrics.set_rate("free", 4.0, "controller", 2.0)
    assert age(registry, "free") == 2.0
    metrics.forget_tier("free")
    assert age(registry, "free") is None


# --- the reader, on a server clock the test moves ---------------------------------------------------


def test_age_grows_after_expiry_deletion_and_during_an_outage(config: LimiterConfig) -> None:
    fake = FakeRedis()
    mono = [100.0]
    registry = CollectorRegistry()
    reader = RateReader(fake, lambda: config, lambda rates: None, LimiterMetrics(registry), clock=lambda: mono[0])

    def poll_at(server_s: float) -> None:
        mono[0] = 100.0 + server_s - T0
        fake.now = server_s
        asyncio.run(reader.poll_once())

    fake.table = {b"free": entry(T0 - 2).encode()}
    poll_at(T0)
    assert (age(registry, "free"), source(registry, "free")) == (2.0, "controller")
    assert (age(registry, "pro"), source(registry, "pro")) == (math.inf, "static")  # never written

    poll_at(T0 + 40)  # the entry expired at T0 + 28 (before the fix the age stayed at 2)
    assert (age(registry, "free"), source(registry, "free")) == (42.0, "fallback")

    del fake.table[b"free"]  # gone from the table
    poll_at(T0 + 50)
    assert (age(registry, "free"), source(registry, "free")) == (52.0, "static")

    fake.table = {b"free": b"garbage"}
    poll_at(T0 + 55)
    assert (age(registry, "free"), source(registry, "free")) == (57.0, "fallback")

    fake.down = True  # server clock estimated from our clock and the last offset
    poll_at(T0 + 60)
    assert age(registry, "free") == pytest.approx(62.0)
    assert age(registry, "pro") == math.inf

    fake.down = False
    fake.table = {b"free": entry(T0 + 69).encode(), b"pro": entry(T0 + 70).encode()}
    poll_at(T0 + 70)  # the controller is back
    assert (age(registry, "free"), source(registry, "free")) == (1.0, "controller")
    assert (age(registry, "pro"), source(registry, "pro")) == (0.0, "controller")


def test_a_limiter_started_after_the_controller_died_reports_the_real_age(config: LimiterConfig) -> None:
    fake = FakeRedis()
    fake.table = {b"free": entry(T0 - 3600).encode()}
    registry = CollectorRegistry()
    asyncio.run(RateReader(fake, lambda: config, lambda rates: None, LimiterMetrics(registry)).poll_once())
    assert (age(registry, "free"), source(registry, "free")) == (3600.0, "fallback")


def test_unreachable_from_the_start_is_inf(config: LimiterConfig) -> None:
    fake = FakeRedis()
    fake.down = True
    registry = CollectorRegistry()
    asyncio.run(RateReader(fake, lambda: config, lambda rates: None, LimiterMetrics(registry)).poll_once())
    assert {age(registry, tier) for tier in config.tiers} == {math.inf}


# --- against a real Redis -----------------------------------------------------------------------------


def test_age_grows_after_expiry_against_real_redis(config: LimiterConfig, redis_server: RedisServer) -> None:
    sync = redis.Redis.from_url(redis_server.url)
    seconds, micros = sync.time()
    now = seconds + micros / 1e6
    sync.hset(RATES_KEY, "free", entry(now, ttl_s=0.3))
    registry = CollectorRegistry()

    async def scenario() -> list[tuple[float | None, str]]:
        client = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        reader = RateReader(client, lambda: config, lambda rates: None, LimiterMetrics(registry))
        seen = []
        await reader.poll_once()
        seen.append((age(registry, "free"), source(registry, "free")))
        await asyncio.sleep(0.5)  # past expiry
        await reader.poll_once()
        seen.append((age(registry, "free"), source(registry, "free")))
        sync.hdel(RATES_KEY, "free")
        await asyncio.sleep(0.2)
        await reader.poll_once()
        seen.append((age(registry, "free"), source(registry, "free")))
        redis_server.stop()
        await asyncio.sleep(0.2)
        await reader.poll_once()
        seen.append((age(registry, "free"), source(registry, "free")))
        await client.aclose()
        return seen

    started = time.monotonic()
    seen = asyncio.run(scenario())
    elapsed = time.monotonic() - started
    ages = [a for a, _ in seen]
    assert [s for _, s in seen] == ["controller", "fallback", "static", "static"]
    assert ages[0] is not None and 0 <= ages[0] < 0.3
    assert ages == sorted(ages) and ages[1] >= 0.5 and ages[2] >= 0.7 and ages[3] >= 0.9  # type: ignore[type-var]
    assert ages[3] is not None and ages[3] < elapsed + 0.5
    assert age(registry, "pro") == math.inf
    sync.close()


# --- the value for "never read" makes the staleness alert fire ----------------------------------------


def test_the_stale_alert_fires_on_the_never_read_value(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    LimiterMetrics(registry).set_rate("free", 10.0, "static", None)
    assert age(registry, "free") == math.inf
    alert = 'ALERTS{alertname="RatepilotRateTableStale", severity="warning", tier="free"'
    case = tmp_path / "never_read_test.yml"
    case.write_text(
        textwrap.dedent(f"""
        rule_files: [{ALERTS}]
        evaluation_interval: 15s
        tests:
          - interval: 15s
            input_series:
              - series: 'ratepilot_rate_table_age_seconds{{tier="free", instance="edge-a"}}'
                values: "{" ".join(["Inf"] * 13)}"
            promql_expr_test:
              - expr: ALERTS{{alertname="RatepilotRateTableStale"}}
                eval_time: 30s
                exp_samples: [{{labels: '{alert}, alertstate="pending"}}', value: 1}}]
              - expr: ALERTS{{alertname="RatepilotRateTableStale"}}
                eval_time: 2m
                exp_samples: [{{labels: '{alert}, alertstate="firing"}}', value: 1}}]
        """)
    )
    result = subprocess.run(
        [find_binary("promtool"), "test", "rules", str(case)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
