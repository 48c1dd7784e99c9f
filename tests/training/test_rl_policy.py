"""The learned policy's inference, artifact format and refusals (pure numpy, no servers)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from policy.base import ANCHORED, RELATIVE
from policy.observation import OBS_DIM, OBS_SCHEMA, IntervalMetrics, ObservationBuilder
from policy.rl import (
    CAPACITY_SHORTFALL,
    DEFAULT_MODEL_PATH,
    FRESH_LN_CAPACITY_OVER_RATE,
    LN1P_THROTTLED_OVER_RATE,
    LN_ADMITTED_OVER_RATE,
    LN_CPU,
    N_FEATURES,
    P99_EXCESS,
    RAW_FEATURES,
    ModelError,
    PolicyNetwork,
    RLPolicy,
    batch_actions,
    features,
    load,
    make_meta,
    n_params,
    save,
)
from training.registry import load_rl


def observation(n_tiers: int = 1, p99_ms: float = 150.0, cpu: float = 0.5, admitted: float = 80.0):
    """One observation of `n_tiers` tiers at refill rate 100 tokens/s, SLO 100 ms."""
    builder = ObservationBuilder(slo_ms=np.array([100.0]), reference_rate=np.full(n_tiers, 100.0))
    metrics = IntervalMetrics(
        p99_latency_ms=np.full(n_tiers, p99_ms),
        error_rate=np.zeros(n_tiers),
        cpu=np.full(n_tiers, cpu),
        admitted_rps=np.full(n_tiers, admitted),
        throttled_rps=np.full(n_tiers, 20.0),
        rate=np.full(n_tiers, 100.0),
    )
    return builder.build(metrics)


def random_network(hidden: int, seed: int = 0) -> PolicyNetwork:
    """A network with random weights and a non-trivial normaliser."""
    rng = np.random.default_rng(seed)
    return PolicyNetwork(
        rng.normal(0, 0.3, n_params(hidden)), rng.normal(0, 1, N_FEATURES), rng.uniform(0.5, 2, N_FEATURES), hidden
    )


def test_features_derive_logs_and_excess() -> None:
    x = observation(p99_ms=150.0, cpu=0.5, admitted=80.0).vector[0]
    phi = features(x)
    assert phi.shape == (N_FEATURES,)
    np.testing.assert_allclose(phi[RAW_FEATURES], x[RAW_FEATURES])
    derived = phi[[LN_ADMITTED_OVER_RATE, LN_CPU, P99_EXCESS, LN1P_THROTTLED_OVER_RATE]]
    np.testing.assert_allclose(derived, [np.log(0.8), np.log(0.5), 0.5, np.log1p(0.2)])
    # capacity estimate 80 / 0.5 = 160 tokens/s, fresh: the rate could be 1.6x; no shortfall
    np.testing.assert_allclose(phi[[FRESH_LN_CAPACITY_OVER_RATE, CAPACITY_SHORTFALL]], [np.log(1.6), 0.0])
    short = features(observation(cpu=0.8, admitted=40.0).vector[0])  # 50 tokens/s: half the rate
    np.testing.assert_allclose(short[[FRESH_LN_CAPACITY_OVER_RATE, CAPACITY_SHORTFALL]], [np.log(0.5), np.log(0.5)])
    stale = features(observation(cpu=0.99, admitted=100.0).vector[0])  # saturated: no estimate yet
    np.testing.assert_allclose(stale[[FRESH_LN_CAPACITY_OVER_RATE, CAPACITY_SHORTFALL]], [0.0, 0.0])


def test_zero_network_keeps_the_rate() -> None:
    policy = RLPolicy(PolicyNetwork.zeros())
    np.testing.assert_allclose(policy.act(observation()), [100.0])


def test_linear_action_is_the_normalised_dot_product_clipped() -> None:
    theta = np.zeros(n_params(0))
    theta[P99_EXCESS] = -0.4
    theta[-1] = 0.1  # bias
    network = PolicyNetwork(theta, np.zeros(N_FEATURES), np.full(N_FEATURES, 2.0), 0)
    # p99 excess 0.5, normalised by std 2 -> 0.25; action = -0.4 * 0.25 + 0.1 = 0.0
    np.testing.assert_allclose(network.actions(observation(p99_ms=150.0).vector), [0.0], atol=1e-12)
    # excess 9 -> 4.5 std -> -1.7 -> clipped to -1 -> the fastest cut: rate / 4
    np.testing.assert_allclose(RLPolicy(network).act(observation(p99_ms=1000.0)), [25.0])


@pytest.mark.parametrize("hidden", [0, 8])
def test_batch_actions_match_one_policy_at_a_time(hidden: int) -> None:
    networks = [random_network(hidden, seed) for seed in range(3)]
    rng = np.random.default_rng(9)
    vectors = np.clip(rng.normal(0.5, 1.0, (3, 4, OBS_DIM)), 0, None)
    mean, std = networks[0].obs_mean, networks[0].obs_std
    thetas = np.stack([n.theta for n in networks])
    batched = batch_actions(thetas, features(vectors), mean, std, hidden)
    for i, n in enumerate(networks):
        same_norm = PolicyNetwork(n.theta, mean, std, hidden)
        np.testing.assert_allclose(batched[i], same_norm.actions(vectors[i]))
        for tier in range(4):  # vectorised over tiers = one tier at a time
            np.testing.assert_allclose(batched[i, tier], same_norm.actions(vectors[i, tier : tier + 1])[0])
    assert np.all(np.abs(batched) <= 1.0)


@pytest.mark.parametrize("hidden", [0, 16])
def test_save_load_round_trip_is_exact_and_small(tmp_path: Path, hidden: int) -> None:
    network = random_network(hidden)
    path = save(RLPolicy(network, make_meta(network, "ARS-V2t", {"iterations": 3})), tmp_path / "p.npz")
    loaded = load(path)
    assert loaded.meta["algorithm"] == "ARS-V2t" and loaded.meta["training"] == {"iterations": 3}
    obs = observation(n_tiers=3)
    np.testing.assert_array_equal(loaded.act(obs), RLPolicy(network).act(obs))
    assert path.stat().st_size <= 50_000


def test_an_anchored_model_keeps_its_action_space_and_acts_from_the_capacity_estimate(tmp_path: Path) -> None:
    network = PolicyNetwork.zeros()  # action 0: the anchor itself
    path = save(RLPolicy(network, make_meta(network, "test", action_space=ANCHORED)), tmp_path / "anchored.npz")
    loaded = load(path)
    assert loaded.action_space == ANCHORED and load(save(RLPolicy(network), tmp_path / "r.npz")).action_space == RELATIVE
    np.testing.assert_allclose(loaded.act(observation(cpu=0.5, admitted=80.0)), [160.0])  # the estimate 80 / 0.5
    np.testing.assert_allclose(loaded.act(observation(cpu=0.99, admitted=100.0)), [100.0])  # saturated: the rate
    with pytest.raises(ValueError, match="unknown action space"):
        make_meta(network, "test", action_space="log-multiplier:down=2,up=2")


def write_npz(path: Path, meta: object, **arrays: np.ndarray) -> Path:
    """An npz with the given meta and arrays (to fake broken artifacts)."""
    network = PolicyNetwork.zeros()
    content = {"theta": network.theta, "obs_mean": network.obs_mean, "obs_std": network.obs_std} | arrays
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(meta if isinstance(meta, str) else json.dumps(meta)), **content)
    path.write_bytes(buffer.getvalue())
    return path


def good_meta() -> dict:
    """A meta record that load accepts."""
    return make_meta(PolicyNetwork.zeros(), "test")


@pytest.mark.parametrize(
    ("meta_change", "arrays", "message"),
    [
        ({"obs_schema": "ratepilot-obs-v0:p99"}, {}, "observation schema mismatch"),
        ({"feature_set": "other"}, {}, "feature set"),
        ({"action_space": "log-multiplier:down=2,up=2"}, {}, "trained for action space"),
        ({"action_space": None}, {}, "trained for action space"),
        ({"format_version": 99}, {}, "format version"),
        ({"format": "sklearn"}, {}, "not a ratepilot policy"),
        ({}, {"theta": np.zeros(3)}, "theta must have shape"),
        ({}, {"obs_std": np.zeros(N_FEATURES)}, "obs_std must be positive"),
        ({}, {"obs_mean": np.full(N_FEATURES, np.nan)}, "non-finite"),
        ({"hidden": "8"}, {}, "hidden must be an integer"),
    ],
)
def test_load_refuses_mismatched_artifacts(tmp_path: Path, meta_change: dict, arrays: dict, message: str) -> None:
    path = write_npz(tmp_path / "bad.npz", good_meta() | meta_change, **arrays)
    with pytest.raises(ModelError, match=message):
        load(path)


def test_load_refuses_corrupt_files(tmp_path: Path) -> None:
    good = save(RLPolicy(PolicyNetwork.zeros(), good_meta()), tmp_path / "good.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    flipped = bytearray(good.read_bytes())
    flipped[60] ^= 0xFF  # inside the first member's compressed data: the CRC check catches it
    corrupt = tmp_path / "flipped.npz"
    corrupt.write_bytes(bytes(flipped))
    for path in (truncated, garbage, corrupt, tmp_path / "missing.npz"):
        with pytest.raises(ModelError):
            load(path)
    with pytest.raises(ModelError, match="corrupt meta"):
        load(write_npz(tmp_path / "meta.npz", "{not json"))
    with pytest.raises(ModelError, match="the archive has no .meta., .obs_mean., .obs_std."):
        buffer = io.BytesIO()
        np.savez(buffer, theta=np.zeros(2))
        (tmp_path / "partial.npz").write_bytes(buffer.getvalue())
        load(tmp_path / "partial.npz")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    save(RLPolicy(PolicyNetwork.zeros(), good_meta()), tmp_path / "p.npz")
    save(RLPolicy(random_network(0), good_meta()), tmp_path / "p.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]
    np.testing.assert_array_equal(load(tmp_path / "p.npz").network.theta, random_network(0).theta)


def test_rl_without_a_store_is_the_committed_default_and_creates_nothing(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    policy = load_rl()
    assert policy.meta["obs_schema"] == OBS_SCHEMA and policy.meta["algorithm"].startswith("ARS")
    assert DEFAULT_MODEL_PATH.stat().st_size <= 50_000
    assert not db.parent.exists()
    np.testing.assert_array_equal(load_rl(str(DEFAULT_MODEL_PATH)).network.theta, policy.network.theta)


@pytest.mark.parametrize("path", [DEFAULT_MODEL_PATH, DEFAULT_MODEL_PATH.with_name("candidate_policy.npz")])
def test_committed_policies_cut_the_rate_when_p99_is_far_over_the_slo(path: Path) -> None:
    """A sanity check of the trained artifacts: overload (p99 5x SLO, CPU saturated, many 429s) lowers the rate."""
    policy = load(path)
    overloaded = observation(p99_ms=500.0, cpu=1.0, admitted=100.0)
    assert policy.act(overloaded)[0] < 100.0
