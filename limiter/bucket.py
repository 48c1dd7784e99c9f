"""Token-bucket arithmetic shared by the Redis script, the in-process bucket and the simulator.

Units: time in integer microseconds, tokens in integer micro-tokens (1 token = 1_000_000 µt).
Integers keep the Lua script (doubles, exact below 2**53) and Python bit-for-bit identical:
`token_bucket.lua` performs exactly these operations in this order.

The functions take plain numbers or numpy arrays alike, so the simulator steps thousands of
buckets at once with the same code that decides a single request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

MICRO = 1_000_000  # micro-units per unit (µs per s, µt per token)
# tokens/s: the one rate ceiling. A configured rate above it is an error, a rate-table entry above it
# is garbage rather than a decision, and the safety engine, simulator and baselines never go past it.
# The Lua script takes any double rate (refills are capped at the capacity), so it assumes no ceiling.
MAX_RATE = 1e7
MAX_CAPACITY = 1e9  # tokens


class BucketError(ValueError):
    """A bucket parameter or cost that can never be satisfied or is not a finite positive number."""


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """Refill rate (tokens/s) and burst capacity (tokens) of one bucket."""

    rate: float
    capacity: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and 0 < self.rate <= MAX_RATE):
            raise BucketError(f"rate must be a finite number in (0, {MAX_RATE:g}] tokens/s, got {self.rate!r}")
        if not (math.isfinite(self.capacity) and 0 < self.capacity <= MAX_CAPACITY):
            raise BucketError(f"capacity must be a finite number in (0, {MAX_CAPACITY:g}] tokens, got {self.capacity!r}")
        if to_micro(self.capacity) < 1:
            raise BucketError(f"capacity {self.capacity!r} is below one micro-token")

    @property
    def capacity_ut(self) -> int:
        """Capacity in micro-tokens."""
        return to_micro(self.capacity)


class Decision(NamedTuple):
    """Outcome of one check-and-consume: whether it passed and what the caller should be told.

    A NamedTuple (immutable, compared by value): built once per bucket per request, it costs a
    quarter of a frozen dataclass.
    """

    allowed: bool
    remaining: float  # tokens left after this decision
    retry_after_s: float  # 0 when allowed; else seconds until `cost` tokens are available
    reset_after_s: float  # seconds until the bucket is full again
    limit: float = 0.0  # the bucket capacity, for the RateLimit headers
    source: str = "redis"  # which backend decided: redis, local (fail-open guard), fail_closed


def to_micro(tokens: float) -> int:
    """Tokens to integer micro-tokens (floor, as the Lua script does)."""
    return math.floor(tokens * MICRO)


def validate_cost(cost: float, spec: BucketSpec) -> int:
    """Cost in micro-tokens; raises BucketError when it is not positive or exceeds the capacity."""
    if not (math.isfinite(cost) and cost > 0):
        raise BucketError(f"cost must be a finite positive number of tokens, got {cost!r}")
    cost_ut = to_micro(cost)
    if cost_ut > spec.capacity_ut:
        raise BucketError(
            f"cost {cost:g} exceeds the bucket capacity {spec.capacity:g}: such a request could never pass"
        )
    return max(cost_ut, 1)


def refill(tokens_ut: Any, last_us: Any, now_us: Any, rate: Any, capacity_ut: Any) -> Any:
    """Tokens after refilling from `last_us` to `now_us`; a clock that went back refills nothing."""
    elapsed_us = np.maximum(now_us - last_us, 0) if isinstance(now_us, np.ndarray) else max(now_us - last_us, 0)
    if isinstance(tokens_ut, np.ndarray) or isinstance(elapsed_us, np.ndarray):
        return np.minimum(capacity_ut, tokens_ut + np.floor(elapsed_us * rate))
    return min(capacity_ut, tokens_ut + math.floor(elapsed_us * rate))


def wait_us(missing_ut: Any, rate: Any) -> Any:
    """Microseconds until `missing_ut` micro-tokens have refilled at `rate` tokens/s (0 when none miss)."""
    if isinstance(missing_ut, np.ndarray) or isinstance(rate, np.ndarray):
        return np.ceil(np.maximum(missing_ut, 0) / rate)
    return math.ceil(max(missing_ut, 0) / rate)


def admit_count(tokens_ut: Any, requests: Any, cost_ut: Any) -> Any:
    """How many of `requests` equal-cost requests arriving together a bucket holding `tokens_ut` admits."""
    return np.minimum(requests, np.floor_divide(tokens_ut, cost_ut))


def full_state(spec: BucketSpec, now_us: int) -> tuple[int, int]:
    """State (tokens µt, timestamp µs) of a bucket seen for the first time: full."""
    return spec.capacity_ut, now_us


def check_and_consume(
    states: list[tuple[int, int] | None], specs: list[BucketSpec], costs_ut: list[int], now_us: int
) -> tuple[bool, list[tuple[int, int]], list[tuple[int, int, int]]]:
    """All-or-nothing consume across buckets (a client bucket and its tier bucket, say).

    Returns (allowed, new states, per bucket (tokens µt, retry-after µs, reset-after µs)).
    The request passes only when every bucket holds its cost; then every bucket pays.
    """
    tokens: list[int] = []
    for state, spec in zip(states, specs, strict=True):
        if state is None:
            state = full_state(spec, now_us)
        tokens.append(refill(state[0], state[1], now_us, spec.rate, spec.capacity_ut))
    allowed = all(t >= c for t, c in zip(tokens, costs_ut, strict=True))
    if allowed:
        tokens = [t - c for t, c in zip(tokens, costs_ut, strict=True)]
    new_states = [(t, now_us) for t in tokens]
    results = []
    for t, c, spec in zip(tokens, costs_ut, specs, strict=True):
        retry = 0 if allowed else wait_us(c - t, spec.rate)
        reset = wait_us(spec.capacity_ut - t, spec.rate)
        results.append((t, retry, reset))
    return allowed, new_states, results


def decision_from(allowed: bool, result: tuple[int, int, int], spec: BucketSpec, source: str) -> Decision:
    """A Decision for the caller from one bucket's (tokens µt, retry µs, reset µs)."""
    tokens_ut, retry_us, reset_us = result
    return Decision(
        allowed=allowed,
        remaining=tokens_ut / MICRO,
        retry_after_s=retry_us / MICRO,
        reset_after_s=reset_us / MICRO,
        limit=spec.capacity,
        source=source,
    )
