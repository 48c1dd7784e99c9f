"""Local mode: one node's token leases, taken from the Redis buckets in the background and spent in process.

Pure arithmetic (no I/O, no clock): `limiter.lease_sync` runs the sync and `limiter/lua/lease.lua`
is its Redis side. Units as in `limiter.bucket`: tokens in integer micro-tokens (µt).

**The scheme.** A `mode: local` tier keeps its buckets in Redis exactly as strict mode does (same
keys, same state, same script semantics), but a node does not ask Redis per request. Every sync
interval Δ (`local_mode.sync_s`) it sends one script call for all the buckets it uses: per bucket,
it gives back what it holds beyond its need and asks for its need; the script refills the bucket
on the server clock, adds the returned tokens (capped at the capacity), grants what it holds up to
the ask and debits it. Between syncs a request is decided against the node's leases:

| the request's buckets                                  | decision                                   |
|--------------------------------------------------------|--------------------------------------------|
| every lease holds the cost                             | ALLOW: every lease pays, in process        |
| a lease is short and its last grant was short too      | REFUSE in process (Redis had no more)      |
|   (the Redis bucket is drained)                        |                                            |
| a bucket without a lease, or short but not drained     | ASK: decided by Redis in the request's own |
|                                                        | call (strict), the lease grows at the sync |

A node's need for a bucket (its target) is twice the tokens asked of it in the last interval, at
most its capacity: every bucket of a request admitted in process or sent to Redis is asked its
cost, a request refused in process asks only of the drained bucket that refused it (so a client
hammering past its limit does not make its node hoard the tier's tokens). Held tokens beyond the
target are given back. A lease asked nothing in an interval keeps what it holds; after
`FORGET_AFTER_SYNCS` such intervals it is given back whole and forgotten.

**Over-admission bound.** Every token a node spends was debited from the Redis bucket before the
spend (a lease) or by the spend (an ASK), and a bucket never holds more than its capacity, so while
the nodes reach Redis the fleet admits, per bucket of rate r and burst B, over any window of T s:

    admitted(T) <= B + r * T + H0

where H0 is what the nodes held at the window's start (H0 <= N * B for N nodes; 0 for a bucket
nobody leased before, as in a test that starts on a fresh client). That is the strict bound: the
over-admission is 0 whatever the sync interval Δ and the node count N. A node partitioned from
Redis for p s adds at most its fail-open share, (B + r * p) / N (the local guard at 1/N), so with
k such nodes the bound is `B + r*T + H0 + k * (B + r*p) / N`. Δ sets the under-admission instead:
at most r * Δ of refill not yet granted, plus what the nodes hold unspent, at any moment.

**Partitions.** A failed sync grants nothing and returns nothing: the tokens a node had set aside
to give back are dropped (never spent twice), the held ones stay spendable ("serves from what it
holds"), and no lease counts as drained, so a short lease ASKs, which fails fast while Redis is
away and falls back to the local guard at the node's share. On return the node gives back only
tokens it still holds, capped at the capacity: no refund storm, no double spend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

ALLOW, REFUSE, ASK = 0, 1, 2  # decide() outcomes
TARGET_FACTOR = 2  # a node's need: twice what it was asked in the last sync interval
FORGET_AFTER_SYNCS = 10  # a lease unused for this many syncs (1 s at the default 0.1 s) is returned whole and forgotten


class Lease:
    """One bucket's lease on this node."""

    __slots__ = ("held_ut", "asked_ut", "drained", "idle_syncs", "rate", "capacity_ut")

    def __init__(self, rate: float, capacity_ut: int):
        self.held_ut = 0  # tokens held, spendable now
        self.asked_ut = 0  # tokens asked of this bucket this interval (see the module docstring)
        self.drained = False  # the last grant was short: the Redis bucket had no more
        self.idle_syncs = 0
        self.rate = rate  # tokens/s, sent with the sync (the rates in force)
        self.capacity_ut = capacity_ut


class SyncItem(NamedTuple):
    """One bucket of a sync call: give back `return_ut`, ask for `want_ut`."""

    key: str
    rate: float
    capacity_ut: int
    return_ut: int
    want_ut: int


