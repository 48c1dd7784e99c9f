"""Who sends what: a scenario's client and request mixes turned into a per-arrival request plan (seeded)."""

from __future__ import annotations

import numpy as np

from ratepilot.demo.loadgen import Request, RequestPlan
from ratepilot.loadtest.scenario import ClientGroup, RequestKind, Scenario


def _body(kind: RequestKind) -> bytes:
    return b"x" * kind.body_bytes


def request_plan(scenario: Scenario, offsets_s: np.ndarray, seed: int) -> RequestPlan:
    """For each arrival: a request kind and an API key drawn from its phase's mixes by their shares."""
    rng = np.random.default_rng([seed, 1])  # a stream apart from the arrivals' own
    kinds: dict[RequestKind, int] = {}
    groups: dict[ClientGroup, int] = {}  # group -> index of its first key
    keys: list[str] = []
    for clients, requests in scenario.mixes():
        for kind in requests:
            kinds.setdefault(kind.model_copy(update={"share": 1.0}), len(kinds))
        for group in clients:
            plain = group.model_copy(update={"share": 1.0})
            if plain not in groups:
                groups[plain] = len(keys)
                keys.extend(f"{group.prefix}{i:04d}" for i in range(group.count))
    offsets = np.asarray(offsets_s, dtype=np.float64)
    phase = np.searchsorted(np.asarray(scenario.phase_starts()), offsets, side="right") - 1
    phase = np.clip(phase, 0, len(scenario.phases) - 1)
    request_index = np.zeros(offsets.size, dtype=np.int64)
    key_index = np.zeros(offsets.size, dtype=np.int64)
    for p, (clients, requests) in enumerate(scenario.mixes()):
        mine = np.flatnonzero(phase == p)
        if not mine.size:
            continue
        kind_ids = np.array([kinds[k.model_copy(update={"share": 1.0})] for k in requests])
        kind_share = np.array([k.share for k in requests])
        request_index[mine] = kind_ids[rng.choice(len(requests), size=mine.size, p=kind_share / kind_share.sum())]
        firsts = np.array([groups[g.model_copy(update={"share": 1.0})] for g in clients])
        counts = np.array([g.count for g in clients])
        group_share = np.array([g.share for g in clients])
        chosen = rng.choice(len(clients), size=mine.size, p=group_share / group_share.sum())
        key_index[mine] = firsts[chosen] + rng.integers(0, counts[chosen])
    requests_out = tuple(Request(k.method, k.path, _body(k)) for k in sorted(kinds, key=kinds.__getitem__))
    return RequestPlan(requests_out, tuple(keys), request_index, key_index)
