"""The controller's one settings class: YAML file, then environment variables, validated as a whole.

Load order: the YAML file (`--config`, else `RATEPILOT_CONTROLLER_CONFIG`, else the packaged
`controller/controller.yaml`), then these environment variables on top:

    RATEPILOT_REDIS_URL          redis.url
    RATEPILOT_PROMETHEUS_URL     prometheus.url
    RATEPILOT_ADMIN_TOKEN        admin.token
    RATEPILOT_POLICY_MODEL       policy.model
    RATEPILOT_CONTROLLER_MODE    loop.mode

Settings that cannot work (a lease no longer than its renew deadline, a rate expiry shorter than two
ticks, min > max, a short admin token) are refused at load with the field and the reason.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.parse
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import redis.connection
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from limiter.bucket import MAX_RATE
from limiter.config_file import apply_env, first_error, parse_mapping
from policy.priority import MAX_RESERVE, PriorityGroup
from policy.safety import SafetyLimits

ENV_CONFIG = "RATEPILOT_CONTROLLER_CONFIG"
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "RATEPILOT_REDIS_URL": ("redis", "url"),
    "RATEPILOT_PROMETHEUS_URL": ("prometheus", "url"),
    "RATEPILOT_ADMIN_TOKEN": ("admin", "token"),
    "RATEPILOT_POLICY_MODEL": ("policy", "model"),
    "RATEPILOT_CONTROLLER_MODE": ("loop", "mode"),
}
TIER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MIN_TOKEN_LENGTH = 16
QUERY_NAMES = ("p99_latency_ms", "error_rate", "cpu", "admitted_rps", "throttled_rps")
Rate = float
MAX_POLICY_PARAM = 1e9
# a baseline's constructor argument: a finite JSON number of sane size (not a boolean, not a string)
PolicyParamName = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]{0,63}$")]
PolicyParam = (
    Annotated[int, Field(strict=True, ge=-MAX_POLICY_PARAM, le=MAX_POLICY_PARAM)]
    | Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_POLICY_PARAM, le=MAX_POLICY_PARAM)]
)


class SettingsError(ValueError):
    """Settings that cannot be read or do not validate; the message says which field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(_Strict):
    """Where the rate table lives."""

    url: str = "redis://127.0.0.1:6379/0"
    timeout_s: float = Field(default=2.0, gt=0, le=60, allow_inf_nan=False)  # per command

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        try:  # the parser redis-py itself uses, so what passes here is what the client accepts
            options = redis.connection.parse_url(value)
        except ValueError as exc:
            raise ValueError(f"not a Redis URL ({exc})") from None
        if value.startswith(("redis://", "rediss://")):
            parts = urllib.parse.urlsplit(value)
            if not parts.hostname:
                raise ValueError("not a Redis URL (no host), e.g. redis://127.0.0.1:6379/0")
            if not re.fullmatch(r"/?[0-9]*", parts.path):
                raise ValueError(f"not a Redis URL (the path {parts.path!r} is not a database number)")
        if value.startswith("unix://") and not options.get("path"):
            raise ValueError("not a Redis URL (no socket path), e.g. unix:///run/redis.sock")
        return value


class QuerySettings(_Strict):
    """One PromQL query; the text `{window}` and `{tier_label}` is replaced; `fill` stands in for tiers without a series."""

    expr: str = Field(min_length=1)
    per_tier: bool = True  # False: one value for all tiers (e.g. the backend's CPU)
    fill: float | None = None  # value for tiers the result lacks when the query itself succeeded
    fallback: str | None = Field(default=None, min_length=1)  # raw PromQL for when `expr` answers no tier at all


# The recording rules of deploy/prometheus/rules/recording.yml (group ratepilot.controller) for a
# 15s window; another window names series the deploy does not record, so the raw fallback answers.
RECORDED_P99 = "tier:ratepilot_backend_latency_ms:p99_rate{window}"
RECORDED_ERROR_RATIO = "tier:ratepilot_backend_error_ratio:zero_filled_rate{window}"  # 0, not NaN, without errors
RECORDED_TOKENS = "tier_outcome:ratepilot_decision_tokens:rate{window}"