class LeaseTable:
    """A node's leases by bucket key: `decide()` on the request path, `plan()`/`granted()` per sync."""

    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}

    def __len__(self) -> int:
        """Buckets leased."""
        return len(self.leases)

    def decide(self, keys: Sequence[str], buckets: Sequence[Any]) -> tuple[int, list[int]]:
        """ALLOW (every lease paid), REFUSE or ASK for a request on `keys`; `buckets` carry rate,
        capacity_ut and cost_ut per key (limiter.check_encoding.BucketArgs).

        Returns the outcome and the tokens µt each lease holds after it. The first short lease in key
        order decides between REFUSE and ASK. A request's two buckets [client, tier] take a
        straight-line path (the request path's; the same rules as `_decide_any`)."""
        if len(keys) != 2:
            return self._decide_any(keys, buckets)
        client_key, tier_key = keys
        client_bucket, tier_bucket = buckets
        leases = self.leases
        client = leases.get(client_key)
        if client is None:
            client = leases[client_key] = Lease(client_bucket.rate, client_bucket.capacity_ut)
        tier = leases.get(tier_key)
        if tier is None:
            tier = leases[tier_key] = Lease(tier_bucket.rate, tier_bucket.capacity_ut)
        client_cost = client_bucket.cost_ut
        tier_cost = tier_bucket.cost_ut
        if client.held_ut >= client_cost and tier.held_ut >= tier_cost:
            client.held_ut -= client_cost
            client.asked_ut += client_cost
            tier.held_ut -= tier_cost
            tier.asked_ut += tier_cost
            return ALLOW, [client.held_ut, tier.held_ut]
        short, short_cost = (client, client_cost) if client.held_ut < client_cost else (tier, tier_cost)
        if short.drained:
            short.asked_ut += short_cost
            return REFUSE, [client.held_ut, tier.held_ut]
        client.asked_ut += client_cost  # Redis decides: both buckets may pay
        tier.asked_ut += tier_cost
        return ASK, [client.held_ut, tier.held_ut]

    def _decide_any(self, keys: Sequence[str], buckets: Sequence[Any]) -> tuple[int, list[int]]:
        """decide() for any number of buckets."""
        leases = self.leases
        short: Lease | None = None
        held: list[Lease] = []
        for key, bucket in zip(keys, buckets, strict=True):
            lease = leases.get(key)
            if lease is None:
                lease = leases[key] = Lease(bucket.rate, bucket.capacity_ut)
            if short is None and lease.held_ut < bucket.cost_ut:
                short = lease
                short_cost = bucket.cost_ut
            held.append(lease)
        if short is None:
            for lease, bucket in zip(held, buckets, strict=True):
                lease.held_ut -= bucket.cost_ut
                lease.asked_ut += bucket.cost_ut
            return ALLOW, [lease.held_ut for lease in held]
        if short.drained:
            short.asked_ut += short_cost
            return REFUSE, [lease.held_ut for lease in held]
        for lease, bucket in zip(held, buckets, strict=True):
            lease.asked_ut += bucket.cost_ut  # Redis decides: every bucket may pay
        return ASK, [lease.held_ut for lease in held]

    def respec(self, prefix: str, rate: float, capacity_ut: int) -> None:
        """New rates for the leases whose key starts with `prefix` (a tier's rates changed)."""
        for key, lease in self.leases.items():
            if key.startswith(prefix):
                lease.rate, lease.capacity_ut = rate, capacity_ut
                lease.held_ut = min(lease.held_ut, capacity_ut)

    def plan(self) -> list[SyncItem]:
        """What the next sync gives back and asks for, per bucket; starts a new interval.

        Tokens to give back leave the leases now (they are never spent after this)."""
        items = []
        forget = []
        for key, lease in self.leases.items():
            asked, lease.asked_ut = lease.asked_ut, 0
            if asked == 0:  # idle: keep what it holds, until forgotten
                lease.idle_syncs += 1
                if lease.idle_syncs >= FORGET_AFTER_SYNCS:
                    forget.append(key)
                    if lease.held_ut:
                        items.append(SyncItem(key, lease.rate, lease.capacity_ut, lease.held_ut, 0))
                continue
            lease.idle_syncs = 0
            target = min(lease.capacity_ut, TARGET_FACTOR * asked)
            if lease.held_ut > target:
                give_back, lease.held_ut = lease.held_ut - target, target
                items.append(SyncItem(key, lease.rate, lease.capacity_ut, give_back, 0))
            elif lease.held_ut < target:
                items.append(SyncItem(key, lease.rate, lease.capacity_ut, 0, target - lease.held_ut))
        for key in forget:
            del self.leases[key]
        return items

    def granted(self, items: Sequence[SyncItem], grants: Sequence[int]) -> None:
        """The sync's answer: add each grant to its lease; a grant short of its ask marks the bucket drained."""
        for item, grant in zip(items, grants, strict=True):
            lease = self.leases.get(item.key)
            if lease is None:  # forgotten in plan(): it asked for nothing
                continue
            lease.held_ut += grant
            if item.want_ut:
                lease.drained = grant < item.want_ut

    def unreachable(self) -> None:
        """A sync failed: nothing granted, nothing given back; no lease counts as drained any more (a
        short one ASKs, which falls back to the node's share while Redis is away)."""
        for lease in self.leases.values():
            lease.drained = False

    def held_ut(self, key: str) -> int:
        """Tokens µt this node holds for a bucket (0 without a lease)."""
        lease = self.leases.get(key)
        return 0 if lease is None else lease.held_ut
