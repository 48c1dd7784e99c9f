"""The `limiter.yaml` model (pydantic v2), environment overrides and hot reload.

Load order: the YAML file (path from `--config`, else `RATEPILOT_CONFIG`, else the packaged example
`limiter/limiter.yaml`), then environment variables on top:

    RATEPILOT_REDIS_URL          redis.url
    RATEPILOT_REDIS_TIMEOUT_MS   redis.timeout_ms
    RATEPILOT_RATE_POLL_S        rate_table.poll_s
    RATEPILOT_CLIENT_HEADER      client_header

`ConfigWatcher` polls the file (mtime, size, then content hash); a new file that does not validate
is refused with one log line and the config in force stays.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from limiter.bucket import MAX_CAPACITY, MAX_RATE
from limiter.config_file import apply_env, first_error, parse_mapping
from limiter.grpc_settings import GrpcConfig
from limiter.rls.settings import RlsConfig

log = logging.getLogger("ratepilot.config")

ENV_CONFIG = "RATEPILOT_CONFIG"
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "RATEPILOT_REDIS_URL": ("redis", "url"),
    "RATEPILOT_REDIS_TIMEOUT_MS": ("redis", "timeout_ms"),
    "RATEPILOT_RATE_POLL_S": ("rate_table", "poll_s"),
    "RATEPILOT_CLIENT_HEADER": ("client_header",),
}
TIER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
METHODS = ("*", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BucketConfig(_Strict):
    """Refill rate (tokens/s) and burst capacity (tokens) of one bucket."""

    rate: float = Field(gt=0, le=MAX_RATE, allow_inf_nan=False)
    burst: float = Field(gt=0, le=MAX_CAPACITY, allow_inf_nan=False)


class TierConfig(_Strict):
    """One tier: each client's bucket, the tier's aggregate bucket and what to do when Redis is gone."""

    client: BucketConfig
    aggregate: BucketConfig
    failure_policy: Literal["fail_open", "fail_closed"] = "fail_open"
    key_prefixes: tuple[str, ...] = ()  # API keys starting with one of these belong to this tier
    # shadow: every request is admitted; what the buckets (or fail_closed) would have refused is only
    # counted (ratepilot_shadow_refusals_total), to try a new limit on live traffic
    shadow: bool = Field(default=False, strict=True)


class RouteCost(_Strict):
    """Tokens one request of a method and path costs; a path ending in `*` matches by prefix."""

    method: str = "*"
    path: str
    cost: float = Field(gt=0, allow_inf_nan=False)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        value = value.upper()
        if value not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {value!r}")
        return value

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"path must start with '/', got {value!r}")
        if "*" in value[:-1]:
            raise ValueError(f"'*' is only allowed at the end of a path, got {value!r}")
        return value


class PayloadCost(_Strict):
    """Extra tokens by request size: one per started `bytes_per_token` beyond the first, at most `max_extra`."""

    bytes_per_token: int = Field(default=65536, gt=0)
    max_extra: float = Field(default=0, ge=0, allow_inf_nan=False)


class CostsConfig(_Strict):
    """Weighted costs: route rules (first match wins), a default, and a size surcharge."""

    default: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    routes: tuple[RouteCost, ...] = ()
    payload: PayloadCost = PayloadCost()

    def max_cost(self) -> float:
        """The largest cost any request can be charged."""
        return max([self.default, *(r.cost for r in self.routes)]) + self.payload.max_extra


class RedisConfig(_Strict):
    """Where the bucket state lives and how long a decision may wait for it."""

    url: str = "redis://127.0.0.1:6379/0"
    timeout_ms: float = Field(default=5.0, gt=0, le=10_000, allow_inf_nan=False)
    cluster: bool = False  # url is a seed node of a Redis Cluster (keys of a tier share one slot)
    # checks sent as soon as this many have gathered in a loop turn (the rest at its end): Redis then
    # works while the edge still parses the turn's next requests; a very large value sends one batch per turn
    chunk: int = Field(default=8, ge=1, le=1_000_000)

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, got {value!r}")
        return value


class RateTableConfig(_Strict):
    """How often the controller's rates are read and how far they may move each client's rate."""

    poll_s: float = Field(default=5.0, gt=0, le=3600, allow_inf_nan=False)
    # client rate = configured client rate * min(client_scale_max, tier rate / static tier rate)
    client_scale_max: float = Field(default=1.0, gt=0, le=100, allow_inf_nan=False)


class LocalGuardConfig(_Strict):
    """The in-process bucket used while Redis is unreachable (fail_open tiers)."""

    # share of every configured rate and burst each replica admits on its own during an outage;
    # set it to 1/replicas to keep the fleet total at the configured limit
    fraction: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)


class LimiterConfig(_Strict):
    """Everything `limiter.yaml` holds."""

    redis: RedisConfig = RedisConfig()
    client_header: str = "x-api-key"
    anonymous_tier: str | None = None  # clients without the header share one bucket in this tier
    default_tier: str
    tiers: dict[str, TierConfig]
    clients: dict[str, str] = {}  # API key -> tier (before prefixes)
    costs: CostsConfig = CostsConfig()
    rate_table: RateTableConfig = RateTableConfig()
    local_guard: LocalGuardConfig = LocalGuardConfig()
    exempt_paths: tuple[str, ...] = ("/health", "/metrics")
    rls: RlsConfig = RlsConfig()  # descriptors -> tiers and clients for `ratepilot rls`
    grpc: GrpcConfig = GrpcConfig()  # per-method costs of the gRPC interceptor

    @field_validator("client_header")
    @classmethod
    def _header_token(cls, value: str) -> str:
        if not HEADER_NAME.match(value):
            raise ValueError(f"client_header must be an HTTP header name, got {value!r}")
        return value.lower()

    @model_validator(mode="after")
    def _consistent(self) -> LimiterConfig:
        if not self.tiers:
            raise ValueError("at least one tier is required")
        for name in self.tiers:
            if not TIER_NAME.match(name):
                raise ValueError(f"tier name {name!r} must match {TIER_NAME.pattern}")
        known = set(self.tiers)
        for role, chosen in (("default_tier", self.default_tier), ("anonymous_tier", self.anonymous_tier)):
            if chosen is not None and chosen not in known:
                raise ValueError(f"{role} {chosen!r} is not one of the tiers {sorted(known)}")
        for key, mapped in self.clients.items():
            if mapped not in known:
                raise ValueError(f"client {key!r} maps to unknown tier {mapped!r}")
        self.rls.check_tiers(known)
        self.grpc.check_tiers(known)
        max_cost = max(self.costs.max_cost(), self.grpc.max_cost())
        for name, tier in self.tiers.items():
            smallest = min(tier.client.burst, tier.aggregate.burst) * self.local_guard.fraction
            if max_cost > smallest:
                raise ValueError(
                    f"tier {name!r}: the largest request cost {max_cost:g} exceeds its smallest burst "
                    f"{smallest:g} (times local_guard.fraction): such requests could never pass"
                )
        return self


def parse_config(text: str, environ: Mapping[str, str] | None = None, origin: str = "<config>") -> LimiterConfig:
    """Validate YAML text (plus env overrides); raises ConfigError naming the bad field."""
    try:
        data = parse_mapping(text)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    data = apply_env(data, ENV_OVERRIDES, os.environ if environ is None else environ)
    try:
        return LimiterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {first_error(exc)}") from None


def default_config_path() -> Path:
    """The commented example shipped with the package."""
    return Path(str(resources.files("limiter").joinpath("limiter.yaml")))


def resolve_config_path(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Path:
    """The file to load: the argument, else $RATEPILOT_CONFIG, else the packaged example."""
    env = os.environ if environ is None else environ
    chosen = path or env.get(ENV_CONFIG)
    return Path(chosen) if chosen else default_config_path()


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> LimiterConfig:
    """Read and validate a config file; raises ConfigError."""
    resolved = resolve_config_path(path, environ)
    try:
        text = resolved.read_text()
    except OSError as exc:
        raise ConfigError(f"{resolved}: cannot read: {exc.strerror or exc}") from None
    return parse_config(text, environ, origin=str(resolved))


class ConfigWatcher:
    """Polls one config file and hands every new valid version to the caller; invalid ones are refused."""

    def __init__(self, path: str | os.PathLike[str], current: LimiterConfig, environ: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.current = current
        self._environ = environ
        self._stamp = self._stat()
        self._digest = self._hash()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _hash(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def poll(self) -> LimiterConfig | None:
        """The new config when the file changed and validates; None when unchanged or refused."""
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        if stamp is None:
            log.warning("config file %s disappeared; keeping the config in force", self.path)
            return None
        digest = self._hash()
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            new = load_config(self.path, self._environ)
        except ConfigError as exc:
            log.error("config reload refused, keeping the config in force: %s", exc)
            return None
        if new.redis != self.current.redis:
            log.warning("config reload: redis settings change only on restart; the new tiers and costs apply")
            new = new.model_copy(update={"redis": self.current.redis})
        self.current = new
        log.info("config reloaded from %s", self.path)
        return new
