"""`RateLimitInterceptor`: a grpc.aio server interceptor that limits calls per method on the limiter's buckets.

    runtime = LimiterRuntime(load_config(path), config_path=path)
    await runtime.start()
    server = grpc.aio.server(interceptors=[RateLimitInterceptor(runtime.guard)])

Per call, before the handler runs: the client id is the `grpc.client_metadata` metadata value
(missing: the anonymous client), the cost and optional tier come from the first `grpc.methods`
entry matching the full method name (`/package.Service/Method`; a trailing `*` matches a prefix),
else `grpc.default_cost` and the client's tier. Exempt methods and methods the server does not
have (UNIMPLEMENTED) pass uncharged.

A refused call ends with `RESOURCE_EXHAUSTED` and trailing metadata:

| key                        | value                                                                  |
|----------------------------|------------------------------------------------------------------------|
| `retry-after`              | whole seconds until the call could pass (≥ 1)                          |
| `ratelimit-policy`         | the edge's field: `"client";q=BURST;w=S, "tier";q=BURST;w=S`           |
| `ratelimit`                | the edge's field: `"client";r=LEFT;t=S, "tier";r=LEFT;t=S`             |
| `grpc-status-details-bin`  | `google.rpc.Status` carrying `google.rpc.RetryInfo` (the retry delay), |
|                            | as gRPC's rich error model expects (`grpc_status.rpc_status.from_call`) |

Redis gone: the tier's failure policy decides, as at the edge (fail_open: local guard; fail_closed: refused).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from limiter.grpc_settings import GrpcConfig
from limiter.guard import Guard, Verdict

CACHE_LIMIT = 4096  # distinct method names remembered
Rule = tuple[float, str | None] | None  # (cost, tier or None for the client's tier); None: exempt


def retry_info_status(message: str, retry_after_s: float) -> bytes:
    """`grpc-status-details-bin`: a google.rpc.Status (RESOURCE_EXHAUSTED) with a RetryInfo detail."""
    seconds = math.floor(retry_after_s)
    delay = duration_pb2.Duration(seconds=seconds, nanos=int((retry_after_s - seconds) * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail]).SerializeToString()


class MethodRules:
    """One `grpc:` config compiled: full method name -> its rule (cached)."""

    def __init__(self, config: GrpcConfig):
        self.config = config
        self._cache: dict[str, Rule] = {}

    def rule(self, method: str) -> Rule:
        """(cost, tier) of a method, or None when it is exempt."""
        if method in self._cache:
            return self._cache[method]
        rule: Rule = (self.config.default_cost, None)
        if any(_matches(pattern, method) for pattern in self.config.exempt):
            rule = None
        else:
            for entry in self.config.methods:
                if _matches(entry.method, method):
                    rule = (entry.cost, entry.tier)
                    break
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[method] = rule
        return rule


def _matches(pattern: str, method: str) -> bool:
    return method.startswith(pattern[:-1]) if pattern.endswith("*") else method == pattern


class RateLimitInterceptor(grpc.aio.ServerInterceptor):
    """Checks each call's cost on its client's (or its method's) tier before the handler runs."""

    def __init__(self, guard: Guard):
        self.guard = guard
        self._rules = MethodRules(guard.config.grpc)

    def _method_rules(self) -> MethodRules:
        config = self.guard.config.grpc
        if config is not self._rules.config:  # hot reload
            self._rules = MethodRules(config)
        return self._rules

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Decide the call; a refused one gets a handler that aborts with RESOURCE_EXHAUSTED."""
        rules = self._method_rules()
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        rule = rules.rule(method)
        handler = await continuation(handler_call_details)
        if rule is None or handler is None:  # exempt, or no such method (UNIMPLEMENTED, not charged)
            return handler
        cost, tier = rule
        wanted = rules.config.client_metadata
        client = ""
        for key, value in handler_call_details.invocation_metadata or ():  # type: ignore[attr-defined]
            if key == wanted:
                client = value if isinstance(value, str) else value.decode("latin-1")
                break
        guard = self.guard
        pending = guard.start_in(tier or guard.tier_for(client).name, client, cost)
        verdict = pending if type(pending) is Verdict else await pending  # type: ignore[misc]
        if verdict.allowed:
            return handler
        return _refusing(handler, verdict)


def _refusing(handler: grpc.RpcMethodHandler, verdict: Verdict) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with RESOURCE_EXHAUSTED."""
    retry_after_s = max(1.0, verdict.retry_after_s)
    message = f"rate limit exceeded ({verdict.limited_by}); retry after {math.ceil(retry_after_s)} s"
    trailing = (
        ("retry-after", str(math.ceil(retry_after_s))),
        ("ratelimit-policy", verdict.policy_header.decode()),
        ("ratelimit", verdict.ratelimit_field().decode()),
        ("grpc-status-details-bin", retry_info_status(message, retry_after_s)),
    )

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailing_metadata=trailing)

    options = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **options)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **options)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **options)
    return grpc.unary_unary_rpc_method_handler(refuse, **options)
