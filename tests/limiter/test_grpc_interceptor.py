"""The grpc.aio server interceptor: a real grpc server and client on a real redis-server."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from limiter.config import ConfigError, parse_config
from limiter.grpc_interceptor import RateLimitInterceptor
from limiter.rate_limiter import RateLimiter
from ratepilot.servers import RedisServer
from tests.limiter.support import FREE_TIER_HEAD, SLOW

CONFIG = FREE_TIER_HEAD + f"""  internal:
    client:    {{rate: {SLOW}, burst: 50}}
    aggregate: {{rate: {SLOW}, burst: 1000}}
    failure_policy: fail_closed
grpc:
  client_metadata: x-api-key
  methods:
    - {{method: /test.Echo/Heavy, cost: 3}}
    - {{method: /test.Admin/*, cost: 1, tier: internal}}
  exempt: [/test.Echo/Health]
"""


async def echo(request: bytes, _context: Any) -> bytes:
    """Unary: the request back."""
    return request


async def count(request: bytes, _context: Any) -> AsyncIterator[bytes]:
    """Server streaming: three messages."""
    for i in range(3):
        yield request + str(i).encode()


HANDLERS = {
    "/test.Echo/Say": echo, "/test.Echo/Heavy": echo, "/test.Echo/Health": echo, "/test.Admin/Reset": echo,
}  # fmt: skip


class Client:
    """Raw-bytes calls on a grpc.aio channel, returning (status code, trailing metadata dict)."""

    def __init__(self, channel: grpc.aio.Channel):
        self.channel = channel

    async def call(self, method: str, key: str | None = None) -> tuple[grpc.StatusCode, dict[str, Any]]:
        """One unary call as `key`."""
        metadata = (("x-api-key", key),) if key else None
        try:
            await self.channel.unary_unary(method)(b"hi", metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code(), dict(error.trailing_metadata() or ())
        return grpc.StatusCode.OK, {}

    async def stream(self, key: str) -> tuple[grpc.StatusCode, list[bytes]]:
        """The server-streaming call as `key`."""
        got: list[bytes] = []
        try:
            async for message in self.channel.unary_stream("/test.Echo/Count")(b"n", metadata=(("x-api-key", key),), timeout=10):
                got.append(message)
        except grpc.aio.AioRpcError as error:
            return error.code(), got
        return grpc.StatusCode.OK, got


def run(url: str, scenario: Callable[[Client], Awaitable[Any]]) -> Any:
    """A grpc.aio server with the interceptor (raw-bytes handlers), and `scenario(client)` against it."""

    async def body() -> Any:
        runtime = RateLimiter(parse_config(textwrap.dedent(CONFIG).replace("REDIS_URL", url)))
        await runtime.start()
        server = grpc.aio.server(interceptors=[RateLimitInterceptor(runtime.guard)])
        handlers: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for full, function in HANDLERS.items():
            service, method = full[1:].split("/")
            handlers.setdefault(service, {})[method] = grpc.unary_unary_rpc_method_handler(function)
        handlers["test.Echo"]["Count"] = grpc.unary_stream_rpc_method_handler(count)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(s, m) for s, m in handlers.items()])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await scenario(Client(channel))
        finally:
            await server.stop(None)
            await runtime.stop()

    return asyncio.run(body())


def test_calls_pay_their_method_cost_then_get_resource_exhausted_with_retry_info(redis_server: RedisServer) -> None:
    async def scenario(client: Client) -> list[tuple[grpc.StatusCode, dict[str, Any]]]:
        calls = [await client.call("/test.Echo/Heavy", "free_a")]  # 5 - 3
        calls += [await client.call("/test.Echo/Say", "free_a") for _ in range(3)]  # 1, 0, refused
        calls.append(await client.call("/test.Echo/Heavy", "free_b"))  # another client: its own bucket
        calls += [await client.call("/test.Echo/Health", "free_a") for _ in range(3)]  # exempt
        calls += [await client.call("/test.Echo/Nope", "free_b") for _ in range(3)]  # no such method: not charged
        calls.append(await client.call("/test.Echo/Say", "free_b"))  # free_b: 5 - 3 - 1
        return calls

    calls = run(redis_server.url, scenario)
    codes = [code for code, _ in calls]
    ok, exhausted = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
    unimplemented = grpc.StatusCode.UNIMPLEMENTED
    assert codes == [ok, ok, ok, exhausted, ok, ok, ok, ok, unimplemented, unimplemented, unimplemented, ok]
    trailing = calls[3][1]
    assert trailing["retry-after"] == "1000"  # one token at 0.001 tokens/s
    assert trailing["ratelimit"].startswith('"client";r=0;')
    assert trailing["ratelimit-policy"] == '"client";q=5;w=5000, "tier";q=1000;w=1000000'
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    assert status.code == 8  # google.rpc.Code.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    delay_s = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    assert 990 < delay_s <= 1000  # the exact wait: one token minus what refilled since the bucket emptied


def test_streaming_calls_are_limited_too(redis_server: RedisServer) -> None:
    async def scenario(client: Client) -> list[tuple[grpc.StatusCode, list[bytes]]]:
        return [await client.stream("free_s") for _ in range(6)]

    results = run(redis_server.url, scenario)
    assert [code for code, _ in results] == [grpc.StatusCode.OK] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert results[0][1] == [b"n0", b"n1", b"n2"] and results[5][1] == []


def test_redis_gone_follows_the_tier_failure_policy(redis_server: RedisServer) -> None:
    async def scenario(client: Client) -> list[grpc.StatusCode]:
        before = (await client.call("/test.Admin/Reset", "free_a"))[0]
        redis_server.stop()
        return [
            before,
            (await client.call("/test.Echo/Say", "free_a"))[0],  # free is fail_open: the local guard admits
            (await client.call("/test.Admin/Reset", "free_a"))[0],  # the method's tier is fail_closed
        ]

    assert run(redis_server.url, scenario) == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("grpc: {methods: [{method: Say, cost: 1}]}", "a method must look like /package.Service/Method"),
        ("grpc: {methods: [{method: /a.B/C, cost: 1, tier: nope}]}", "grpc.methods[0]: tier 'nope'"),
        ("grpc: {methods: [{method: /a.B/C, cost: .nan}]}", "grpc.methods.0.cost"),
        ("grpc: {methods: [{method: /a.B/C, cost: 50}]}", "the largest request cost 50 exceeds"),
        ("grpc: {client_metadata: key-bin}", "text gRPC metadata key"),
    ],
)
def test_bad_grpc_sections_are_refused_with_a_reason(section: str, message: str) -> None:
    text = "default_tier: a\ntiers: {a: {client: {rate: 1, burst: 10}, aggregate: {rate: 1, burst: 10}}}\n" + section
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_config(text)