CPU_OVER_WINDOW = "max(avg_over_time(ratepilot_backend_cpu_utilization[{window}]))"


def raw_queries() -> dict[str, str]:
    """The raw PromQL of each per-tier input (what the recording rules precompute)."""
    tokens = "sum by ({tier_label}) (rate(ratepilot_decision_tokens_total{outcome=\"%s\"}[{window}]))"
    requests = "sum by ({tier_label}) (rate(ratepilot_backend_requests_total[{window}]))"
    errors = "sum by ({tier_label}) (rate(ratepilot_backend_requests_total{outcome=\"error\"}[{window}]))"
    return {
        "p99_latency_ms": "1000 * histogram_quantile(0.99, sum by ({tier_label}, le) "
        "(rate(ratepilot_backend_request_seconds_bucket[{window}])))",
        "error_rate": f"({errors} or 0 * {requests}) / {requests}",
        "admitted_rps": tokens % "allowed",
        "throttled_rps": tokens % "throttled",
    }


def _default_queries() -> dict[str, QuerySettings]:
    # per-tier inputs read the recording rules (5 cheap instant vectors per tick); the raw PromQL
    # answers when the rules are not loaded. The recorded series carry the label `tier`.
    raw = raw_queries()
    return {
        "p99_latency_ms": QuerySettings(expr=RECORDED_P99, fallback=raw["p99_latency_ms"]),
        "error_rate": QuerySettings(expr=RECORDED_ERROR_RATIO, fallback=raw["error_rate"]),
        # averaged over the window like the other inputs: one scrape's gauge is one second of a few workers
        "cpu": QuerySettings(expr=CPU_OVER_WINDOW, per_tier=False),
        "admitted_rps": QuerySettings(expr=RECORDED_TOKENS + '{outcome="allowed"}', fill=0.0, fallback=raw["admitted_rps"]),
        "throttled_rps": QuerySettings(expr=RECORDED_TOKENS + '{outcome="throttled"}', fill=0.0, fallback=raw["throttled_rps"]),
    }


class PrometheusSettings(_Strict):
    """Where the metrics come from and the PromQL that turns them into interval metrics."""

    url: str = "http://127.0.0.1:9090"
    timeout_s: float = Field(default=2.0, gt=0, le=60, allow_inf_nan=False)
    window: str = "15s"  # the rate() window; >= 2 scrape intervals
    tier_label: str = "tier"
    queries: dict[str, QuerySettings] = Field(default_factory=_default_queries)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number in 0..65535
        except ValueError as exc:
            raise ValueError(f"not an http(s) URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL with a host, e.g. http://127.0.0.1:9090")
        return value

    @field_validator("window")
    @classmethod
    def _duration(cls, value: str) -> str:
        if not re.fullmatch(r"\d+(ms|s|m|h)", value):
            raise ValueError("must be a Prometheus duration such as 15s or 1m")
        return value

    @field_validator("tier_label")
    @classmethod
    def _label(cls, value: str) -> str:
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", value):
            raise ValueError("must be a Prometheus label name")
        return value

    @field_validator("queries")
    @classmethod
    def _all_queries(cls, value: dict[str, QuerySettings]) -> dict[str, QuerySettings]:
        merged = {**_default_queries(), **value}
        unknown = set(merged) - set(QUERY_NAMES)
        if unknown:
            raise ValueError(f"unknown queries {sorted(unknown)}; known: {list(QUERY_NAMES)}")
        return merged


