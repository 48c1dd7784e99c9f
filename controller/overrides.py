"""Operator overrides: min/max caps and a pinned rate per tier, kept in Redis and audited.

`ratepilot:overrides` (hash, field = tier, value = JSON `Override`) survives controller restarts;
every change also goes to the `ratepilot:overrides:audit` stream with who, when (server clock) and
why, in the same MULTI transaction. The tick reads the hash fresh; an entry that no longer parses
(hand-edited) is not dropped: the last good version of that tier's override stays in force.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from controller.rate_store import OVERRIDES_KEY
from limiter.bucket import MAX_RATE
from policy.safety import OperatorCaps

log = logging.getLogger("ratepilot.controller.overrides")

AUDIT_KEY = "ratepilot:overrides:audit"
AUDIT_MAXLEN = 10_000
MAX_TTL_S = 366 * 86400

RateField = Field(default=None, gt=0, le=MAX_RATE, allow_inf_nan=False)


class _Caps(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_rate: float | None = RateField
    max_rate: float | None = RateField
    pinned_rate: float | None = RateField

    @model_validator(mode="after")
    def _consistent(self) -> _Caps:
        if self.min_rate is None and self.max_rate is None and self.pinned_rate is None:
            raise ValueError("set at least one of min_rate, max_rate, pinned_rate")
        if self.min_rate is not None and self.max_rate is not None and self.min_rate > self.max_rate:
            raise ValueError(f"min_rate ({self.min_rate:g}) must not exceed max_rate ({self.max_rate:g})")
        if self.pinned_rate is not None:
            if self.min_rate is not None and self.pinned_rate < self.min_rate:
                raise ValueError("pinned_rate must not be below min_rate")
            if self.max_rate is not None and self.pinned_rate > self.max_rate:
                raise ValueError("pinned_rate must not exceed max_rate")
        return self


class OverrideRequest(_Caps):
    """The body of PUT /overrides/{tier}: caps in tokens/s, an optional lifetime, who and why.

    Strict types: a rate is a JSON number (not `true`, not `"5"`), who and reason are strings.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    ttl_s: float | None = Field(default=None, gt=0, le=MAX_TTL_S, allow_inf_nan=False)  # None = until deleted
    who: str = Field(min_length=1, max_length=100)
    reason: str = Field(min_length=1, max_length=500)


class Override(_Caps):
    """An override as stored (server-clock times in unix seconds)."""

    tier: str
    expires_at: float | None = None
    who: str
    reason: str
    updated_at: float

    def active(self, now_s: float) -> bool:
        """False once its expiry has passed."""
        return self.expires_at is None or now_s < self.expires_at


def parse_override(raw: bytes | str) -> Override:
    """Validate a stored override; ValueError with the reason."""
    try:
        return Override.model_validate_json(raw)
    except ValidationError as exc:
        raise ValueError(str(exc.errors()[0]["msg"])) from None


@dataclass
class OverrideCaps:
    """Turns the raw overrides hash into per-tier caps, remembering the last good override of each tier."""

    last_good: dict[str, Override] = field(default_factory=dict)

    def caps(self, raw: Mapping[str, bytes], tiers: Sequence[str], now_s: float) -> tuple[OperatorCaps, dict[str, str]]:
        """Caps for `tiers` (NaN where none or expired) and the problems found (tier -> reason)."""
        n = len(tiers)
        low, high, pinned = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        problems: dict[str, str] = {}
        index = {tier: i for i, tier in enumerate(tiers)}
        for tier in list(self.last_good):
            if tier not in raw:  # deleted through the API (or by hand): gone
                del self.last_good[tier]
        for tier, value in raw.items():
            if tier not in index:
                continue
            try:
                self.last_good[tier] = parse_override(value)
            except ValueError as exc:
                kept = " (keeping the last good one)" if tier in self.last_good else ""
                problems[tier] = f"unparseable override: {exc}{kept}"
        for tier, override in self.last_good.items():
            if tier in index and override.active(now_s):
                i = index[tier]
                low[i] = np.nan if override.min_rate is None else override.min_rate
                high[i] = np.nan if override.max_rate is None else override.max_rate
                pinned[i] = np.nan if override.pinned_rate is None else override.pinned_rate
        return OperatorCaps(low, high, pinned), problems


class OverrideStore:
    """CRUD on the overrides hash with an audit entry per change."""

    def __init__(self, client: redis.Redis):
        self._client = client

    def _now(self) -> float:
        seconds, micros = self._client.time()
        return float(seconds) + micros / 1e6

    def get(self, tier: str) -> Override | None:
        """The stored override of a tier (None when there is none or it no longer parses)."""
        raw = self._client.hget(OVERRIDES_KEY, tier)
        if raw is None:
            return None
        try:
            return parse_override(raw)
        except ValueError:
            return None

    def put(self, tier: str, request: OverrideRequest) -> Override:
        """Store (replace) a tier's override and audit it; returns what was stored."""
        now = self._now()
        override = Override(
            tier=tier,
            min_rate=request.min_rate,
            max_rate=request.max_rate,
            pinned_rate=request.pinned_rate,
            expires_at=None if request.ttl_s is None else now + request.ttl_s,
            who=request.who,
            reason=request.reason,
            updated_at=now,
        )
        body = override.model_dump_json()
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(OVERRIDES_KEY, tier, body)
        pipe.xadd(AUDIT_KEY, self._audit("put", tier, request.who, request.reason, now, body), maxlen=AUDIT_MAXLEN, approximate=True)
        pipe.execute()
        log.info("event=override_put tier=%s who=%r reason=%r override=%s", tier, request.who, request.reason, body)
        return override

    def delete(self, tier: str, who: str, reason: str) -> bool:
        """Remove a tier's override (audited); False, with nothing written, when there was none."""
        now = self._now()

        def remove(pipe: redis.client.Pipeline) -> bool:
            if not pipe.hexists(OVERRIDES_KEY, tier):
                return False
            pipe.multi()
            pipe.hdel(OVERRIDES_KEY, tier)
            pipe.xadd(AUDIT_KEY, self._audit("delete", tier, who, reason, now, ""), maxlen=AUDIT_MAXLEN, approximate=True)
            return True

        removed = bool(self._client.transaction(remove, OVERRIDES_KEY, value_from_callable=True))
        if removed:
            log.info("event=override_delete tier=%s who=%r reason=%r", tier, who, reason)
        return removed

    def audit(self, tier: str | None = None, limit: int = 100) -> list[dict[str, object]]:
        """The latest audit entries, newest first, optionally for one tier."""
        entries = []
        for entry_id, fields in self._client.xrevrange(AUDIT_KEY, count=max(limit * 10, 100)):
            record = {k.decode(): v.decode() for k, v in fields.items()}
            if tier is None or record.get("tier") == tier:
                entries.append({"id": entry_id.decode(), **record})
            if len(entries) >= limit:
                break
        return entries

    @staticmethod
    def _audit(action: str, tier: str, who: str, reason: str, now: float, body: str) -> dict[str, str]:
        return {"action": action, "tier": tier, "who": who, "reason": reason, "at": json.dumps(now), "override": body}
