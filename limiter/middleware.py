"""`RateLimitMiddleware`: a plain ASGI middleware that rate-limits HTTP requests through a `Guard`.

Every limited response carries the IETF rate-limit fields (draft-ietf-httpapi-ratelimit-headers-10,
structured-field lists with one item per policy, the client bucket and the tier bucket):

    RateLimit-Policy: "client";q=10;w=2, "tier";q=200;w=2     q = burst (tokens), w = s to refill it
    RateLimit: "client";r=7;t=1, "tier";r=180;t=1             r = tokens left, t = s until full again

A refused request gets `429` with a JSON body, `Retry-After` (whole seconds, rounded up) and the same
fields; allowed requests get the fields on their response. The verdict is left in
`scope["state"]["ratepilot"]` for the endpoint (the edge's `/rating` reads it). Each refusal is logged
as one structured record on the `ratepilot.throttle` logger; the API key itself is never logged, only a
fingerprint (first 12 hex digits of its SHA-256).

A tier flagged `shadow: true` is never refused: a request its buckets (or `fail_closed`, or a cost no
bucket holds) would have refused passes to the app with the same headers, and counts in
`ratepilot_shadow_refusals_total{tier}` instead (the decision metrics still say `throttled`).

Mounted with a `RateLimiter` (`app.add_middleware(RateLimitMiddleware, limiter=limiter)`), it also
serves the app's `lifespan` scope: the limiter starts before the app's own start-up and stops after its
shut-down (`RateLimiter.run_lifespan`), and the client id comes from the limiter's `client` callable
when it has one, else from the config's `client_header`. With a tracer provider configured, each
decision is a `ratepilot.limit` span (`limiter/tracing.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from typing import TYPE_CHECKING, Any

from limiter.guard import Guard
from limiter.tracing import end_decision_span, start_decision_span
from limiter.verdict import Verdict

if TYPE_CHECKING:
    from limiter.rate_limiter import RateLimiter

log = logging.getLogger("ratepilot.throttle")

ASGIApp = Any  # (scope, receive, send) -> awaitable; kept loose so any ASGI framework fits


def tenant_fingerprint(client: str) -> str:
    """What logs show for an API key: 'anonymous' or the first 12 hex digits of its SHA-256."""
    return "anonymous" if not client else hashlib.sha256(client.encode()).hexdigest()[:12]


def ratelimit_value(verdict: Verdict) -> bytes:
    """The `RateLimit` field for a verdict."""
    return verdict.ratelimit_field()


def retry_after_value(verdict: Verdict) -> bytes:
    """`Retry-After` in whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(verdict.retry_after_s))).encode()


class RateLimited(Exception):
    """Raised by a route's `charge` dependency when the request is refused; the middleware answers the 429."""

    def __init__(self, verdict: Verdict):
        super().__init__(f"rate limited ({verdict.limited_by})")
        self.verdict = verdict


def client_key_of(client_of: Any, scope: dict[str, Any]) -> bytes:
    """The guard's key for the client id a user callable gives for a request (b"" when anonymous)."""
    from starlette.requests import Request

    client = client_of(Request(scope))
    if not client:
        return b""
    try:
        return str(client).encode("latin-1")  # as a header value would come
    except UnicodeEncodeError:
        return str(client).encode()