class LoopSettings(_Strict):
    """The tick: how often, active or shadow, how long written rates live, how many decisions are kept."""

    tick_interval_s: float = Field(default=5.0, gt=0, le=3600, allow_inf_nan=False)
    mode: Literal["active", "shadow"] = "active"  # shadow: decide and log, never write rates
    rate_ttl_s: float = Field(default=30.0, gt=0, le=86400, allow_inf_nan=False)  # server-clock expiry
    decisions_maxlen: int = Field(default=10_000, ge=1, le=10_000_000)  # ~ cap of the decisions stream
    # while Prometheus or Redis keeps failing the pause between ticks doubles up to this (and never past
    # rate_ttl_s / 2, so rates written meanwhile do not expire); the first good tick restores the interval
    max_backoff_s: float = Field(default=60.0, gt=0, le=3600, allow_inf_nan=False)

    @model_validator(mode="after")
    def _ttl_covers_ticks(self) -> LoopSettings:
        if self.rate_ttl_s < 2 * self.tick_interval_s:
            raise ValueError(
                f"rate_ttl_s ({self.rate_ttl_s:g}) must be at least two ticks ({2 * self.tick_interval_s:g} s), "
                "or the limiters fall back to static rates between ticks"
            )
        return self

    @property
    def backoff_cap_s(self) -> float:
        """The longest pause between ticks while failing: max_backoff_s, at most rate_ttl_s / 2, at least one interval."""
        return max(self.tick_interval_s, min(self.max_backoff_s, self.rate_ttl_s / 2))

    def pause_after(self, failing_ticks: int) -> float:
        """Seconds to the next tick after `failing_ticks` failing ticks in a row (0: the interval)."""
        return min(self.backoff_cap_s, self.tick_interval_s * 2.0 ** min(failing_ticks, 64))


class LeaseSettings(_Strict):
    """Leader election (Kubernetes semantics): lease > renew deadline > retry period."""

    enabled: bool = True
    lease_s: float = Field(default=15.0, gt=0, le=3600, allow_inf_nan=False)  # how long an unrenewed lease lives
    renew_deadline_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)  # leader steps down without a renew
    retry_period_s: float = Field(default=2.0, gt=0, allow_inf_nan=False)  # how often to renew / try to acquire

    @model_validator(mode="after")
    def _timings_can_work(self) -> LeaseSettings:
        if self.lease_s <= self.renew_deadline_s:
            raise ValueError(
                f"lease_s ({self.lease_s:g}) must be longer than renew_deadline_s ({self.renew_deadline_s:g}): "
                "otherwise a follower can take the lease while the old leader still believes it leads"
            )
        if self.renew_deadline_s <= self.retry_period_s:
            raise ValueError(
                f"renew_deadline_s ({self.renew_deadline_s:g}) must be longer than retry_period_s "
                f"({self.retry_period_s:g}): the leader needs at least one renew attempt before its deadline"
            )
        return self


class PolicySettings(_Strict):
    """Which policy decides: `rl` (a model file or MLflow URI) or any baseline by name."""

    name: str = "rl"
    model: str | None = None  # rl only: a .npz path or models:/ratepilot-policy@champion; None = champion or default
    params: dict[PolicyParamName, PolicyParam] = Field(default_factory=dict, max_length=32)  # baseline constructor arguments


CANDIDATE_URI = "models:/ratepilot-policy@candidate"  # what `ratepilot train` registers (training/registry.py)


class CandidateSettings(_Strict):
    """The candidate in shadow: a second policy run on the champion's observations every tick, clamped by
    the same safety engine, its action recorded beside the champion's in the decision stream, its rates
    never written. Off by default; a candidate that does not load is logged, counted and tried again."""

    enabled: bool = False
    name: str = "rl"  # rl or a baseline name, as policy.name
    model: str | None = CANDIDATE_URI  # rl only: a .npz path or MLflow URI; an alias is pinned to its version
    params: dict[PolicyParamName, PolicyParam] = Field(default_factory=dict, max_length=32)  # baseline arguments
    refresh_s: float = Field(default=60.0, gt=0, le=86400, allow_inf_nan=False)  # retry a failed load / follow the alias

    @model_validator(mode="after")
    def _not_the_champion(self) -> CandidateSettings:
        if self.name == "rl" and (self.model is None or self.model.rstrip("/").endswith("@champion")):
            raise ValueError(
                f"candidate.model must name the candidate (e.g. {CANDIDATE_URI}), not the champion: "
                "the champion in shadow beside itself compares nothing"
            )
        return self

    def policy_settings(self, model: str | None = None) -> PolicySettings:
        """The candidate as policy settings (with `model` in place of the configured one when given)."""
        return PolicySettings(name=self.name, model=model or self.model, params=dict(self.params))


