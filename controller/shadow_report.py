"""Champion against candidate from the decision stream: how often and how far they differ, and in the incidents.

Pure: takes decisions as `DecisionLog.recent` returns them (one per tier per tick) and compares, for
every decision that carries a `candidate`, the rate the candidate would have written with the rate
the champion wrote (both after the same safety engine). `ratio` is candidate / champion; a decision
*differs* when |ln ratio| > `threshold` (0.1 by default: about 10 %).

An *incident* is a decision where the champion's tick had the emergency brake or a stale hold/decay
fire, or the observed p99 over the SLO (`p99_over_slo` of the observation vector > 1): there the
report shows what the candidate would have done instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from policy.observation import OBS_FIELDS

DEFAULT_THRESHOLD = 0.1  # |ln(candidate / champion)| above this counts as a different decision
P99_OVER_SLO = OBS_FIELDS.index("p99_over_slo")
INCIDENT_RULES = {"emergency_brake": "brake", "stale_hold": "stale", "stale_decay": "stale"}
MAX_LISTED = 20  # incidents listed one by one (newest first); all are counted


def _positive(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) and value > 0 else None


def incident_kinds(decision: Mapping[str, Any]) -> list[str]:
    """Why the champion's decision counts as an incident: brake, stale, p99_over_slo (empty: it does not)."""
    kinds = sorted({INCIDENT_RULES[rule] for rule in decision.get("rules", []) if rule in INCIDENT_RULES})
    vector = (decision.get("observation") or {}).get("vector") or []
    p99 = vector[P99_OVER_SLO] if len(vector) > P99_OVER_SLO else None
    if isinstance(p99, int | float) and p99 > 1.0:
        kinds.append("p99_over_slo")
    return kinds


def ratio_stats(ratios: list[float], threshold: float) -> dict[str, Any]:
    """Count, share differing (|ln r| > threshold), mean/min/max ratio and mean |ln r| of candidate/champion ratios."""
    if not ratios:
        return {"decisions": 0, "differ": 0, "differ_share": None, "mean_ratio": None, "min_ratio": None,
                "max_ratio": None, "mean_abs_log_ratio": None}  # fmt: skip
    logs = [abs(math.log(r)) for r in ratios]
    differ = sum(1 for x in logs if x > threshold)
    return {
        "decisions": len(ratios),
        "differ": differ,
        "differ_share": differ / len(ratios),
        "mean_ratio": math.fsum(ratios) / len(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "mean_abs_log_ratio": math.fsum(logs) / len(logs),
    }


def compare(decisions: Iterable[Mapping[str, Any]], threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """The comparison of every decision carrying a candidate: overall, per tier, per model and in incidents."""
    ratios: list[float] = []
    by_tier: dict[str, list[float]] = {}
    by_model: dict[str, list[float]] = {}
    in_incidents: list[float] = []
    kinds_count: dict[str, int] = {}
    listed: list[dict[str, Any]] = []
    ticks: set[float] = set()
    for decision in decisions:
        candidate = decision.get("candidate")
        champion_rate = _positive(decision.get("rate"))
        candidate_rate = _positive(candidate.get("rate")) if isinstance(candidate, Mapping) else None
        if candidate is None or champion_rate is None or candidate_rate is None:
            continue
        ratio = candidate_rate / champion_rate
        ratios.append(ratio)
        by_tier.setdefault(str(decision.get("tier")), []).append(ratio)
        by_model.setdefault(str(candidate.get("model") or candidate.get("policy")), []).append(ratio)
        if isinstance(decision.get("t"), int | float):
            ticks.add(float(decision["t"]))
        kinds = incident_kinds(decision)
        if not kinds:
            continue
        in_incidents.append(ratio)
        for kind in kinds:
            kinds_count[kind] = kinds_count.get(kind, 0) + 1
        if len(listed) < MAX_LISTED:
            listed.append({
                "t": decision.get("t"), "tier": decision.get("tier"), "kinds": kinds,
                "champion": {"rate": champion_rate, "rule": decision.get("rule"), "rules": decision.get("rules")},
                "candidate": {"rate": candidate_rate, "proposed": candidate.get("proposed"), "rule": candidate.get("rule"),
                              "rules": candidate.get("rules")},
                "ratio": ratio,
            })  # fmt: skip
    return {
        "threshold": threshold,
        "ticks": len(ticks),
        "span_s": (max(ticks) - min(ticks)) if ticks else 0.0,
        **ratio_stats(ratios, threshold),
        "tiers": {tier: ratio_stats(values, threshold) for tier, values in sorted(by_tier.items())},
        "models": {model: ratio_stats(values, threshold) for model, values in sorted(by_model.items())},
        "incidents": {**ratio_stats(in_incidents, threshold), "kinds": dict(sorted(kinds_count.items())), "latest": listed},
    }
