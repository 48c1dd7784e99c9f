"""ARS V2-t on toy objectives: the update rule, the running normaliser and real convergence."""

from __future__ import annotations

import numpy as np
import pytest

from training.ars import ARS, ARSConfig, RunningStat, ars_step


def test_running_stat_matches_numpy_over_batches() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.normal(5, 3, (k, 4)) for k in (1, 7, 30, 2)]
    stat = RunningStat.empty(4)
    for batch in batches:
        stat.update(batch)
    everything = np.concatenate(batches)
    np.testing.assert_allclose(stat.mean, everything.mean(axis=0))
    np.testing.assert_allclose(stat.std, everything.std(axis=0, ddof=1))
    assert stat.count == len(everything)


def test_running_stat_leaves_constant_features_unscaled() -> None:
    stat = RunningStat.empty(2)
    stat.update(np.array([[1.0, 3.0], [1.0, 5.0]]))
    np.testing.assert_allclose(stat.std, [1.0, np.sqrt(2.0)])


def test_ars_step_uses_the_top_directions_scaled_by_their_return_spread() -> None:
    config = ARSConfig(n_directions=3, top_directions=2, step_size=0.5, noise=0.1)
    deltas = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    r_plus, r_minus = np.array([3.0, 0.0, 1.0]), np.array([1.0, 4.0, 0.0])
    theta, stats = ars_step(np.zeros(2), deltas, r_plus, r_minus, config)
    # top by max(r+, r-): direction 1 (4.0), direction 0 (3.0); kept returns [0, 3, 4, 1]
    sigma = np.std([0.0, 3.0, 4.0, 1.0])
    expected = 0.5 / (2 * sigma) * ((0.0 - 4.0) * deltas[1] + (3.0 - 1.0) * deltas[0])
    np.testing.assert_allclose(theta, expected)
    assert stats.return_std == pytest.approx(sigma)
    assert stats.best_return == 4.0


def test_ars_step_with_equal_returns_does_not_move() -> None:
    theta, _ = ars_step(np.ones(3), np.eye(3), np.ones(3), np.ones(3), ARSConfig(3, 2))
    np.testing.assert_array_equal(theta, np.ones(3))


@pytest.mark.parametrize("bad", [{"n_directions": 0}, {"top_directions": 9}, {"step_size": 0.0}, {"noise": -1.0}])
def test_config_refuses_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        ARSConfig(**bad)


def test_ars_converges_on_a_quadratic() -> None:
    target = np.array([0.5, -1.0, 2.0, 0.0])

    def rollout(thetas, mean, std):
        return -((thetas - target) ** 2).sum(axis=1), np.zeros((0, 1))

    ars = ARS(np.zeros(4), RunningStat.empty(1), ARSConfig(8, 4, step_size=0.1, noise=0.1), np.random.default_rng(0))
    start = np.linalg.norm(ars.theta - target)
    for _ in range(150):
        ars.iterate(rollout)
    assert np.linalg.norm(ars.theta - target) < 0.1 * start


def test_ars_learns_a_linear_policy_on_badly_scaled_states_thanks_to_the_normaliser() -> None:
    """States with offset 5000 and scale 1000: the best action is a linear function of them."""
    states = np.random.default_rng(3).normal([5000.0, -20.0], [1000.0, 0.01], (256, 2))
    best = (states[:, 0] - 5000.0) / 1000.0 - (states[:, 1] + 20.0) / 0.01 * 0.5

    def rollout(thetas, mean, std):
        z = (states - mean) / std
        actions = z @ thetas[:, :2].T + thetas[:, 2]
        return -((actions - best[:, None]) ** 2).mean(axis=0), states

    ars = ARS(np.zeros(3), RunningStat.empty(2), ARSConfig(8, 4, step_size=0.05, noise=0.05), np.random.default_rng(0))
    for _ in range(200):
        ars.iterate(rollout)
    z = (states - ars.obs_stat.mean) / ars.obs_stat.std
    loss = np.mean((z @ ars.theta[:2] + ars.theta[2] - best) ** 2)
    assert loss < 0.02 * np.mean(best**2)  # below 2 % of the do-nothing policy's loss


@pytest.mark.parametrize("hidden", [0, 6])
def test_fit_imitation_regresses_the_target_for_linear_and_mlp_policies(hidden: int) -> None:
    from policy.rl import N_FEATURES, batch_actions, n_params
    from training.trainer import fit_imitation

    rng = np.random.default_rng(3)
    z = rng.normal(size=(400, N_FEATURES))
    target = np.clip(0.4 * z[:, 0] - 0.3 * z[:, 2], -1.0, 1.0)
    theta = fit_imitation(z, target, hidden, alpha=1e-3, seed=0)
    assert theta.shape == (n_params(hidden),)
    predicted = batch_actions(theta[None], z[None], np.zeros(N_FEATURES), np.ones(N_FEATURES), hidden)[0]
    assert np.mean((predicted - target) ** 2) < 0.25 * np.var(target)  # a constant would score 1.0 * var