class SafetySettings(_Strict):
    """The safety engine's rules shared by all tiers (the per-tier bounds are in `tiers`)."""

    max_up: float = Field(default=1.5, ge=1, le=100, allow_inf_nan=False)
    max_down: float = Field(default=0.5, gt=0, le=1, allow_inf_nan=False)
    brake_p99_over_slo: float = Field(default=3.0, gt=1, le=1000, allow_inf_nan=False)
    brake_error_rate: float = Field(default=0.2, gt=0, le=1, allow_inf_nan=False)
    brake_ratio: float = Field(default=0.5, gt=0, lt=1, allow_inf_nan=False)
    stale_hold_ticks: int = Field(default=3, ge=0, le=10_000)
    stale_decay: float = Field(default=0.2, gt=0, le=1, allow_inf_nan=False)


class TierSettings(_Strict):
    """One tier's aggregate rate: its static safe rate, its bounds, its burst and its latency SLO."""

    static_rate: Rate = Field(gt=0, le=MAX_RATE, allow_inf_nan=False)  # as in limiter.yaml's aggregate rate
    min_rate: Rate = Field(gt=0, le=MAX_RATE, allow_inf_nan=False)
    max_rate: Rate = Field(gt=0, le=MAX_RATE, allow_inf_nan=False)
    burst_s: float = Field(default=2.0, gt=0, le=3600, allow_inf_nan=False)  # burst = rate x burst_s
    slo_ms: float = Field(default=250.0, gt=0, le=3_600_000, allow_inf_nan=False)  # p99 latency objective
    # priority across tiers (policy/priority.py): tiers naming the same backend share the policy's
    # capacity estimate, higher priority served first, weight within one priority, reserve only on the top
    backend: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    priority: int = Field(default=0, strict=True, ge=0, le=1000)
    weight: float = Field(default=1.0, gt=0, le=1e6, allow_inf_nan=False)
    reserve: float = Field(default=0.0, ge=0, le=MAX_RESERVE, allow_inf_nan=False)  # share of the backend lower tiers never take

    @model_validator(mode="after")
    def _ordered(self) -> TierSettings:
        if not self.min_rate <= self.static_rate <= self.max_rate:
            raise ValueError(
                f"need min_rate <= static_rate <= max_rate, got {self.min_rate:g} <= {self.static_rate:g} <= {self.max_rate:g}"
            )
        return self


