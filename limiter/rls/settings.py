"""The `rls:` section of `limiter.yaml`: how Envoy's rate-limit descriptors map to tiers and clients.

A descriptor is a list of (key, value) entries that Envoy's route actions build (`generic_key`,
`request_headers`, `remote_address`, ...). For each descriptor, in order:

| step | the descriptor holds                      | charged to                                     |
|------|-------------------------------------------|------------------------------------------------|
| 1    | an entry matching a `rules` item          | that rule's tier (first match wins)            |
| 2    | an entry `tier_key` naming a tier         | that tier                                      |
| 3    | neither                                   | the client's tier, as the edge decides it      |

The client id is the value of the `client_key` entry (missing: the anonymous client). The cost in
tokens is the value of the `cost_key` entry (a positive number; Envoy's route action
`generic_key: {descriptor_key: cost, descriptor_value: "3"}`), else the descriptor's `hits_addend`,
else the request's, else 1. (Envoy 1.40's HTTP ratelimit filter does not send a route's
`hits_addend`, hence the entry.)
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

ENTRY_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _entry_key(value: str) -> str:
    if not ENTRY_KEY.match(value):
        raise ValueError(f"a descriptor key must match {ENTRY_KEY.pattern}, got {value!r}")
    return value


class DescriptorRule(_Strict):
    """Descriptors holding the entry `key` (with exactly `value`, when given) are charged to `tier`."""

    key: str
    value: str | None = None
    tier: str

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        return _entry_key(value)


class RlsConfig(_Strict):
    """Descriptor mapping of `ratepilot rls` (validated against the tiers by the limiter config)."""

    domain: str | None = None  # only requests of this domain are limited (the rest get OK); None: any
    tier_key: str | None = "tier"  # entry whose value names the tier
    client_key: str = "client_id"  # entry whose value is the client id
    cost_key: str | None = "cost"  # entry whose value is the cost in tokens
    rules: tuple[DescriptorRule, ...] = ()  # checked before tier_key, first match wins
    max_descriptors: int = Field(default=16, ge=1, le=256)  # more in one request: INVALID_ARGUMENT

    @field_validator("tier_key", "client_key", "cost_key")
    @classmethod
    def _keys(cls, value: str | None) -> str | None:
        return None if value is None else _entry_key(value)

    def check_tiers(self, known: set[str]) -> None:
        """Raise ValueError naming the first rule whose tier is not configured."""
        for index, rule in enumerate(self.rules):
            if rule.tier not in known:
                raise ValueError(f"rls.rules[{index}]: tier {rule.tier!r} is not one of the tiers {sorted(known)}")
