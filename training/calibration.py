"""Sim-to-real calibration: fit the simulator's service model to a measured backend (scikit-learn, no I/O).

A `History` is a recorded backend at a fixed step (what `training.history` reads from Prometheus);
`fit_calibration` turns it into a `Calibration`, whose `apply` gives any `WorldParams` the measured
service model. What is fitted, from which series, and how:

| parameter                   | from                                   | fit                                              |
|-----------------------------|----------------------------------------|--------------------------------------------------|
| capacity_tps                | served work (admitted x ok share), CPU | served = capacity x CPU: median regression        |
|                             |                                        | through 0 (`QuantileRegressor`, robust to cuts)   |
| base_latency_ms, knee_a/k   | p99 of the answers pooled per CPU bin  | p99 = base (1 + a rho^k / (1 - rho)): for each k  |
|                             |                                        | of a grid a non-negative `LinearRegression` in    |
|                             |                                        | relative error; the k that fits best              |
| base_error_rate             | error share at utilisation < 0.7       | errors / finished                                 |
| error_onset_util/_slope     | error share vs offered utilisation     | binomial `LogisticRegression`; onset = 50 % point |
| timeout_s                   | p99 of windows past the error budget   | median: how long the backend lets a request wait  |
| saturation_p99_ms           | answers of the steps at CPU >= 0.97    | their p99: where the latency curve stops rising   |
| collapse                    | served / capacity, saturated and       | 1 - median: capacity a thrashing backend loses    |
|                             | failing                                |                                                   |
| lag_s                       | admitted rate, finest vs as the        | lag of the peak of their cross-correlation, less  |
|                             | controller's window sees it            | the simulator's half interval                     |

The calibration file is versioned JSON (`SCHEMA`, `VERSION`); `Calibration.from_dict` checks every
field and refuses a bad file with a `CalibrationError` naming the field.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression, QuantileRegressor

from training.latency import RHO_CAP, service_p99_ms
from training.world import INTERVAL_S, WorldParams

SCHEMA = "ratepilot.calibration"
VERSION = 1
KNEE_GRID = np.arange(1.0, 40.5, 0.5)  # knee sharpness k tried by the latency-curve fit
MIN_WINDOWS = 8  # steps with traffic a fit needs at least
MIN_LEVELS = 5  # load levels (utilisation bins) the latency curve needs at least
MIN_CPU = 0.1  # windows below this CPU say little about the capacity (served / CPU is noise)
CURVE_MAX_RHO = 0.97  # the curve is fitted below saturation; the queue model answers above it
MIN_PEAK_RHO = 0.5  # the recording must load the backend at least this much to show its curve
LOW_LOAD_RHO = 0.7  # below this utilisation, errors are the base error rate
ERROR_BUDGET = 0.01  # a window past this error share shows how long the backend lets requests wait
MAX_LAG_S = 30.0  # the lag fit looks this far
CPU_BIN = 0.05  # width of the utilisation bins whose answers are pooled for the latency curve
SATURATED_CPU = 0.97  # steps at or above this CPU show the saturated p99
OPTIONAL = ("timeout_s", "saturation_p99_ms")  # model fields a recording may not show (null in the file)


class CalibrationError(ValueError):
    """A recording that cannot be fitted, or a calibration file that is not one; the message says why."""


class History(NamedTuple):
    """A recorded backend, one value per step (NaN where nothing was recorded), rates over one window."""

    step_s: float  # seconds between values
    admitted_tps: np.ndarray  # tokens/s the limiter admitted
    throttled_tps: np.ndarray  # tokens/s the limiter refused (429)
    finished_rps: np.ndarray  # requests/s the backend answered (ok or error)
    error_rps: np.ndarray  # requests/s the backend failed (5xx)
    p99_ms: np.ndarray  # p99 latency of the backend's answers
    cpu: np.ndarray  # busy share of the backend (0..1)
    instant_tps: np.ndarray  # admitted tokens/s over the shortest window: the lag fit's reference
    seen_tps: np.ndarray  # admitted tokens/s as the controller's query sees it (its window)
    bucket_bounds_s: np.ndarray | None = None  # the latency histogram's finite upper bounds (s)
    bucket_rates: np.ndarray | None = None  # (steps, bounds + 1) cumulative answers/s per bucket, +Inf last


@dataclass(frozen=True)
class Calibration:
    """The fitted service model of one backend (the calibration file's `model`), plus how well it fits."""

    capacity_tps: float  # tokens/s the backend serves at full CPU
    base_latency_ms: float  # p99 of an idle backend
    knee_a: float  # height of the latency knee
    knee_k: float  # sharpness of the latency knee
    base_error_rate: float  # errors at low load (share)
    error_onset_util: float  # offered utilisation at which half the requests fail
    error_onset_slope: float  # steepness of the onset per unit of utilisation; 0: no errors were seen to fit
    timeout_s: float | None  # how long the backend lets a request wait before failing it (None: never seen)
    saturation_p99_ms: float | None  # p99 of a saturated backend (CPU ~ 1): where the curve stops (None: never saturated)
    collapse: float  # share of the capacity lost while saturated and refusing work (thrashing)
    lag_s: float  # the simulator's scrape lag: the observed window ends this long before the tick
    slo_ms: float  # the latency SLO the backend is run under (the operator's, not fitted)
    quality: dict[str, float] = field(default_factory=dict)  # fit figures (windows used, errors), for the record
    source: dict[str, str] = field(default_factory=dict)  # where the history came from (URL, window), for the record

    def __post_init__(self) -> None:
        positive = {"capacity_tps": self.capacity_tps, "base_latency_ms": self.base_latency_ms, "slo_ms": self.slo_ms}
        for name, value in positive.items():
            if not (_number(value) and 0 < value < 1e9):
                raise CalibrationError(f"{name} must be a positive number, got {value!r}")
        checks = {
            "knee_a": _number(self.knee_a) and 0 <= self.knee_a <= 1e6,
            "knee_k": _number(self.knee_k) and 1 <= self.knee_k <= 64,
            "base_error_rate": _number(self.base_error_rate) and 0 <= self.base_error_rate < 1,
            "error_onset_util": _number(self.error_onset_util) and 0 < self.error_onset_util <= 100,
            "error_onset_slope": _number(self.error_onset_slope) and 0 <= self.error_onset_slope <= 1e4,
            "timeout_s": self.timeout_s is None or (_number(self.timeout_s) and 0 < self.timeout_s <= 3600),
            "saturation_p99_ms": self.saturation_p99_ms is None or (_number(self.saturation_p99_ms) and 0 < self.saturation_p99_ms < 1e7),
            "collapse": _number(self.collapse) and 0 <= self.collapse <= 0.9,
            "lag_s": _number(self.lag_s) and 0 <= self.lag_s <= INTERVAL_S,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise CalibrationError(f"{bad[0]} is out of range: {getattr(self, bad[0])!r}")

    def apply(self, params: WorldParams) -> WorldParams:
        """`params` with this backend's service model; the operator's static rate keeps its share of the capacity."""
        ratio = self.capacity_tps / params.capacity_tokens
        return replace(
            params,
            capacity_tokens=self.capacity_tps,
            reference_rate=params.reference_rate * ratio,
            base_latency_ms=self.base_latency_ms,
            knee_a=self.knee_a,
            knee_k=self.knee_k,
            base_error_rate=self.base_error_rate,
            error_onset_util=self.error_onset_util,
            error_onset_slope=self.error_onset_slope,
            timeout_s=params.timeout_s if self.timeout_s is None else self.timeout_s,
            knee_rho_cap=self.rho_cap(),
            collapse=self.collapse,
            lag_s=self.lag_s,
            slo_ms=self.slo_ms,
        )

    def rho_cap(self) -> float:
        """The utilisation at which the fitted curve reaches the saturated p99 (the simulator's curve stops there)."""
        grid = np.linspace(0.0, RHO_CAP, 2000)
        if self.saturation_p99_ms is None:
            return RHO_CAP
        reached = service_p99_ms(grid, self.base_latency_ms, self.knee_a, self.knee_k) >= self.saturation_p99_ms
        return float(grid[np.argmax(reached)]) if reached.any() else RHO_CAP

    def to_dict(self) -> dict[str, Any]:
        """The calibration file's content."""
        model = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("quality", "source")}
        return {"schema": SCHEMA, "version": VERSION, "model": model, "quality": dict(self.quality), "source": dict(self.source)}

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """A calibration from a file's content; CalibrationError on anything but a version-1 calibration."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise CalibrationError(f"not a calibration file (expected \"schema\": \"{SCHEMA}\")")
        if data.get("version") != VERSION:
            raise CalibrationError(f"calibration version {data.get('version')!r} is not supported (this ratepilot reads {VERSION})")
        unknown = set(data) - {"schema", "version", "model", "quality", "source"}
        if unknown:
            raise CalibrationError(f"unknown key {sorted(unknown)[0]!r} in the calibration file")
        model = data.get("model")
        names = [f.name for f in fields(cls) if f.name not in ("quality", "source")]
        if not isinstance(model, dict):
            raise CalibrationError("the calibration file has no \"model\" object")
        missing, extra = [n for n in names if n not in model], sorted(set(model) - set(names))
        if missing or extra:
            raise CalibrationError(f"model: missing field {missing[0]!r}" if missing else f"model: unknown field {extra[0]!r}")
        for name in names:
            value = model[name]
            if not (_number(value) or (name in OPTIONAL and value is None)):
                raise CalibrationError(f"model.{name} must be a finite number, got {value!r}")
        quality, source = data.get("quality", {}), data.get("source", {})
        if not isinstance(quality, dict) or not all(_number(v) for v in quality.values()):
            raise CalibrationError("quality must be an object of finite numbers")
        if not isinstance(source, dict) or not all(isinstance(v, str) for v in source.values()):
            raise CalibrationError("source must be an object of strings")
        return cls(**{n: (None if model[n] is None else float(model[n])) for n in names}, quality=quality, source=source)  # type: ignore[arg-type]

    def mlflow_params(self) -> dict[str, float | str]:
        """The fitted model as flat MLflow params (`calibration.*`)."""
        return {f"calibration.{k}": ("none" if v is None else round(v, 6)) for k, v in self.to_dict()["model"].items()}


def p99_from_buckets(bounds_s: np.ndarray, cumulative: np.ndarray, q: float = 0.99) -> np.ndarray:
    """The q-quantile (ms) per row of cumulative bucket counts (rows, buckets) at finite upper bounds `bounds_s`.

    Within the bucket that holds the quantile the survival function is interpolated log-linearly,
    which is exact for an exponential tail; Prometheus' histogram_quantile interpolates linearly,
    which overstates the p99 of an exponential service time by up to ~45 % with the default buckets.
    Past the last finite bound the answer is that bound (as histogram_quantile does); NaN without requests.
    """
    total = cumulative[:, -1]  # the +Inf bucket: every request
    out = np.full(total.shape, np.nan)
    edges = np.concatenate([[0.0], bounds_s])
    target = 1.0 - q
    for i in np.flatnonzero(np.isfinite(total) & (total > 0)):
        survival = np.concatenate([[1.0], 1.0 - cumulative[i, :-1] / total[i]])  # P(latency > edge)
        above = np.flatnonzero(survival <= target)
        if above.size == 0:
            out[i] = edges[-1] * 1000.0
            continue
        j = int(above[0])  # the first edge whose survival is at or below the target: the quantile is below it
        if j == 0:
            out[i] = 0.0
            continue
        s_lo, s_hi = survival[j - 1], max(survival[j], 1e-12)
        share = np.log(s_lo / target) / np.log(s_lo / s_hi) if s_lo > s_hi else 1.0
        out[i] = (edges[j - 1] + share * (edges[j] - edges[j - 1])) * 1000.0
    return out


def pooled_p99(history: History, rho: np.ndarray, bin_width: float = CPU_BIN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(utilisation, p99 ms, answers) per utilisation bin: the p99 of every answer of the bin's steps together.

    A load level's p99 is the p99 of all the requests served at it, bursts included, which is what a
    run's p99 adds up; the p99 of each step alone, averaged, would understate a bursty backend's tail.
    Without buckets in the history: the steps' own p99s.
    """
    h = history
    if h.bucket_rates is None or h.bucket_bounds_s is None:
        return rho, h.p99_ms, np.nan_to_num(h.finished_rps)
    ok = np.isfinite(rho) & np.all(np.isfinite(h.bucket_rates), axis=1)
    bins = np.floor(rho / bin_width).astype(np.int64)
    centres, rows, counts = [], [], []
    for b in np.unique(bins[ok]):
        members = ok & (bins == b)
        pooled = h.bucket_rates[members].sum(axis=0)
        answers = h.bucket_rates[members, -1]
        centres.append(float(np.average(rho[members], weights=answers)) if answers.sum() > 0 else float(rho[members].mean()))
        rows.append(pooled)
        counts.append(pooled[-1] * h.step_s)
    if not rows:
        return np.empty(0), np.empty(0), np.empty(0)
    return np.array(centres), p99_from_buckets(h.bucket_bounds_s, np.array(rows)), np.array(counts)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# -- the fits ------------------------------------------------------------------------------------
class CapacityFit(NamedTuple):
    capacity_tps: float  # the median capacity of the recording
    per_step_tps: np.ndarray  # served / CPU per step (NaN where CPU is too low to say)
    windows: int  # steps the fit used


def fit_capacity(served_tps: np.ndarray, cpu: np.ndarray) -> CapacityFit:
    """Capacity from served work = capacity x CPU, by median regression through the origin."""
    ok = np.isfinite(served_tps) & np.isfinite(cpu) & (cpu >= MIN_CPU) & (served_tps > 0)
    if ok.sum() < MIN_WINDOWS:
        raise CalibrationError(
            f"capacity: only {int(ok.sum())} steps with CPU >= {MIN_CPU:g} and traffic (need {MIN_WINDOWS}); record a busier window"
        )
    model = QuantileRegressor(quantile=0.5, alpha=0.0, fit_intercept=False, solver="highs")
    model.fit(cpu[ok, None], served_tps[ok])
    capacity = float(model.coef_[0])
    if not capacity > 0:
        raise CalibrationError("capacity: served work does not grow with CPU; is the CPU series the backend's?")
    with np.errstate(invalid="ignore", divide="ignore"):
        per_step = np.where(ok, served_tps / cpu, np.nan)
    return CapacityFit(capacity, per_step, int(ok.sum()))


class CurveFit(NamedTuple):
    base_latency_ms: float
    knee_a: float
    knee_k: float
    rel_rmse: float  # weighted RMS relative error of the fitted p99
    windows: int


def fit_latency_curve(rho: np.ndarray, p99_ms: np.ndarray, weight: np.ndarray | None = None) -> CurveFit:
    """p99 = base (1 + a rho^k / (1 - rho)), a >= 0, in relative error; k from KNEE_GRID.

    For a fixed k the model is linear in (base, base x a), so each k is one non-negative linear
    regression weighted by 1 / p99^2 (every point counts by its relative error) and by `weight`.
    """
    weight = np.ones_like(rho) if weight is None else weight
    ok = np.isfinite(rho) & np.isfinite(p99_ms) & np.isfinite(weight) & (rho >= 0) & (rho < CURVE_MAX_RHO) & (p99_ms > 0) & (weight > 0)
    if ok.sum() < MIN_LEVELS:
        raise CalibrationError(
            f"latency curve: only {int(ok.sum())} load levels with a p99 below saturation (need {MIN_LEVELS}); record a wider range of load"
        )
    x, y = rho[ok], p99_ms[ok]
    if x.max() < MIN_PEAK_RHO:
        raise CalibrationError(
            f"latency curve: the backend was never loaded past {x.max():.0%} CPU (need {MIN_PEAK_RHO:.0%}); record a busier window"
        )
    w = weight[ok] / y**2
    best: tuple[float, float, float, float] | None = None
    for k in KNEE_GRID:
        feature = (x**k / (1.0 - x))[:, None]
        model = LinearRegression(positive=True).fit(feature, y, sample_weight=w)
        base, slope = float(model.intercept_), float(model.coef_[0])
        if base <= 0:
            continue
        residual = (model.predict(feature) - y) / y
        err = float(np.sqrt(np.sum(weight[ok] * residual**2) / np.sum(weight[ok])))
        if best is None or err < best[3]:
            best = (base, slope / base, float(k), err)
    if best is None:
        raise CalibrationError("latency curve: no knee fits with a positive idle latency")
    return CurveFit(best[0], best[1], best[2], best[3], int(ok.sum()))


class OnsetFit(NamedTuple):
    onset_util: float  # offered utilisation at the 50 % point (1.0 when no errors were seen)
    slope: float  # 0 when the onset was not identified (no errors, or errors everywhere)
    base_error_rate: float


def fit_error_onset(util: np.ndarray, finished: np.ndarray, errors: np.ndarray) -> OnsetFit:
    """The error share as a logistic function of offered utilisation, fitted on request counts per step."""
    ok = np.isfinite(util) & np.isfinite(finished) & (finished > 0)
    errors = np.clip(np.nan_to_num(errors, nan=0.0), 0.0, None)
    x, n, e = util[ok], finished[ok], np.minimum(errors[ok], finished[ok])
    low = x < LOW_LOAD_RHO
    base = float(e[low].sum() / n[low].sum()) if low.any() else 0.0
    if e.sum() <= 0 or e.sum() >= n.sum():
        return OnsetFit(1.0, 0.0, min(base, 0.5))
    features = np.concatenate([x, x])[:, None]
    labels = np.concatenate([np.ones_like(x), np.zeros_like(x)])
    counts = np.concatenate([e, n - e])
    keep = counts > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(C=1e4, max_iter=2000).fit(features[keep], labels[keep], sample_weight=counts[keep])
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    if slope <= 0:  # errors do not grow with load: an error floor, not an onset
        return OnsetFit(1.0, 0.0, min(float(e.sum() / n.sum()), 0.5))
    return OnsetFit(float(np.clip(-intercept / slope, 0.01, 100.0)), min(slope, 1e4), min(base, 0.5))


def fit_lag(reference: np.ndarray, seen: np.ndarray, step_s: float, max_lag_s: float = MAX_LAG_S) -> float:
    """Seconds by which `seen` trails `reference`: the shift that lines them up best (least squares).

    Minimising the mean squared difference over the overlap is maximising their cross-correlation
    normalised by the overlap; a W-second trailing rate comes out about W / 2 behind, the age of
    what the controller reads. A parabola through the best shift and its neighbours gives fractions of a step.
    """
    ok = np.isfinite(reference) & np.isfinite(seen)
    if ok.sum() < MIN_WINDOWS:
        raise CalibrationError(f"lag: only {int(ok.sum())} steps with both admitted-rate series (need {MIN_WINDOWS})")
    if np.ptp(reference[ok]) == 0:
        raise CalibrationError("lag: the admitted rate never changes in the recording; nothing to line up")
    lags = np.arange(0, min(int(max_lag_s / step_s), int(ok.sum()) - MIN_WINDOWS) + 1)
    mse = np.full(lags.size, np.inf)
    for i, lag in enumerate(lags):
        early, late = reference[: reference.size - lag], seen[lag:]
        both = np.isfinite(early) & np.isfinite(late)
        if both.sum() >= MIN_WINDOWS:
            mse[i] = float(np.mean((late[both] - early[both]) ** 2))
    if not np.isfinite(mse).any():
        raise CalibrationError("lag: the two admitted-rate series never overlap")
    i = int(np.argmin(mse))
    shift = 0.0
    if 0 < i < lags.size - 1 and np.isfinite(mse[i - 1 : i + 2]).all():
        left, mid, right = mse[i - 1], mse[i], mse[i + 1]
        curvature = left - 2 * mid + right
        shift = 0.5 * (left - right) / curvature if curvature > 0 else 0.0
    return float((lags[i] + shift) * step_s)


def served_tps(history: History) -> np.ndarray:
    """Work the backend served per step: admitted tokens less the failed share."""
    h = history
    with np.errstate(invalid="ignore", divide="ignore"):
        error_share = np.where(h.finished_rps > 0, np.nan_to_num(h.error_rps) / h.finished_rps, 0.0)
    return np.asarray(h.admitted_tps * (1.0 - np.clip(error_share, 0.0, 1.0)))


def capacity_series(history: History, capacity_tps: float, span: int = 11) -> np.ndarray:
    """Capacity per step as served / CPU (a rolling median over `span` steps); `capacity_tps` where CPU says nothing."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(history.cpu) & (history.cpu >= MIN_CPU)
        raw = np.where(ok, served_tps(history) / history.cpu, np.nan)
    half = span // 2
    padded = np.pad(raw, half, constant_values=np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(padded, span)
    counts = np.isfinite(windows).sum(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows: filled below
        rolled = np.nanmedian(windows, axis=1)
    return np.where(counts > half, rolled, capacity_tps)


def fit_calibration(
    history: History, slo_ms: float, instant_window_s: float, source: dict[str, str] | None = None
) -> Calibration:
    """Every fit of the module docstring on one recording; CalibrationError when the recording cannot show them."""
    h = history
    steps = h.admitted_tps.size
    if steps < MIN_WINDOWS:
        raise CalibrationError(f"the recording has {steps} steps; need at least {MIN_WINDOWS}")
    with np.errstate(invalid="ignore", divide="ignore"):
        error_share = np.where(h.finished_rps > 0, np.nan_to_num(h.error_rps) / h.finished_rps, 0.0)
    served = served_tps(h)
    capacity = fit_capacity(served, h.cpu)
    clean = error_share <= ERROR_BUDGET
    rho, p99, answers = pooled_p99(h, np.where(clean, h.cpu, np.nan))
    curve = fit_latency_curve(rho, p99, answers)
    # offered utilisation against the capacity of its time (the capacity may have moved): what a replay uses
    capacity_now = capacity_series(h, capacity.capacity_tps)
    onset = fit_error_onset(h.admitted_tps / capacity_now, h.finished_rps * h.step_s, h.error_rps * h.step_s)
    overloaded = (error_share > ERROR_BUDGET) & np.isfinite(h.p99_ms)
    timeout_s = float(np.median(h.p99_ms[overloaded]) / 1000.0) if overloaded.sum() >= 3 else None
    saturated = (h.cpu >= SATURATED_CPU) & np.isfinite(h.p99_ms)
    saturation_p99 = None
    if saturated.sum() >= 3:  # all the answers of the saturated steps together, as for the curve
        _, pooled, _ = pooled_p99(h, np.where(saturated, 1.0, np.nan), bin_width=2.0)
        saturation_p99 = float(pooled[0]) if h.bucket_rates is not None else float(np.median(h.p99_ms[saturated]))
    # a backend that thrashes serves less than its capacity when saturated and refusing work
    overloaded_saturated = overloaded & (h.cpu >= SATURATED_CPU)
    collapse = 0.0
    if overloaded_saturated.sum() >= 3:
        collapse = float(np.clip(1.0 - np.median(served[overloaded_saturated] / capacity_now[overloaded_saturated]), 0.0, 0.9))
    # the controller's view trails by `lag`; the reference itself trails reality by half its window; the
    # simulator's 5 s observation window already trails its tick by half an interval
    lag = fit_lag(h.instant_tps, h.seen_tps, h.step_s) + instant_window_s / 2
    quality = {
        "steps": float(steps),
        "capacity_windows": float(capacity.windows),
        "curve_windows": float(curve.windows),
        "curve_rel_rmse": curve.rel_rmse,
        "observed_lag_s": lag,
        "peak_cpu": float(np.nanmax(h.cpu)) if np.isfinite(h.cpu).any() else 0.0,
        "error_steps": float(np.sum(error_share > 0)),
    }
    return Calibration(
        capacity_tps=capacity.capacity_tps,
        base_latency_ms=curve.base_latency_ms,
        knee_a=curve.knee_a,
        knee_k=curve.knee_k,
        base_error_rate=onset.base_error_rate,
        error_onset_util=onset.onset_util,
        error_onset_slope=onset.slope,
        timeout_s=timeout_s,
        saturation_p99_ms=saturation_p99,
        collapse=collapse,
        lag_s=float(np.clip(lag - INTERVAL_S / 2, 0.0, INTERVAL_S)),
        slo_ms=float(slo_ms),
        quality=quality,
        source=dict(source or {}),
    )

