"""Reads the controller's tier rates from the rate table every few seconds and resolves the rates in force.

Per tier, with the Redis server clock (TIME, read in the same call as the table):

| entry in `ratepilot:rates`          | rate in force                       | source             |
|-------------------------------------|-------------------------------------|--------------------|
| none                                | static rate and burst from config   | `static`           |
| valid, not expired                  | the entry's rate and burst          | the entry's source |
| expired                             | static                              | `fallback`         |
| garbage (does not parse, 0, NaN...) | static, with a warning log          | `fallback`         |
| Redis unreachable                   | the last rates until they expire    | unchanged          |

The controller steers the tier's aggregate bucket. Each client's rate follows it proportionally,
`client rate = config client rate * min(client_scale_max, tier rate / static tier rate)`, so an
overloaded backend slows every client alike instead of letting one key take the whole tier; with
the default `client_scale_max: 1` a controller can lower but never raise a client above its
configured rate. Bursts never drop below the largest request cost, so every request stays possible.

`ratepilot_rate_table_age_seconds{tier}` is the server-clock age of the newest entry this limiter
has read for the tier that parses, expired or not (an expired one still tells when the controller
last wrote). It keeps growing while the tier falls back to static rates, also across a Redis outage
(server clock estimated from the offset seen at the last read), and is +Inf until one has been read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from limiter.config import LimiterConfig, TierConfig
from limiter.metrics import LimiterMetrics
from limiter.rate_table import RATES_KEY, RateEntryError, parse_entry

log = logging.getLogger("ratepilot.rates")

# TIME and the table from the same server in one call; a cluster routes it by the key, where a
# pipelined TIME would be refused.
READ_SCRIPT = "return {redis.call('TIME'), redis.call('HGETALL', KEYS[1])}"


@dataclass(frozen=True, slots=True)
class TierRates:
    """The rates in force for one tier and where they came from."""

    rate: float  # tier aggregate refill, tokens/s
    burst: float  # tier aggregate capacity, tokens
    client_rate: float  # each client's refill, tokens/s
    client_burst: float  # each client's capacity, tokens
    source: str  # controller, override, static or fallback
    version: int | None = None  # of the rate-table entry in force
    age_s: float | None = None  # server-clock seconds since the entry was written
    expires_at: float | None = None  # server-clock expiry of the entry in force


def static_rates(tier: TierConfig, source: str = "static") -> TierRates:
    """The configured rates of a tier."""
    return TierRates(tier.aggregate.rate, tier.aggregate.burst, tier.client.rate, tier.client.burst, source)


def resolve_tier(name: str, raw: bytes | str | None, now_s: float, config: LimiterConfig) -> tuple[TierRates, str | None]:
    """Rates in force for one tier from its raw table entry; returns (rates, warning or None)."""
    tier = config.tiers[name]
    if raw is None:
        return static_rates(tier), None
    try:
        entry = parse_entry(raw)
    except RateEntryError as exc:
        return static_rates(tier, "fallback"), f"tier {name!r}: ignoring rate-table entry: {exc}"
    if entry.is_expired(now_s):
        return static_rates(tier, "fallback"), None
    min_burst = config.costs.max_cost() / config.local_guard.static_fraction()
    scale = min(config.rate_table.client_scale_max, entry.rate / tier.aggregate.rate)
    rates = TierRates(
        rate=entry.rate,
        burst=max(entry.burst, min_burst),
        client_rate=tier.client.rate * scale,
        client_burst=tier.client.burst,
        source=entry.source,
        version=entry.version,
        age_s=max(0.0, now_s - entry.written_at),
        expires_at=entry.expires_at,
    )
    return rates, None


def resolve_all(
    raw: Mapping[Any, bytes | str], now_s: float, config: LimiterConfig
) -> tuple[dict[str, TierRates], dict[str, str]]:
    """Rates in force for every configured tier, and the warnings per tier; unknown tiers are ignored."""
    by_name = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    rates: dict[str, TierRates] = {}
    warnings: dict[str, str] = {}
    for name in config.tiers:
        rates[name], warning = resolve_tier(name, by_name.get(name), now_s, config)
        if warning:
            warnings[name] = warning
    return rates, warnings


def newest_written(raw: Mapping[Any, bytes | str], tiers: Iterable[str], known: Mapping[str, float]) -> dict[str, float]:
    """Per tier, the server-clock write time of the newest entry that parses (expired or not), in the
    table `raw` or among those read before (`known`); tiers with neither are left out, garbage is not counted."""
    by_name = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    newest: dict[str, float] = {}
    for name in tiers:
        written_at = known.get(name)
        value = by_name.get(name)
        if value is not None:
            with contextlib.suppress(RateEntryError):
                entry_written = parse_entry(value).written_at
                written_at = entry_written if written_at is None else max(written_at, entry_written)
        if written_at is not None:
            newest[name] = written_at
    return newest


def table_age(written_at: float | None, now_s: float | None) -> float | None:
    """Server-clock seconds since `written_at` (never negative); None if either time is unknown."""
    if written_at is None or now_s is None:
        return None
    return max(0.0, now_s - written_at)


class RateReader:
    """Polls `ratepilot:rates` with the server clock and hands the resolved rates to `on_rates`."""

    def __init__(
        self,
        redis_client: object,
        config: Callable[[], LimiterConfig],
        on_rates: Callable[[dict[str, TierRates]], None],
        metrics: LimiterMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._redis = redis_client
        self._config = config
        self._on_rates = on_rates
        self._metrics = metrics
        self._clock = clock
        self._last: dict[str, TierRates] = {}
        self._server_offset: float | None = None  # server clock minus our monotonic clock at the last read
        self._written: dict[str, float] = {}  # tier -> server-clock write time of the newest entry read
        self._warned: dict[str, str] = {}
        self._stop = asyncio.Event()
        self.polls = 0

    async def read_table(self) -> tuple[dict[bytes, bytes], float]:
        """The raw table and the server time of the node holding it, in one round trip (works on a cluster)."""
        (seconds, micros), flat = await self._redis.eval(READ_SCRIPT, 1, RATES_KEY)  # type: ignore[attr-defined]
        return dict(zip(flat[::2], flat[1::2], strict=True)), int(seconds) + int(micros) / 1e6

    async def poll_once(self) -> dict[str, TierRates]:
        """Read the table once, resolve, publish; on a Redis failure keep the last rates until they expire."""
        config = self._config()
        now_s: float | None  # server clock: read, or estimated while Redis is unreachable
        try:
            table, now_s = await self.read_table()
        except Exception as exc:  # any Redis failure: keep going on what we know
            if self._metrics is not None:
                self._metrics.redis_errors.labels("rate_table").inc()
            log.warning("rate table unreadable, keeping the last rates until they expire: %s", exc)
            rates = self._carry_over(config)
            now_s = self._server_now()
        else:
            self._server_offset = now_s - self._clock()
            rates, warnings = resolve_all(table, now_s, config)
            self._written = newest_written(table, config.tiers, self._written)
            for name, warning in warnings.items():
                if self._warned.get(name) != warning:  # once per distinct bad value, not every poll
                    log.warning(warning)
            self._warned = warnings
        self._last = rates
        self.polls += 1
        self._on_rates(rates)
        if self._metrics is not None:
            for name, tier_rates in rates.items():
                age_s = table_age(self._written.get(name), now_s)
                self._metrics.set_rate(name, tier_rates.rate, tier_rates.source, age_s)
        return rates

    def _server_now(self) -> float | None:
        """The server clock estimated on ours from the offset seen at the last read (None before one)."""
        return None if self._server_offset is None else self._clock() + self._server_offset

    def _carry_over(self, config: LimiterConfig) -> dict[str, TierRates]:
        """Last known rates while their expiry (estimated on our clock) has not passed, else static."""
        now_s = self._server_now()
        rates: dict[str, TierRates] = {}
        for name, tier in config.tiers.items():
            last = self._last.get(name)
            alive = last is not None and last.expires_at is not None and now_s is not None and now_s < last.expires_at
            if last is not None and alive:
                rates[name] = last
            else:
                rates[name] = static_rates(tier, "fallback" if last is not None and last.expires_at else "static")
        return rates

    def stop(self) -> None:
        """Make run() return after the poll under way (cancelling alone is not enough: a cancel that
        lands inside redis-py's socket timeout can come out as a TimeoutError on Python 3.11)."""
        self._stop.set()

    async def run(self) -> None:
        """Poll at the configured interval until stop()."""
        while not self._stop.is_set():
            try:
                await self.poll_once()
            except Exception:  # a bug here must not stop the limiter from reading rates
                log.exception("rate reader poll failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._config().rate_table.poll_s)
