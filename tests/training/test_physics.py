"""Physics sanity of BatchSim: the bucket is limiter.bucket's, overload hurts, a zero rate admits nothing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from limiter.bucket import BucketSpec, check_and_consume
from policy.observation import MISSING
from training.scenarios import SCENARIOS, make_episode, make_episodes, train_seeds
from training.sim import (
    ADMITTED_TOKENS,
    INTERVAL_S,
    MIN_RATE,
    SUBSTEP_US,
    SUBSTEPS,
    BatchSim,
    Episode,
    WorldParams,
)

QUIET = WorldParams(noise=0.0, lag_s=0.0, p_missing=0.0, base_error_rate=0.0, retry_p_throttled=0.0, retry_p_error=0.0)


def constant_world(load: float, steps: int = 6, params: WorldParams = QUIET, heavy: float = 0.0, seed: int = 0) -> Episode:
    """Demand `load` x capacity (light requests unless heavy > 0), constant capacity."""
    seconds = int((steps + 1) * INTERVAL_S)
    demand = np.full(seconds, load * params.capacity_tokens / (1 + heavy * (params.heavy_cost - 1)))
    return Episode("constant", seed, params, demand, np.ones(seconds), np.full(seconds, heavy))


def run(sim: BatchSim, rates: np.ndarray | float) -> dict[str, np.ndarray]:
    """Step to the end at fixed rates; per-interval info stacked (T, N)."""
    sim.reset()
    out: dict[str, list[np.ndarray]] = {}
    done = False
    while not done:
        _, _, done, info = sim.step(np.broadcast_to(rates, (sim.n,)))
        for k, v in info.items():
            out.setdefault(k, []).append(v)
    return {k: np.stack(v) for k, v in out.items()}


def test_the_sims_bucket_admits_exactly_what_limiter_bucket_admits() -> None:
    params = replace(QUIET, reference_rate=300.0, burst_s=0.5, heavy_cost=1.0)
    sim = BatchSim([constant_world(0.6, steps=2, params=params)])  # 600 requests/s against 300 then 150 tokens/s
    sim.reset()
    sim.step([150.0])
    admitted_by_sim = sim.hist[ADMITTED_TOKENS, 0, :]  # tokens admitted per sub-step, warm-up and interval 1
    arrivals = sim.arrivals[: 2 * SUBSTEPS, 0, 0]
    state: tuple[int, int] | None = None
    expected = []
    for k, n_requests in enumerate(arrivals):
        rate = 300.0 if k < SUBSTEPS else 150.0
        spec = BucketSpec(rate=rate, capacity=rate * 0.5)
        now_us = (k + 1) * SUBSTEP_US
        if state is None:
            state = (spec.capacity_ut, 0)  # a new bucket is full
        allowed_here = 0
        for _ in range(int(n_requests)):
            allowed, states, _ = check_and_consume([state], [spec], [1_000_000], now_us)
            state = states[0]
            allowed_here += allowed
        expected.append(allowed_here)
    assert arrivals.sum() > 2 * 300 * INTERVAL_S  # demand really exceeded the rate
    assert admitted_by_sim.tolist() == expected


def test_overload_raises_latency_and_errors_without_a_limiter() -> None:
    sim = BatchSim([constant_world(0.5), constant_world(2.0)])
    info = run(sim, 1e7)  # no limiter
    light, heavy = info["p99_ms"][-3:].mean(axis=0), info["error_frac"][-3:].mean(axis=0)
    assert light[1] > 5 * light[0]
    assert heavy[0] < 0.01 < 0.3 < heavy[1]
    goodput = info["goodput_tokens"].sum(axis=0) / info["bound_tokens"].sum(axis=0)
    assert goodput[0] > 0.95 and goodput[1] < 0.3  # congestion collapse: served late or not at all


def test_latency_rises_with_load_below_capacity() -> None:
    sim = BatchSim([constant_world(load) for load in (0.5, 0.85, 0.9, 0.97)])
    p99 = run(sim, 1e7)["p99_ms"][-3:].mean(axis=0)
    assert np.all(np.diff(p99) > 0), p99
    assert p99[0] < QUIET.slo_ms < p99[-1]


def test_a_zero_rate_admits_nothing_and_reports_no_latency() -> None:
    sim = BatchSim([constant_world(0.8, steps=3)])
    sim.reset()
    sim.step([0.0])  # the first interval may still spend what the bucket held (<= one heavy request)
    obs, _, _, info = sim.step([0.0])
    assert info["rate"][0] == MIN_RATE
    assert info["admitted_tokens"][0] == 0.0 and info["goodput_tokens"][0] == 0.0
    assert info["throttled_tokens"][0] > 0.7 * QUIET.capacity_tokens * INTERVAL_S
    assert np.isnan(obs.metrics.p99_latency_ms[0]) and obs.vector[0, MISSING] == 1.0  # nothing served: missing


def test_bad_rates_are_refused_and_change_nothing() -> None:
    sim = BatchSim([constant_world(0.5)])
    sim.reset()
    before = (sim.t, sim.rate.copy(), sim.tokens_ut.copy())
    for bad in ([np.nan], [-1.0], [1.0, 2.0]):
        with pytest.raises(ValueError):
            sim.step(bad)
    assert sim.t == before[0] and np.array_equal(sim.rate, before[1]) and np.array_equal(sim.tokens_ut, before[2])


def test_throttled_clients_retry_so_asks_exceed_demand() -> None:
    eager = replace(QUIET, retry_p_throttled=0.95)
    sim = BatchSim([constant_world(1.0, params=QUIET), constant_world(1.0, params=eager)])
    info = run(sim, 300.0)
    asked = (info["admitted_tokens"] + info["throttled_tokens"]).sum(axis=0)
    demand = info["demand_tokens"].sum(axis=0) * INTERVAL_S
    assert asked[0] == pytest.approx(demand[0], rel=0.05)
    assert asked[1] > 3 * demand[1]  # each throttled request comes back again and again


def test_capacity_drop_hurts_a_fixed_rate_and_the_oracle_follows_it() -> None:
    episode = make_episode("capacity_drop", 0, randomize=False)
    sim = BatchSim([episode, episode])
    obs = sim.reset()
    fixed = obs.reference_rate[0]
    violated = np.zeros(2)
    done = False
    while not done:
        obs, _, done, info = sim.step([fixed, obs.capacity_tokens[1]])
        violated += info["slo_violated"]
    assert violated[0] > violated[1] + 3


def test_same_episode_same_numbers_whatever_else_is_in_the_batch() -> None:
    episode = make_episode("retry_storm", 3, steps=12)
    alone = run(BatchSim([episode]), 700.0)
    crowd = run(BatchSim([make_episode("flash_crowd", 1, steps=12), episode]), 700.0)
    again = run(BatchSim([episode]), 700.0)
    for key in ("goodput_tokens", "p99_ms", "errors", "throttled_tokens"):
        assert np.array_equal(alone[key][:, 0], crowd[key][:, 1]), key
        assert np.array_equal(alone[key], again[key]), key


def test_every_scenario_builds_reproducibly_and_seeds_differ() -> None:
    for name in SCENARIOS:
        a, b, c = make_episode(name, 5, steps=20), make_episode(name, 5, steps=20), make_episode(name, 6, steps=20)
        assert a.steps == 20
        assert np.array_equal(a.demand_rps, b.demand_rps) and a.params == b.params
        assert not np.array_equal(a.demand_rps, c.demand_rps)
    assert min(train_seeds(3)) >= 1_000_000


def test_trace_windows_for_training_and_evaluation_do_not_overlap() -> None:
    for split in ("train", "eval"):
        for episode in make_episodes(["trace:azure_conv", "trace:worldcup98"], range(4), split=split):
            assert episode.window_s is not None
            start, end = episode.window_s
            cut = 0.7 * (3503 if "azure" in episode.name else 21600)
            assert (end <= cut + 1) if split == "train" else (start >= cut - 1), (split, episode.window_s)
            assert episode.demand_rps.max() > 0


def test_autoscaling_adds_capacity_after_its_delay() -> None:
    episode = make_episode("autoscaling_lag", 2)
    info = run(BatchSim([episode]), 1e7)
    capacity = info["capacity_tokens"][:, 0]
    assert capacity[-1] > 1.5 * capacity[0]
    first_rise = int(np.argmax(capacity > capacity[0]))
    assert first_rise * INTERVAL_S >= 30 - INTERVAL_S  # not before the HPA's delay
