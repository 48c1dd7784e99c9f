"""The promotion rule, exactly: goodput at least as good and SLO violations no worse."""

from __future__ import annotations

import pytest

from training.promote import Decision, decide


def metrics(goodput: float, slo: float) -> dict[str, float]:
    """Summary metrics with the two that decide."""
    return {"goodput_ratio": goodput, "slo_violation_frac": slo}


@pytest.mark.parametrize(
    ("candidate", "champion", "promote"),
    [
        (metrics(0.90, 0.02), metrics(0.85, 0.02), True),  # better goodput, same SLO
        (metrics(0.85, 0.02), metrics(0.85, 0.02), True),  # a tie is "at least as good"
        (metrics(0.90, 0.01), metrics(0.85, 0.02), True),
        (metrics(0.84, 0.00), metrics(0.85, 0.02), False),  # less goodput
        (metrics(0.95, 0.03), metrics(0.85, 0.02), False),  # more SLO violations
    ],
)
def test_rule(candidate: dict, champion: dict, promote: bool) -> None:
    decision = decide(candidate, champion)
    assert decision.promote is promote and decision.forced is False


def test_no_champion_promotes() -> None:
    assert decide(metrics(0.1, 0.9), None) == Decision(True, False, "no champion yet")


def test_force_promotes_a_worse_candidate_and_says_so() -> None:
    decision = decide(metrics(0.80, 0.05), metrics(0.85, 0.02), force=True)
    assert decision.promote and decision.forced
    assert decision.reason == "forced although candidate goodput_ratio lower and slo_violation_frac higher"


def test_force_on_a_better_candidate_is_not_recorded_as_forced() -> None:
    assert decide(metrics(0.9, 0.0), metrics(0.8, 0.1), force=True).forced is False
