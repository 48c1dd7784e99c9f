"""`Verdict`: the decision for one request, and the RateLimit header field it answers with.

The guard (`limiter/guard.py`) builds one per request; the middleware (`limiter/middleware.py`)
reads `allowed`, `policy_header` and `ratelimit_field()` to pass the request on or answer 429.
"""

from __future__ import annotations

from math import ceil
from typing import TYPE_CHECKING, Any, NamedTuple

from limiter.bucket import MICRO, Decision
from limiter.check_encoding import decisions_from_tokens

if TYPE_CHECKING:
    from limiter.guard import TierRuntime

__all__ = ["FIELD_PARTS_LIMIT", "RATELIMIT_FORMAT", "FieldParts", "Verdict", "describe"]

# Per bucket of a tier, tokens µt left -> that bucket's part of the RateLimit field. The part depends
# only on the tokens and the bucket's rate and capacity, and a bucket under its limit is mostly full
# (the same tokens after every request), so formatting is mostly skipped (hot path).
FieldParts = tuple[dict[int, bytes], dict[int, bytes]]
FIELD_PARTS_LIMIT = 4096  # remembered token counts per bucket


class _VerdictFields(NamedTuple):
    allowed: bool
    tier: TierRuntime
    client: str
    cost: float
    source: str  # "redis", "local" or "fail_closed"
    given_decisions: list[Decision] | None  # None for a Redis decision (built from `tokens` when asked)
    limited_by: str | None  # None, "client", "tier", "redis_unavailable" or "cost"
    tokens: list[int] | None  # a Redis decision: µt per bucket after it
    buckets: list[Any] | None  # a Redis decision: the buckets' encoded arguments
    policy_header: bytes  # the tier's RateLimit-Policy field
    field_parts: FieldParts | None  # caches of the RateLimit field for those buckets


class Verdict(_VerdictFields):
    """The decision for one request and what the response should say about it.

    The request path builds one per request with `tuple.__new__` (cheaper than a constructor). A
    Redis decision keeps the script's integer answer and builds the `Decision`s only when asked
    (most responses need just the RateLimit field, formatted from the integers).
    """

    __slots__ = ()

    def __new__(
        cls,
        allowed: bool,
        tier: TierRuntime,
        client: str,
        cost: float,
        source: str,
        decisions: list[Decision] | None,
        limited_by: str | None,
        tokens: list[int] | None = None,
        buckets: list[Any] | None = None,
        field_parts: FieldParts | None = None,
    ) -> Verdict:
        """decisions: [client bucket, tier bucket], or None for a Redis decision given as `tokens`
        (µt per bucket after the decision) and `buckets` (their encoded arguments); `field_parts` are
        the caches of the RateLimit field for those buckets (made with them, so never stale)."""
        return tuple.__new__(
            cls, (allowed, tier, client, cost, source, decisions, limited_by, tokens, buckets, tier.policy_header, field_parts)
        )  # type: ignore[no-any-return]

    @property
    def decisions(self) -> list[Decision]:
        """[client bucket, tier bucket] decisions."""
        decisions = self.given_decisions
        if decisions is None:
            return decisions_from_tokens(self.allowed, self.tokens, self.buckets)  # type: ignore[arg-type]
        return decisions

    @property
    def retry_after_s(self) -> float:
        """Seconds until the request could pass (0 when allowed)."""
        return max(d.retry_after_s for d in self.decisions)

    @property
    def remaining(self) -> float:
        """Tokens the caller may still spend now: the smaller of its client and tier buckets."""
        return min(d.remaining for d in self.decisions)

    def ratelimit_field(self) -> bytes:
        """The IETF `RateLimit` field: whole tokens left and whole seconds until full, per bucket."""
        tokens = self.tokens
        if tokens is None:
            return self.ratelimit_field_from_decisions()
        client_ut, tier_ut = tokens
        parts = self.field_parts
        if parts is None:
            client_b, tier_b = self.buckets  # type: ignore[misc]
            return _field_part(CLIENT_PART, client_ut, client_b) + _field_part(TIER_PART, tier_ut, tier_b)
        client_parts, tier_parts = parts
        client = client_parts.get(client_ut)
        if client is None:
            client = _remember_part(client_parts, CLIENT_PART, client_ut, self.buckets[0])  # type: ignore[index]
        tier = tier_parts.get(tier_ut)
        if tier is None:
            tier = _remember_part(tier_parts, TIER_PART, tier_ut, self.buckets[1])  # type: ignore[index]
        return client + tier

    def ratelimit_field_from_decisions(self) -> bytes:
        """The same field computed from the Decisions (the reference the integer path is tested against)."""
        client_d, tier_d = self.decisions
        # %d truncates toward zero as int() does
        return RATELIMIT_FORMAT % (client_d.remaining, ceil(client_d.reset_after_s), tier_d.remaining, ceil(tier_d.reset_after_s))


RATELIMIT_FORMAT = b'"client";r=%d;t=%d, "tier";r=%d;t=%d'
CLIENT_PART, TIER_PART = b'"client";r=%d;t=%d', b', "tier";r=%d;t=%d'  # the halves of RATELIMIT_FORMAT


def _field_part(part: bytes, tokens_ut: int, bucket: Any) -> bytes:
    """One bucket's part of the RateLimit field from the script's integers: whole tokens, and
    ceil(Decision.reset_after_s) = whole seconds up of limiter.bucket.wait_us."""
    missing_ut = bucket.capacity_ut - tokens_ut
    return part % (tokens_ut // MICRO, -(-ceil(missing_ut / bucket.rate) // MICRO) if missing_ut > 0 else 0)


def _remember_part(parts: dict[int, bytes], part: bytes, tokens_ut: int, bucket: Any) -> bytes:
    if len(parts) >= FIELD_PARTS_LIMIT:
        parts.clear()
    value = parts[tokens_ut] = _field_part(part, tokens_ut, bucket)
    return value


def describe(verdict: Verdict) -> dict[str, Any]:
    """A JSON-able summary of a verdict (for logs and the /rating endpoint)."""
    client_d, tier_d = verdict.decisions
    return {
        "tier": verdict.tier.name,
        "allowed": verdict.allowed,
        "cost": verdict.cost,
        "source": verdict.source,
        "limited_by": verdict.limited_by,
        "client": {"remaining": client_d.remaining, "limit": client_d.limit, "reset_after_s": client_d.reset_after_s},
        "tier_bucket": {"remaining": tier_d.remaining, "limit": tier_d.limit, "reset_after_s": tier_d.reset_after_s},
        "retry_after_s": verdict.retry_after_s,
    }


def refused(tier: Any, client: str, cost: float, source: str, tokens: list[int], buckets: Any, parts: Any) -> Verdict:
    """A refusal by the buckets' tokens left (from Redis or this node's leases): counted as throttled from
    `source`, limited by whichever bucket makes the client wait longer."""
    tier.counters.count("throttled", source, cost)
    client_d, tier_d = decisions = decisions_from_tokens(False, tokens, buckets)
    limited_by = "client" if client_d.retry_after_s >= tier_d.retry_after_s else "tier"
    return Verdict(False, tier, client, cost, source, decisions, limited_by, tokens, buckets, parts)