class RateLimitMiddleware:
    """Decides each HTTP request with the guard; refused ones get 429, the rest pass with rate-limit headers."""

    def __init__(
        self,
        app: ASGIApp,
        guard: Guard | None = None,
        request_id_header: str = "x-request-id",
        *,
        limiter: RateLimiter | None = None,
    ):
        if not callable(app):
            raise TypeError("app must be an ASGI callable")
        if (guard is None) == (limiter is None):
            raise TypeError("give either a limiter.RateLimiter (limiter=...) or a limiter.guard.Guard")
        if limiter is not None:
            guard = limiter.guard
        if not isinstance(guard, Guard):
            raise TypeError("guard must be a limiter.guard.Guard")
        self.app = app
        self.guard = guard
        self.limiter = limiter  # serves the lifespan scope and names the client when set
        self._client_of = limiter.client if limiter is not None else None
        self._taken_over: Any = None  # scope -> whether a `charge`/`exempt` dependency decides (set at start-up)
        self._request_id_header = request_id_header.lower().encode("latin-1")
        self._config_seen: object = None
        self._refresh()

    def _refresh(self) -> None:
        """Re-read the parts of the config the request path uses (after a hot reload)."""
        config = self.guard.config
        self._config_seen = config
        self._tracer = self.limiter.tracer if self.limiter is not None else None  # checked here, not per request
        self._client_header = config.client_header.encode("latin-1")
        self._exempt = frozenset(config.exempt_paths)
        self._shadow = frozenset(name for name, tier in config.tiers.items() if tier.shadow)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self.limiter is not None:
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if self.guard.config is not self._config_seen:
            self._refresh()
        if scope["path"] in self._exempt:
            await self.app(scope, receive, send)
            return
        if self._taken_over is not None and self._taken_over(scope):
            await self._pass_taken_over(scope, receive, send)
            return
        key = b""
        length = 0
        client_header = self._client_header
        for name, value in scope["headers"]:
            if name == client_header:
                key = value  # decoded and stripped by the guard, once per distinct key
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = 0
        if self._client_of is not None:
            key = client_key_of(self._client_of, scope)
        tracer = self._tracer
        span = start_decision_span(tracer) if tracer is not None else None
        pending = self.guard.start(key, scope["method"], scope["path"], length)
        verdict = pending if type(pending) is Verdict else await pending  # type: ignore[misc]
        if span is not None:
            end_decision_span(span, verdict)
        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state["ratepilot"] = verdict
        if not verdict.allowed:
            if verdict.tier.name not in self._shadow:
                await self._refuse(scope, verdict, send)
                return
            verdict.tier.counters.shadow_refusals += 1  # shadow tier: admitted, counted as the refusal it would be
        def send_with_headers(message: dict[str, Any]) -> Any:
            # returns the inner send's awaitable: no coroutine of its own per message
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"ratelimit-policy", verdict.policy_header),
                    (b"ratelimit", verdict.ratelimit_field()),
                ]
            return send(message)

        await self.app(scope, receive, send_with_headers)

    async def _lifespan(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Run the limiter around the app's lifespan; find the routes whose dependencies decide for themselves."""
        app = scope.get("app")
        if app is not None and hasattr(app, "routes"):
            from limiter.dependencies import taken_over_matcher

            self._taken_over = taken_over_matcher(app)
        assert self.limiter is not None
        await self.limiter.run_lifespan(self.app, scope, receive, send, on_started=self._refresh)

    async def _pass_taken_over(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A route charged (or exempted) by its own dependency: not charged here; its refusal answered here."""
        try:
            await self.app(scope, receive, send)
        except RateLimited as refused:
            await self._refuse(scope, refused.verdict, send)

    async def _refuse(self, scope: dict[str, Any], verdict: Verdict, send: Any) -> None:
        """Answer 429 with a JSON body and log one structured record."""
        request_id = ""
        for name, value in scope["headers"]:
            if name == self._request_id_header:
                request_id = value.decode("latin-1")
                break
        request_id = request_id or uuid.uuid4().hex
        retry_after = retry_after_value(verdict)
        fields = {
            "event": "throttled",
            "request_id": request_id,
            "tenant": tenant_fingerprint(verdict.client),
            "tier": verdict.tier.name,
            "method": scope["method"],
            "path": scope["path"],
            "tokens_needed": verdict.cost,
            "remaining": round(verdict.remaining, 3),
            "retry_after_s": round(verdict.retry_after_s, 3),
            "limited_by": verdict.limited_by,
            "source": verdict.source,
        }
        if log.isEnabledFor(logging.INFO):
            log.info("throttled", extra={"fields": fields})
        body = json.dumps(
            {
                "error": "rate_limited",
                "message": f"rate limit exceeded ({verdict.limited_by}); retry after {retry_after.decode()} s",
                "tier": verdict.tier.name,
                "limited_by": verdict.limited_by,
                "tokens_needed": verdict.cost,
                "remaining": fields["remaining"],
                "retry_after_s": fields["retry_after_s"],
                "request_id": request_id,
            },
            separators=(",", ":"),
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", retry_after),
            (b"ratelimit-policy", verdict.policy_header),
            (b"ratelimit", ratelimit_value(verdict)),
            (b"x-request-id", request_id.encode("latin-1")),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})
