"""The widened training worlds, the held-out `unseen` suite and the curriculum's sampling weights."""

from __future__ import annotations

import numpy as np
import pytest

from training.scenarios import SCENARIOS, SUITES, TRAINABLE_SUITES, make_episode, make_episodes
from training.trainer import Args, curriculum_weights, sample_episodes, training_names, validation_episodes
from training.unseen import UNSEEN

CAPACITY_WORLDS = ("capacity_steps", "capacity_flaps", "capacity_drift", "partial_outage", "peak_with_cut", "mixed_world")


def change_gaps_s(capacity: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """Seconds between the changes of a capacity profile larger than `threshold` (relative)."""
    changed = np.flatnonzero(np.abs(np.diff(np.log(capacity))) > threshold)
    return np.diff(changed)


@pytest.mark.parametrize("name", [*SUITES["default"], *SUITES["unseen"]])
def test_every_world_is_valid_reproducible_and_seed_dependent(name: str) -> None:
    a, b, c = make_episode(name, 3), make_episode(name, 3), make_episode(name, 4)
    for episode in (a, c):
        assert np.all(np.isfinite(episode.demand_rps)) and episode.demand_rps.min() >= 0 and episode.demand_rps.max() > 0
        assert episode.capacity_factor.min() >= 0.05 and episode.capacity_factor.max() <= 2.5
        assert episode.heavy_frac.min() >= 0 and episode.heavy_frac.max() < 1
    assert np.array_equal(a.demand_rps, b.demand_rps) and np.array_equal(a.capacity_factor, b.capacity_factor)
    assert not np.array_equal(a.demand_rps, c.demand_rps)


@pytest.mark.parametrize("name", CAPACITY_WORLDS)
def test_capacity_worlds_change_the_backend_in_most_episodes(name: str) -> None:
    episodes = make_episodes([name], range(20))
    changing = [e for e in episodes if np.ptp(np.log(e.capacity_factor)) > np.log(1.2)]
    assert len(changing) >= 16, name  # the odd world may stay nearly flat (a drift with a small sigma)


def test_capacity_changes_span_seconds_to_minutes() -> None:
    """Across seeds, the time between capacity changes runs from under 10 s to over a minute."""
    gaps = np.concatenate([change_gaps_s(e.capacity_factor) for e in make_episodes(["capacity_steps", "capacity_flaps"], range(30))])
    assert (gaps < 10).sum() > 20 and (gaps > 60).sum() > 20
    outages = [e.capacity_factor for e in make_episodes(["partial_outage"], range(30))]
    lengths = np.concatenate([np.diff(np.flatnonzero(np.diff(c != 1.0))) for c in outages])
    assert lengths.min() < 15 and lengths.max() > 90  # incidents of seconds and of minutes


def test_capacity_cuts_coincide_with_demand_peaks() -> None:
    for episode in make_episodes(["peak_with_cut"], range(20)):
        demand = episode.demand_rps
        first_cut = int(np.flatnonzero(episode.capacity_factor < 0.95)[0])
        window = demand[max(0, first_cut - 20) : first_cut + 30]
        assert window.max() > 1.2 * np.median(demand), episode.seed  # a peak within seconds of the cut


def test_agent_clients_are_bursty() -> None:
    for episode in make_episodes(["agent_clients"], range(10)):
        demand = episode.demand_rps
        assert np.quantile(demand, 0.99) > 2.0 * np.median(demand), episode.seed


def test_the_unseen_suite_is_written_apart_and_never_trained_on() -> None:
    assert set(UNSEEN).isdisjoint(SCENARIOS)
    assert "unseen" not in TRAINABLE_SUITES and not set(SUITES["unseen"]) & set(SUITES["all"])
    args = Args(episode_steps=12, validation_episodes=40)
    trained = {e.name for e in sample_episodes(args, np.random.default_rng(0), 200) + validation_episodes(args)}
    assert not trained & set(UNSEEN)
    assert set(SCENARIOS) <= trained  # and every library world is trained on
    with pytest.raises(ValueError, match="not trained on"):
        training_names(Args(suite="unseen"))


def test_training_trace_windows_get_capacity_dynamics_but_evaluation_windows_stay_as_they_were() -> None:
    train = make_episodes(["trace:worldcup98", "trace:twitter"], range(20), split="train")
    assert sum(np.ptp(e.capacity_factor) > 0.1 for e in train) >= 10
    for episode in make_episodes(["trace:worldcup98", "trace:twitter"], range(20), split="eval"):
        assert np.all(episode.capacity_factor == 1.0)


def test_curriculum_weights_favour_the_scenarios_where_a_baseline_wins() -> None:
    names = ["a", "a", "b", "c"]
    policy = {"objective": np.array([0.5, 0.7, 0.9, 0.8]), "goodput_ratio": np.array([0.9, 0.9, 0.9, 0.9])}
    baselines = {"objective": np.array([0.8, 0.8, 0.5, 0.8]), "goodput_ratio": np.array([0.9, 0.9, 0.95, 0.85])}
    # gaps: a = mean(0.3, 0.1) = 0.2; b = max(-0.4, 0.05) = 0.05; c = max(0, -0.05) = 0
    weights = curriculum_weights(names, policy, baselines, share=0.5)
    assert weights == pytest.approx({"a": 0.5 / 3 + 0.5 * 0.8, "b": 0.5 / 3 + 0.5 * 0.2, "c": 0.5 / 3})
    assert sum(weights.values()) == pytest.approx(1.0)
    swapped = curriculum_weights(names, baselines, policy, share=0.5)  # gaps now a = 0, b = 0.4, c = 0.05
    assert swapped == pytest.approx({"a": 0.5 / 3, "b": 0.5 / 3 + 0.5 * 0.4 / 0.45, "c": 0.5 / 3 + 0.5 * 0.05 / 0.45})
    assert curriculum_weights(["a", "b"], policy | {"objective": np.ones(2), "goodput_ratio": np.ones(2)},
                              {"objective": np.zeros(2), "goodput_ratio": np.zeros(2)}, 0.5) == {"a": 0.5, "b": 0.5}  # fmt: skip
    # no baseline wins anywhere: uniform


def test_sample_episodes_follows_the_curriculum_weights() -> None:
    args = Args(episode_steps=2, trace_share=0.0)
    weights = dict.fromkeys(SCENARIOS, 1.0) | {"capacity_flaps": 30.0}
    names = [e.name for e in sample_episodes(args, np.random.default_rng(1), 200, weights)]
    share = names.count("capacity_flaps") / len(names)
    assert 0.55 < share < 0.8  # 30 / (15 + 30) = 0.67
