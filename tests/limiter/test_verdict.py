"""A Redis verdict formats its RateLimit field from the script's integers exactly as from its Decisions."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from limiter.bucket import MICRO, BucketSpec
from limiter.check_encoding import check_template
from limiter.verdict import FIELD_PARTS_LIMIT, Verdict


class _Tier:
    policy_header = b'"client";q=1;w=1, "tier";q=1;w=1'


rates = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)
capacities = st.integers(min_value=1, max_value=10**7)


@settings(max_examples=300, deadline=None)
@given(rates, capacities, rates, capacities, st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.booleans())
def test_ratelimit_field_from_integers_equals_the_one_from_decisions(
    client_rate: float, client_burst: int, tier_rate: float, tier_burst: int, client_fill: float, tier_fill: float, allowed: bool
) -> None:
    """Fast path (integers) and slow path (Decisions) give the same bytes, for any rates and fill levels."""
    specs = [BucketSpec(client_rate, float(client_burst)), BucketSpec(tier_rate, float(tier_burst))]
    _, buckets, _ = check_template(specs, 1.0 if client_burst >= 1 and tier_burst >= 1 else 0.5)
    tokens = [int(client_burst * MICRO * client_fill), int(tier_burst * MICRO * tier_fill)]
    args: list[Any] = [allowed, _Tier, "client", 1.0, "redis", None, None, tokens, buckets]
    verdict = Verdict(*args)
    assert len(verdict.decisions) == 2
    expected = verdict.ratelimit_field_from_decisions()
    assert verdict.ratelimit_field() == expected
    # with the tier's caches of field parts: formatted once, then read back, the same bytes
    parts: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})
    cached = Verdict(*args, parts)
    assert cached.ratelimit_field() == expected
    assert parts[0] and parts[1]
    assert cached.ratelimit_field() == expected


def test_field_part_caches_stay_bounded() -> None:
    """A bucket whose tokens never repeat fills its cache only up to FIELD_PARTS_LIMIT."""
    specs = [BucketSpec(10.0, 10.0), BucketSpec(100.0, 100.0)]
    _, buckets, _ = check_template(specs, 1.0)
    parts: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})
    for tokens_ut in range(FIELD_PARTS_LIMIT + 10):
        verdict = Verdict(True, _Tier, "client", 1.0, "redis", None, None, [tokens_ut, tokens_ut], buckets, parts)
        assert verdict.ratelimit_field() == verdict.ratelimit_field_from_decisions()
    assert 0 < len(parts[0]) <= FIELD_PARTS_LIMIT and 0 < len(parts[1]) <= FIELD_PARTS_LIMIT
