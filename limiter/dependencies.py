"""The per-route form of `RateLimiter`: FastAPI dependencies that charge a route, or exempt it.

    @app.post("/v1/infer", dependencies=[Depends(limiter.charge(cost=5, tier="pro"))])
    @app.get("/ready", dependencies=[Depends(limiter.exempt())])

A charged route pays its dependency's cost (in the given tier, else the client's) *instead of* what the
config's cost table says: at start-up the middleware finds the app's routes that carry one of these
dependencies (`taken_over_matcher`; routes of a mounted sub-application are not looked into) and passes
their requests on uncharged, the dependency charging them once routed. A refused request raises
`RateLimited`, which the middleware answers with its own 429 (JSON body, `Retry-After`, `RateLimit`
fields); an allowed one gets the `RateLimit-Policy` and `RateLimit` fields on its response.

The client id: the `client` dependency given to `charge` (e.g. an API-key dependency returning the
key, or the authenticated user's name), else the limiter's `client` callable, else the config's
`client_header`; None or "" is the anonymous client.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from fastapi import Depends, Request, Response
from starlette.routing import Match

from limiter.middleware import RateLimited
from limiter.tracing import end_decision_span, start_decision_span
from limiter.verdict import Verdict

if TYPE_CHECKING:
    from limiter.rate_limiter import RateLimiter

MARK = "__ratepilot_route__"  # set on the dependency functions: "charge" or "exempt"


def _header_client(limiter: RateLimiter) -> Callable[[Request], str | None]:
    def header_client(request: Request) -> str | None:
        if limiter.client is not None:
            return limiter.client(request)
        return request.headers.get(limiter.config.client_header)

    return header_client


def charge(
    limiter: RateLimiter, cost: float = 1.0, tier: str | None = None, client: Callable[..., Any] | None = None
) -> Callable[..., Any]:
    """A dependency charging a route `cost` tokens; raises ValueError (one line) for a cost or tier the
    config cannot honour, so a bad route fails at import, not on its first request."""
    config = limiter.config
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost <= 0:
        raise ValueError(f"cost must be a finite number > 0, got {cost!r}")
    if tier is not None and tier not in config.tiers:
        raise ValueError(f"tier {tier!r} is not one of the tiers {sorted(config.tiers)}")
    for name in [tier] if tier is not None else config.tiers:
        tier_config = config.tiers[name]  # type: ignore[index]
        smallest = min(tier_config.client.burst, tier_config.aggregate.burst) * config.local_guard.fraction
        if cost > smallest:
            raise ValueError(f"cost {cost:g} exceeds tier {name!r}'s smallest burst {smallest:g}: it could never pass")
    client_dependency = client if client is not None else _header_client(limiter)
    if not callable(client_dependency):
        raise TypeError("client must be a FastAPI dependency (a callable) returning the client id")
    guard = limiter.guard

    async def charge_route(
        request: Request,
        response: Response,
        client_id: str | None = Depends(client_dependency),  # a default: the annotation is text (PEP 563)
    ) -> Verdict:
        tracer = limiter.tracer
        span = start_decision_span(tracer) if tracer is not None else None
        client = str(client_id).strip() if client_id else ""
        # the named tier, unless a config reload removed it: then the client's own, as the middleware picks it
        tier_name = tier if tier is not None and tier in guard.tiers else guard.tier_for(client).name
        pending = guard.start_in(tier_name, client, float(cost))
        verdict = pending if type(pending) is Verdict else await pending  # type: ignore[misc]
        if span is not None:
            end_decision_span(span, verdict)
        request.scope.setdefault("state", {})["ratepilot"] = verdict
        if not verdict.allowed:
            raise RateLimited(verdict)  # the middleware answers it as its own 429
        response.headers["ratelimit-policy"] = verdict.policy_header.decode("latin-1")
        response.headers["ratelimit"] = verdict.ratelimit_field().decode("latin-1")
        return verdict

    setattr(charge_route, MARK, "charge")
    return charge_route


def exempt() -> Callable[..., Any]:
    """A dependency marking a route as never limited (health and metrics routes)."""

    async def exempt_route() -> None:
        return None

    setattr(exempt_route, MARK, "exempt")
    return exempt_route


def _marked(dependant: Any) -> Iterator[str]:
    for sub in getattr(dependant, "dependencies", ()):
        mark = getattr(sub.call, MARK, None)
        if mark is not None:
            yield mark
        yield from _marked(sub)


def taken_over_matcher(app: Any) -> Callable[[dict[str, Any]], bool] | None:
    """For a FastAPI app (its routers included): a test of whether a request goes to a route carrying a
    `charge` or `exempt` dependency (the middleware passes those on uncharged); None when it has none."""
    routes = tuple(route for route in getattr(app, "routes", ()) if any(_marked(getattr(route, "dependant", None))))
    if not routes:
        return None

    def taken_over(scope: dict[str, Any]) -> bool:
        return any(route.matches(scope)[0] is not Match.NONE for route in routes)

    return taken_over
