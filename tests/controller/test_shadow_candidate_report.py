"""`controller.shadow_report.compare` on hand-written decisions: exact ratios, incidents by kind, what is skipped."""

from __future__ import annotations

import math
from typing import Any

import pytest

from controller.shadow_report import P99_OVER_SLO, compare, incident_kinds
from policy.observation import OBS_DIM


def decision(tier: str, t: float, rate: float, candidate_rate: float | None, rules: list[str] | None = None,
             p99_over_slo: float = 0.5, model: str = "models:/ratepilot-policy/3") -> dict[str, Any]:  # fmt: skip
    vector = [0.0] * OBS_DIM
    vector[P99_OVER_SLO] = p99_over_slo
    found: dict[str, Any] = {"tier": tier, "t": t, "rate": rate, "rule": (rules or ["none"])[-1], "rules": rules or [],
                             "observation": {"vector": vector}}  # fmt: skip
    if candidate_rate is not None:
        found["candidate"] = {"policy": "rl", "model": model, "rate": candidate_rate, "proposed": candidate_rate,
                              "rule": "none", "rules": []}  # fmt: skip
    return found


def test_incidents_are_the_brake_the_stale_hold_and_p99_over_the_slo() -> None:
    decisions = [
        decision("a", 10.0, 100.0, 200.0),  # ratio 2: differs
        decision("a", 15.0, 50.0, 50.0, rules=["emergency_brake"]),  # brake, same
        decision("b", 10.0, 80.0, 40.0, p99_over_slo=1.5),  # p99 over the SLO, ratio 0.5
        decision("b", 15.0, 80.0, 84.0, rules=["stale_hold"], p99_over_slo=3.0),  # stale and p99, ratio 1.05
        decision("b", 20.0, 80.0, None),  # no candidate that tick: not compared
        decision("c", 20.0, 80.0, math.nan),  # an unusable rate: not compared
    ]
    report = compare(decisions)
    ratios = [2.0, 1.0, 0.5, 1.05]
    assert report["decisions"] == 4 and report["ticks"] == 2 and report["span_s"] == 5.0
    assert report["differ"] == 2 and report["differ_share"] == 0.5
    assert report["mean_ratio"] == pytest.approx(sum(ratios) / 4, rel=1e-12)
    assert report["min_ratio"] == 0.5 and report["max_ratio"] == 2.0
    assert report["mean_abs_log_ratio"] == pytest.approx(sum(abs(math.log(r)) for r in ratios) / 4, rel=1e-12)
    incidents = report["incidents"]
    assert incidents["kinds"] == {"brake": 1, "p99_over_slo": 2, "stale": 1}
    assert incidents["decisions"] == 3 and incidents["differ"] == 1 and incidents["max_ratio"] == pytest.approx(1.05)
    assert [(i["tier"], i["kinds"]) for i in incidents["latest"]] == [
        ("a", ["brake"]), ("b", ["p99_over_slo"]), ("b", ["stale", "p99_over_slo"])
    ]
    assert report["tiers"]["a"]["mean_ratio"] == 1.5 and report["tiers"]["b"]["decisions"] == 2
    assert list(report["models"]) == ["models:/ratepilot-policy/3"]


def test_threshold_and_empty_input() -> None:
    pair = [decision("a", 1.0, 100.0, 109.0), decision("a", 2.0, 100.0, 112.0)]
    assert compare(pair)["differ"] == 1  # |ln 1.09| = 0.086 <= 0.1 < |ln 1.12| = 0.113
    assert compare(pair, threshold=0.05)["differ"] == 2
    empty = compare([])
    assert empty["decisions"] == 0 and empty["differ_share"] is None and empty["incidents"]["latest"] == []
    assert incident_kinds({"rules": ["stale_decay", "tier_bounds"]}) == ["stale"]
