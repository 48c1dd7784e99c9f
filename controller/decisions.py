"""Reading the decisions stream back: the latest decisions, optionally for one tier.

`write_rates.lua` appends one entry per tier per tick to `ratepilot:decisions` (MAXLEN ~), with the
fields tier, version, fence, replica and decision (JSON: observation with its feature vector in
`policy.observation.OBS_FIELDS` order, proposed rate and action,
clamped rate, the rules that fired, mode).
"""

from __future__ import annotations

import json
from typing import Any

import redis

from controller.rate_store import DECISIONS_KEY

SCAN_BATCH = 1000


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