class AdminSettings(_Strict):
    """The admin REST API: where it listens and who may write."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)
    token: str | None = None  # bearer token for writes; None = writes refused (401)
    protect_reads: bool = False  # True: reads need the token too

    @field_validator("token")
    @classmethod
    def _strong_enough(cls, value: str | None) -> str | None:
        if value is not None and (len(value) < MIN_TOKEN_LENGTH or value.lower() in {"changeme", "changethis"} or value.isspace()):
            raise ValueError(f"admin token must be at least {MIN_TOKEN_LENGTH} characters and not a placeholder")
        return value


class ControllerSettings(_Strict):
    """Everything `ratepilot controller` needs, validated as one."""

    replica_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", min_length=1, max_length=200)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)
    loop: LoopSettings = Field(default_factory=LoopSettings)
    lease: LeaseSettings = Field(default_factory=LeaseSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    candidate: CandidateSettings = Field(default_factory=CandidateSettings)
    safety: SafetySettings = Field(default_factory=SafetySettings)
    tiers: dict[str, TierSettings]
    admin: AdminSettings = Field(default_factory=AdminSettings)

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, value: dict[str, TierSettings]) -> dict[str, TierSettings]:
        if not value:
            raise ValueError("at least one tier is needed")
        bad = [name for name in value if not TIER_NAME.match(name)]
        if bad:
            raise ValueError(f"tier names must match {TIER_NAME.pattern}: {bad[:5]}")
        for tier, t in value.items():
            if (t.priority or t.weight != 1.0 or t.reserve) and t.backend is None:
                raise ValueError(f"tier {tier}: priority, weight and reserve need a backend (the tiers that share it)")
        for backend, members in _by_backend(value).items():
            top = max(t.priority for t in members.values())
            below = [name for name, t in members.items() if t.reserve and t.priority != top]
            if below:
                raise ValueError(f"backend {backend}: only the top priority may hold a reserve, not {below[:5]}")
            reserve = sum(t.reserve for t in members.values())
            if reserve > MAX_RESERVE:
                raise ValueError(f"backend {backend}: the reserves add up to {reserve:g}, more than {MAX_RESERVE:g}")
        return value

    @property
    def tier_names(self) -> list[str]:
        """Tier names in config order (the order of every per-tier array)."""
        return list(self.tiers)

    def tier_array(self, field_name: str) -> np.ndarray:
        """One float per tier of a TierSettings field, in tier order."""
        return np.array([getattr(t, field_name) for t in self.tiers.values()], dtype=np.float64)

    def priority_groups(self) -> list[PriorityGroup]:
        """One group per backend named by the tiers (indices in tier order); empty when no tier names one."""
        index = {name: i for i, name in enumerate(self.tiers)}
        return [
            PriorityGroup(
                backend,
                tiers=np.array([index[name] for name in members]),
                priority=np.array([t.priority for t in members.values()]),
                weight=np.array([t.weight for t in members.values()], dtype=np.float64),
                reserve=sum(t.reserve for t in members.values()),
            )
            for backend, members in _by_backend(self.tiers).items()
        ]

    def safety_limits(self) -> SafetyLimits:
        """The safety engine's limits for these tiers."""
        s = self.safety
        return SafetyLimits(
            min_rate=self.tier_array("min_rate"),
            max_rate=self.tier_array("max_rate"),
            static_rate=self.tier_array("static_rate"),
            max_up=s.max_up,
            max_down=s.max_down,
            brake_p99_over_slo=s.brake_p99_over_slo,
            brake_error_rate=s.brake_error_rate,
            brake_ratio=s.brake_ratio,
            stale_hold_ticks=s.stale_hold_ticks,
            stale_decay=s.stale_decay,
        )


def _by_backend(tiers: Mapping[str, TierSettings]) -> dict[str, dict[str, TierSettings]]:
    groups: dict[str, dict[str, TierSettings]] = {}
    for name, tier in tiers.items():
        if tier.backend is not None:
            groups.setdefault(tier.backend, {})[name] = tier
    return groups


def default_config_text() -> str:
    """The packaged controller.yaml."""
    return resources.files("controller").joinpath("controller.yaml").read_text()


def settings_from_mapping(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> ControllerSettings:
    """Validate a mapping (the parsed YAML) with the environment overrides applied on top."""
    merged = apply_env(data, ENV_OVERRIDES, os.environ if env is None else env)
    try:
        return ControllerSettings.model_validate(merged)
    except ValidationError as exc:
        raise SettingsError(first_error(exc)) from None


def read_config_mapping(path: str | Path | None) -> dict[str, Any]:
    """The YAML mapping in `path` (the packaged default when None); SettingsError naming the file."""
    where = str(path or "controller.yaml")
    try:
        return parse_mapping(Path(path).read_text() if path else default_config_text())
    except OSError as exc:
        raise SettingsError(f"{where}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> ControllerSettings:
    """Read and validate the YAML config (see the module docstring for the order)."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_CONFIG)
    data = read_config_mapping(path)
    try:
        return settings_from_mapping(data, env)
    except SettingsError as exc:
        raise SettingsError(f"{path or 'controller.yaml'}: {exc}") from None
