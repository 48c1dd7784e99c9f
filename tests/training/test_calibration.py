"""The calibration fits recover known parameters from synthetic series; bad recordings and bad files are refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from training.calibrate import load_calibration, write_calibration
from training.calibration import (
    Calibration,
    CalibrationError,
    History,
    fit_calibration,
    fit_capacity,
    fit_error_onset,
    fit_lag,
    fit_latency_curve,
    p99_from_buckets,
    pooled_p99,
)
from training.latency import service_p99_ms
from training.scenarios import calibrated_worlds, make_episode
from training.sim import BatchSim
from training.world import Episode, WorldParams

RNG_SEED = 7


def known() -> Calibration:
    """A calibration with every field set (the file tests' fixture)."""
    return Calibration(
        capacity_tps=60.0, base_latency_ms=150.0, knee_a=0.4, knee_k=3.0, base_error_rate=0.001, error_onset_util=1.2,
        error_onset_slope=15.0, timeout_s=1.2, saturation_p99_ms=1200.0, collapse=0.05, lag_s=2.5, slo_ms=300.0,
        quality={"steps": 60.0}, source={"prometheus_url": "http://127.0.0.1:9090"},
    )  # fmt: skip


# -- the fits on synthetic series with known parameters ------------------------------------------
def test_capacity_is_recovered_even_through_a_capacity_cut() -> None:
    rng = np.random.default_rng(RNG_SEED)
    cpu = rng.uniform(0.1, 1.0, 200)
    capacity = np.where(np.arange(200) < 150, 80.0, 50.0)  # a quarter of the recording after a cut
    served = capacity * cpu * rng.lognormal(0.0, 0.05, 200)
    fit = fit_capacity(served, cpu)
    assert fit.capacity_tps == pytest.approx(80.0, rel=0.03)
    assert np.nanmedian(fit.per_step_tps[150:]) == pytest.approx(50.0, rel=0.05)


@pytest.mark.parametrize(("base", "a", "k"), [(150.0, 0.4, 3.0), (50.0, 3.0, 20.0), (80.0, 1.0, 8.0)])
def test_latency_curve_is_recovered(base: float, a: float, k: float) -> None:
    rng = np.random.default_rng(RNG_SEED)
    rho = rng.uniform(0.05, 0.96, 150)
    p99 = service_p99_ms(rho, base, a, k) * rng.lognormal(0.0, 0.05, rho.size)
    fit = fit_latency_curve(rho, p99)
    assert fit.base_latency_ms == pytest.approx(base, rel=0.05)
    grid = np.array([0.3, 0.6, 0.8, 0.9, 0.95])  # the curve, not each parameter: a and k trade off a little
    fitted = service_p99_ms(grid, fit.base_latency_ms, fit.knee_a, fit.knee_k)
    np.testing.assert_allclose(fitted, service_p99_ms(grid, base, a, k), rtol=0.08)
    assert fit.rel_rmse == pytest.approx(0.05, abs=0.02)


def test_error_onset_is_recovered_from_request_counts() -> None:
    rng = np.random.default_rng(RNG_SEED)
    util = rng.uniform(0.2, 1.6, 300)
    finished = rng.integers(200, 400, util.size).astype(float)
    share = 1.0 / (1.0 + np.exp(-12.0 * (util - 1.1)))
    errors = rng.binomial(finished.astype(int), share).astype(float)
    fit = fit_error_onset(util, finished, errors)
    assert fit.onset_util == pytest.approx(1.1, abs=0.02)
    assert fit.slope == pytest.approx(12.0, rel=0.2)
    assert fit.base_error_rate < 0.01


def test_error_onset_without_errors_is_left_out() -> None:
    util = np.linspace(0.1, 1.0, 30)
    fit = fit_error_onset(util, np.full(30, 100.0), np.zeros(30))
    assert fit.slope == 0.0 and fit.base_error_rate == 0.0


@pytest.mark.parametrize("window", [4, 10, 16])
def test_lag_of_a_trailing_window_is_half_the_window(window: int) -> None:
    rng = np.random.default_rng(RNG_SEED)
    steps = np.repeat(rng.uniform(20, 80, 30), 8)  # demand steps every 8 s, as a load scenario plays them
    reference = steps + rng.normal(0, 2, steps.size)
    seen = np.convolve(reference, np.ones(window) / window)[: reference.size]  # the mean of the last `window` values
    seen[: window - 1] = np.nan
    assert fit_lag(reference, seen, 1.0) == pytest.approx((window - 1) / 2, abs=1.0)


def synthetic_history(n: int = 120, capacity: float = 60.0, lag: int = 4) -> History:
    """A recording of a backend with a known curve, driven from 10 % to 130 % of its capacity."""
    rng = np.random.default_rng(RNG_SEED)
    offered = np.repeat(np.linspace(0.1, 1.3, n // 6), 6) * capacity * rng.lognormal(0, 0.03, n)
    error_share = 1.0 / (1.0 + np.exp(-30.0 * (offered / capacity - 1.15)))
    util = np.minimum(offered * (1.0 - error_share) / capacity, 1.0)  # CPU: the work served
    finished = offered
    p99 = np.where(util < 0.97, service_p99_ms(util, 120.0, 0.5, 2.0), 1100.0) * rng.lognormal(0, 0.04, n)
    seen = np.concatenate([np.full(lag, np.nan), offered[:-lag]])
    return History(
        step_s=1.0, admitted_tps=offered, throttled_tps=np.zeros(n), finished_rps=finished, error_rps=finished * error_share,
        p99_ms=p99, cpu=util, instant_tps=offered, seen_tps=seen,
    )  # fmt: skip


def test_fit_calibration_puts_the_fits_together() -> None:
    calibration = fit_calibration(synthetic_history(), slo_ms=300.0, instant_window_s=0.0)
    assert calibration.capacity_tps == pytest.approx(60.0, rel=0.05)
    assert calibration.base_latency_ms == pytest.approx(120.0, rel=0.1)
    assert calibration.saturation_p99_ms == pytest.approx(1100.0, rel=0.05)
    assert calibration.error_onset_util == pytest.approx(1.15, abs=0.05)
    assert calibration.quality["observed_lag_s"] == pytest.approx(4.0, abs=0.5)
    assert calibration.lag_s == pytest.approx(1.5, abs=0.5)  # the simulator's window already trails by 2.5 s
    assert 0.5 < calibration.rho_cap() < 0.995


def test_the_curve_sees_the_p99_of_all_answers_at_a_load_not_of_each_step() -> None:
    """Two steps at one load: a calm one and a burst with a long tail; together their p99 is the burst's tail."""
    bounds = np.array([0.05, 0.1, 0.25, 0.5, 1.0])
    calm = np.array([80.0, 99.5, 100.0, 100.0, 100.0, 100.0])  # cumulative answers/s per bucket, +Inf last
    burst = np.array([40.0, 70.0, 90.0, 96.0, 100.0, 100.0])
    h = synthetic_history(12)._replace(bucket_bounds_s=bounds, bucket_rates=np.array([calm, burst] * 6))
    rho = np.array([0.51, 0.52] * 6)
    centres, pooled, answers = pooled_p99(h, rho)
    assert centres == pytest.approx([0.515]) and answers == pytest.approx([1200.0])
    alone = p99_from_buckets(bounds, np.array([calm, burst]))
    assert pooled[0] == pytest.approx(p99_from_buckets(bounds, (calm + burst)[None, :])[0])
    assert alone[0] < pooled[0] < alone[1] and pooled[0] > np.mean(alone)


# -- bad recordings ------------------------------------------------------------------------------
def test_a_recording_that_never_loads_the_backend_is_refused() -> None:
    h = synthetic_history()
    idle = h._replace(cpu=h.cpu * 0.4, p99_ms=np.full(h.cpu.size, 120.0))
    with pytest.raises(CalibrationError, match="never loaded past"):
        fit_calibration(idle, 300.0, 0.0)


def test_too_short_or_empty_recordings_are_refused() -> None:
    h = synthetic_history()
    short = h._replace(**{f: getattr(h, f)[:5] for f in History._fields[1:] if getattr(h, f) is not None})
    with pytest.raises(CalibrationError, match="need at least"):
        fit_calibration(short, 300.0, 0.0)
    no_cpu = h._replace(cpu=np.full(h.cpu.size, np.nan))
    with pytest.raises(CalibrationError, match="capacity: only 0 steps"):
        fit_calibration(no_cpu, 300.0, 0.0)
    with pytest.raises(CalibrationError, match="never changes"):
        fit_lag(np.full(30, 5.0), np.full(30, 5.0), 1.0)


# -- the calibration file ------------------------------------------------------------------------
def test_file_round_trip(tmp_path: Path) -> None:
    path = write_calibration(known(), tmp_path / "cal.json")
    assert load_calibration(path) == known()
    assert json.loads(path.read_text())["version"] == 1


def _file(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(schema="something.else"), "not a calibration file"),
        (lambda d: d.update(version=2), "version 2 is not supported"),
        (lambda d: d["model"].pop("knee_k"), "missing field 'knee_k'"),
        (lambda d: d["model"].update(extra=1.0), "unknown field 'extra'"),
        (lambda d: d.update(comment="x"), "unknown key 'comment'"),
        (lambda d: d["model"].update(capacity_tps="60"), "capacity_tps must be a finite number"),
        (lambda d: d["model"].update(capacity_tps=True), "capacity_tps must be a finite number"),
        (lambda d: d["model"].update(capacity_tps=None), "capacity_tps must be a finite number"),
        (lambda d: d["model"].update(capacity_tps=-5.0), "capacity_tps must be a positive number"),
        (lambda d: d["model"].update(knee_k=100.0), "knee_k is out of range"),
        (lambda d: d["model"].update(lag_s=60.0), "lag_s is out of range"),
        (lambda d: d.update(quality={"steps": "many"}), "quality must be"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    data = known().to_dict()
    change(data)
    with pytest.raises(CalibrationError, match=message):
        load_calibration(_file(tmp_path, data))


def test_nan_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(known().to_dict()).replace('"knee_a": 0.4', '"knee_a": NaN'))
    with pytest.raises(CalibrationError, match="knee_a must be a finite number"):
        load_calibration(nan)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(CalibrationError, match="not JSON"):
        load_calibration(garbage)
    with pytest.raises(CalibrationError, match="cannot read it"):
        load_calibration(tmp_path / "missing.json")


# -- the calibrated simulator ------------------------------------------------------------------------
def test_apply_gives_a_world_the_backend_and_keeps_the_operators_share() -> None:
    params = known().apply(WorldParams(capacity_tokens=1000.0, reference_rate=900.0))
    assert params.capacity_tokens == 60.0 and params.reference_rate == pytest.approx(54.0)
    assert (params.base_latency_ms, params.knee_a, params.knee_k, params.lag_s) == (150.0, 0.4, 3.0, 2.5)
    assert params.knee_rho_cap == pytest.approx(known().rho_cap())


def test_calibrated_worlds_scale_demand_with_the_capacity() -> None:
    plain = make_episode("steady", 3, steps=4)
    with calibrated_worlds(known()):
        calibrated = make_episode("steady", 3, steps=4)
    after = make_episode("steady", 3, steps=4)
    assert calibrated.params.capacity_tokens == 60.0
    ratio = 60.0 / plain.params.capacity_tokens
    np.testing.assert_allclose(calibrated.demand_rps, plain.demand_rps * ratio)
    assert after.params == plain.params  # nothing leaks out of the block


def _run(params: WorldParams, load: float, steps: int = 6) -> dict[str, float]:
    seconds = (steps + 1) * 5
    demand = np.full(seconds, load * params.capacity_tokens)
    sim = BatchSim([Episode("flat", 0, params, demand, np.ones(seconds), np.zeros(seconds))])
    sim.reset()
    p99, errors = [], []
    for _ in range(steps):
        _, _, _, info = sim.step(np.array([10 * params.capacity_tokens]))  # no limit
        p99.append(float(info["p99_ms"][0]))
        errors.append(float(info["error_frac"][0]))
    return {"p99_ms": float(np.mean(p99[2:])), "error_frac": float(np.mean(errors[2:]))}


def test_a_calibrated_knee_and_error_onset_change_the_simulated_backend() -> None:
    base = WorldParams(capacity_tokens=100.0, reference_rate=100.0, noise=0.0, base_error_rate=0.0)
    early_knee = replace(base, knee_a=0.5, knee_k=2.0)
    assert _run(early_knee, 0.7)["p99_ms"] > 1.2 * _run(base, 0.7)["p99_ms"]  # a few-worker pool bends earlier
    onset = replace(base, error_onset_util=0.6, error_onset_slope=20.0)
    assert _run(base, 0.8)["error_frac"] < 0.01
    assert _run(onset, 0.8)["error_frac"] == pytest.approx(1.0 / (1.0 + np.exp(-20.0 * 0.2)), abs=0.05)
