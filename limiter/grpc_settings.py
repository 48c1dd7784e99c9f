"""The `grpc:` section of `limiter.yaml`: what the gRPC server interceptor charges per method.

    grpc:
      client_metadata: x-api-key          # metadata key holding the client id (missing: anonymous)
      default_cost: 1
      methods:                            # first match wins; a name ending in * matches by prefix
        - {method: /shop.Catalog/Search, cost: 3}
        - {method: /shop.Admin/*, cost: 1, tier: internal}   # tier: charge this tier, not the client's
      exempt: [/grpc.health.v1.Health/*]  # never limited
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

METADATA_KEY = re.compile(r"^[0-9a-z_.-]{1,128}$")  # gRPC metadata keys are lower case; -bin keys are binary


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _method_pattern(value: str) -> str:
    if not value.startswith("/") or "*" in value[:-1]:
        raise ValueError(f"a method must look like /package.Service/Method (a trailing * matches a prefix), got {value!r}")
    return value


class MethodCost(_Strict):
    """Tokens one call of `method` costs, and optionally the tier it is charged to."""

    method: str
    cost: float = Field(gt=0, allow_inf_nan=False)
    tier: str | None = None  # None: the client's tier (clients table, key prefixes, default tier)

    @field_validator("method")
    @classmethod
    def _pattern(cls, value: str) -> str:
        return _method_pattern(value)


class GrpcConfig(_Strict):
    """Per-method limits of `limiter.grpc_interceptor.RateLimitInterceptor`."""

    client_metadata: str = "x-api-key"
    default_cost: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    methods: tuple[MethodCost, ...] = ()
    exempt: tuple[str, ...] = ("/grpc.health.v1.Health/*",)

    @field_validator("client_metadata")
    @classmethod
    def _metadata_key(cls, value: str) -> str:
        value = value.lower()
        if not METADATA_KEY.match(value) or value.endswith("-bin"):
            raise ValueError(f"client_metadata must be a text gRPC metadata key, got {value!r}")
        return value

    @field_validator("exempt")
    @classmethod
    def _exempt(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_method_pattern(item) for item in value)

    def max_cost(self) -> float:
        """The largest cost a call can be charged."""
        return max([self.default_cost, *(m.cost for m in self.methods)])

    def check_tiers(self, known: set[str]) -> None:
        """Raise ValueError naming the first method whose tier is not configured."""
        for index, method in enumerate(self.methods):
            if method.tier is not None and method.tier not in known:
                raise ValueError(f"grpc.methods[{index}]: tier {method.tier!r} is not one of the tiers {sorted(known)}")
