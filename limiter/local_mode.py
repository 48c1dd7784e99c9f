"""The guard's part for many edge nodes: the fail-open share, and `mode: local` decisions from leases.

`NodeShare` keeps what the guard needs to know about the fleet (the live-node count from
`limiter.membership`) and this node's token leases (`limiter.leases`, synced by
`limiter.lease_sync`); `Guard` calls it from three places: its start (a local tier's request),
its rate and config changes (the leases follow the rates in force), and the lease sync's answer.
The scheme, its bound and what a partition does: `limiter/leases.py` and docs/limiter.md.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from limiter.bucket import MICRO
from limiter.config import LimiterConfig
from limiter.leases import ALLOW, ASK, LeaseTable, SyncItem
from limiter.membership import share_of
from limiter.metrics import ALLOWED, ALLOWED_LEASE, LatencyHistogram
from limiter.verdict import Verdict, refused

if TYPE_CHECKING:
    from limiter.guard import TierRuntime

_new_tuple = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (hot path)


def local_fraction(config: LimiterConfig, live_nodes: int) -> float:
    """The fail-open local guard's share of every rate: `local_guard.fraction` when set, else 1 / live edge nodes."""
    fixed = config.local_guard.fraction
    return share_of(live_nodes) if fixed is None else fixed


class NodeShare:
    """This node's place in the fleet: the live-node count and its token leases."""

    def __init__(self, latency: LatencyHistogram, clock: Callable[[], float]):
        self.leases = LeaseTable()
        self.live_nodes = 1  # edge nodes with a live heartbeat (a node that never reached Redis: alone)
        self._latency = latency
        self._clock = clock

    def decide(self, context: tuple[Any, ...], started: float) -> Verdict | None:
        """A local tier's request decided from this node's leases, or None when Redis must decide (ASK).

        `context` is the prepared check's (tier, client, keys, cost, buckets, field parts). The RateLimit
        field's `r` then says what this node holds; metrics count source "lease"."""
        tier, client, keys, cost, buckets, parts = context
        outcome, tokens = self.leases.decide(keys, buckets)
        if outcome == ASK:
            return None
        if outcome == ALLOW:
            counters = tier.counters
            counters.decisions[ALLOWED_LEASE] += 1
            counters.tokens[ALLOWED] += cost
            verdict: Verdict = _new_tuple(
                Verdict, (True, tier, client, cost, "lease", None, None, tokens, buckets, tier.policy_header, parts)
            )
        else:
            verdict = refused(tier, client, cost, "lease", tokens, buckets, parts)
        elapsed = self._clock() - started
        latency = self._latency  # LatencyHistogram.observe, inlined (hot path)
        latency.counts[bisect_left(latency.bounds, elapsed)] += 1
        latency.total += elapsed
        return verdict

    def respec(self, tier: TierRuntime) -> None:
        """A local tier's leases sync with its rates in force (the controller's reach them on the same poll)."""
        if tier.local:
            client_spec, tier_spec = tier.specs
            self.leases.respec(tier.client_prefix, client_spec.rate, client_spec.capacity_ut)
            self.leases.respec(tier.tier_key, tier_spec.rate, tier_spec.capacity_ut)

    def synced(self, tiers: Iterable[TierRuntime], items: Sequence[SyncItem], tokens_left: Sequence[int]) -> None:
        """After a lease sync: a local tier's bucket gauges follow its Redis tier bucket (tokens left µt)."""
        local = {tier.tier_key: tier for tier in tiers if tier.local}
        now = self._clock()
        for item, tokens_ut in zip(items, tokens_left, strict=True):
            tier = local.get(item.key)
            if tier is not None:
                tier.last_remaining, tier.last_time = tokens_ut / MICRO, now
