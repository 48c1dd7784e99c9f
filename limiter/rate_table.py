"""The rate table: the one channel from the controller to every limiter replica.

Key schema (documented in the README, relied on by the controller):

    ratepilot:rates            HASH   field = tier name, value = JSON RateEntry
    ratepilot:rates:version    STRING a counter the writer INCRs with every write

A RateEntry is JSON: {"rate": tokens/s, "burst": tokens, "version": int, "source": str,
"written_at": unix s, "expires_at": unix s}. Times come from the Redis server clock (TIME), so
writer and readers agree whatever their own clocks say. A limiter ignores an entry whose
`expires_at` has passed (and falls back to its static config) and any entry that does not parse
or holds a rate that is zero, negative, not finite or absurd.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from limiter.bucket import MAX_RATE

RATES_KEY = "ratepilot:rates"
VERSION_KEY = "ratepilot:rates:version"
SOURCES = ("controller", "override", "static", "fallback")


class RateEntryError(ValueError):
    """A rate-table entry that must be ignored (unparseable, out of range)."""


@dataclass(frozen=True, slots=True)
class RateEntry:
    """One tier's refill rate as the controller wrote it."""

    rate: float
    burst: float
    version: int
    source: str
    written_at: float
    expires_at: float

    def is_expired(self, now_s: float) -> bool:
        """True once the server clock has passed the entry's expiry."""
        return now_s >= self.expires_at

    def to_json(self) -> str:
        """The JSON stored in the hash."""
        return json.dumps(asdict(self), separators=(",", ":"))


def _finite_positive(name: str, value: object, upper: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RateEntryError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number <= 0 or number > upper:
        raise RateEntryError(f"{name} must be finite and in (0, {upper:g}], got {value!r}")
    return number


def parse_entry(raw: str | bytes) -> RateEntry:
    """Parse and validate one stored entry; raises RateEntryError with the reason."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RateEntryError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RateEntryError("not a JSON object")
    try:
        rate = _finite_positive("rate", data["rate"], MAX_RATE)
        burst = _finite_positive("burst", data["burst"], MAX_RATE)  # one second of the largest rate
        expires_at = _finite_positive("expires_at", data["expires_at"], 1e11)
        written_at = _finite_positive("written_at", data.get("written_at", expires_at), 1e11)
        version = data["version"]
        source = data["source"]
    except KeyError as exc:
        raise RateEntryError(f"missing field {exc.args[0]!r}") from None
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise RateEntryError(f"version must be a non-negative integer, got {version!r}")
    if source not in SOURCES:
        raise RateEntryError(f"source must be one of {SOURCES}, got {source!r}")
    return RateEntry(rate, burst, version, source, written_at, expires_at)
