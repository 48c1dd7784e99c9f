"""The decisions stream: one decision JSON per tier per tick (`decision_texts`), and reading it back.

`write_rates.lua` appends one entry per tier per tick to `ratepilot:decisions` (MAXLEN ~), with the
fields tier, version, fence, replica and decision (JSON: observation with its feature vector in
`policy.observation.OBS_FIELDS` order, proposed rate and action, clamped rate, the rules that
fired, mode) and, while a candidate runs in shadow (`controller/shadow.py`), `candidate`: its policy,
model, proposed rate, action, clamped rate and rules on the same observation. Non-finite numbers (a
missing metric) are written as null.
"""

from __future__ import annotations

import json
from itertools import repeat
from typing import Any

import numpy as np
import orjson
import redis

from controller.rate_store import DECISIONS_KEY
from controller.shadow import CandidateDecision
from policy.base import rate_to_action
from policy.observation import Observation
from policy.safety import OVERRIDE_RULES, RULES, SafetyResult

SCAN_BATCH = 1000
OBSERVED = ("p99_latency_ms", "error_rate", "cpu", "admitted_rps", "throttled_rps")  # IntervalMetrics fields recorded


def _column(values: object, n: int) -> list[float]:
    return np.broadcast_to(np.asarray(values, dtype=np.float64), (n,)).tolist()  # type: ignore[no-any-return]


def _rules_of(code: int) -> tuple[str, list[str], str]:
    """(deciding rule, fired rules, source) for a fired-rules bit code."""
    fired = [rule for bit, rule in enumerate(RULES) if code >> bit & 1]
    source = "override" if OVERRIDE_RULES & set(fired) else "controller"
    return (fired[-1] if fired else "none"), fired, source


def _clamped(in_force: np.ndarray, safety: SafetyResult, n: int) -> tuple[list[float], list[float], list[float], list[int]]:
    """Per tier: proposed rate, action, clamped rate and the fired rules' bit code of one safety result."""
    with np.errstate(all="ignore"):
        action = rate_to_action(in_force, np.where(np.isfinite(safety.proposed), safety.proposed, in_force))
    # the fired rules of a tier as a bit code: few distinct codes, each spelled out once
    codes = np.stack([safety.fired[r] for r in RULES], axis=1).astype(np.int64) @ (1 << np.arange(len(RULES)))
    return _column(safety.proposed, n), _column(action, n), _column(safety.rates, n), codes.tolist()


def decision_texts(
    observation: Observation, in_force: np.ndarray, safety: SafetyResult, mode: str, policy: str, now_s: float,
    candidate: CandidateDecision | None = None,
) -> list[str]:
    """One decision JSON per tier, in tier order, as the stream stores it; with the candidate's beside when given."""
    n, m = observation.n_tiers, observation.metrics
    observed = zip(*(_column(getattr(m, name), n) for name in OBSERVED), strict=True)
    proposed, action, rate, codes = _clamped(in_force, safety, n)
    shadow = None if candidate is None else _clamped(in_force, candidate.safety, n)
    by_code = {code: _rules_of(code) for code in {*codes, *(shadow[3] if shadow else ())}}
    beside = repeat(None, n) if shadow is None else zip(*shadow, strict=True)
    rows = zip(observed, observation.vector.tolist(), _column(in_force, n), proposed, action, rate, codes, beside, strict=True)
    texts = []
    for (p99_ms, error_rate, cpu, admitted, throttled), vector, rate_in_force, tier_proposed, tier_action, tier_rate, code, \
            shadow_row in rows:  # fmt: skip
        rule, rules, source = by_code[code]
        decision = {
            "t": now_s, "mode": mode, "policy": policy,
            "observation": {"p99_latency_ms": p99_ms, "error_rate": error_rate, "cpu": cpu, "admitted_rps": admitted,
                            "throttled_rps": throttled, "vector": vector},
            "rate_in_force": rate_in_force, "proposed": tier_proposed, "action": tier_action, "rate": tier_rate,
            "rule": rule, "rules": rules, "source": source,
        }  # fmt: skip
        if shadow_row is not None and candidate is not None:
            c_proposed, c_action, c_rate, c_code = shadow_row
            c_rule, c_rules, _ = by_code[c_code]
            decision["candidate"] = {
                "policy": candidate.loaded.name, "model": candidate.loaded.model, "proposed": c_proposed,
                "action": c_action, "rate": c_rate, "rule": c_rule, "rules": c_rules,
            }  # fmt: skip
        texts.append(orjson.dumps(decision).decode())
    return texts


class DecisionLog:
    """Newest-first reads of the decisions stream."""

    def __init__(self, client: redis.Redis, max_scan: int = 100_000):
        self._client = client
        self.max_scan = max_scan  # entries looked at per request at most, so a rare tier cannot stall the API

    def recent(self, tier: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Up to `limit` decisions, newest first; filtered by tier when given."""
        found: list[dict[str, Any]] = []
        upper, scanned = "+", 0
        while len(found) < limit and scanned < self.max_scan:
            batch = self._client.xrevrange(DECISIONS_KEY, max=upper, min="-", count=SCAN_BATCH)
            if not batch:
                break
            for entry_id, fields in batch:
                record = {k.decode(): v.decode() for k, v in fields.items()}
                if tier is None or record.get("tier") == tier:
                    found.append(_decode(entry_id.decode(), record))
                    if len(found) >= limit:
                        break
            scanned += len(batch)
            upper = "(" + batch[-1][0].decode()
        return found


def _decode(entry_id: str, record: dict[str, str]) -> dict[str, Any]:
    try:
        decision = json.loads(record.get("decision", "{}"))
    except ValueError:
        decision = {"unparseable": record.get("decision")}
    return {
        "id": entry_id,
        "tier": record.get("tier"),
        "version": int(record.get("version", "0") or 0),
        "fence": record.get("fence") or None,
        "replica": record.get("replica"),
        **(decision if isinstance(decision, dict) else {"decision": decision}),
    }
