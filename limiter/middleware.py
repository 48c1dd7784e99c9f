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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from typing import Any

from limiter.guard import Guard
from limiter.verdict import Verdict

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


class RateLimitMiddleware:
    """Decides each HTTP request with the guard; refused ones get 429, the rest pass with rate-limit headers."""

    def __init__(self, app: ASGIApp, guard: Guard, request_id_header: str = "x-request-id"):
        if not callable(app):
            raise TypeError("app must be an ASGI callable")
        if not isinstance(guard, Guard):
            raise TypeError("guard must be a limiter.guard.Guard")
        self.app = app
        self.guard = guard
        self._request_id_header = request_id_header.lower().encode("latin-1")
        self._config_seen: object = None
        self._refresh()

    def _refresh(self) -> None:
        """Re-read the parts of the config the request path uses (after a hot reload)."""
        config = self.guard.config
        self._config_seen = config
        self._client_header = config.client_header.encode("latin-1")
        self._exempt = frozenset(config.exempt_paths)
        self._shadow = frozenset(name for name, tier in config.tiers.items() if tier.shadow)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.guard.config is not self._config_seen:
            self._refresh()
        if scope["path"] in self._exempt:
            await self.app(scope, receive, send)
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
        pending = self.guard.start(key, scope["method"], scope["path"], length)
        verdict = pending if type(pending) is Verdict else await pending  # type: ignore[misc]
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
