"""`ratepilot rls` in process: a grpc.aio server and client on a real redis-server (descriptor mapping,
batching, failure policies, bad input); tests/limiter/test_rls_envoy.py runs it behind a real Envoy."""

from __future__ import annotations

import asyncio
import socket
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import CollectorRegistry

from limiter.config import ConfigError, load_config, parse_config
from limiter.guard import Guard, Verdict
from limiter.local_bucket import LocalBucket
from limiter.metrics import LimiterMetrics
from limiter.rate_limiter import RateLimiter
from limiter.redis_bucket import RedisBucket
from limiter.rls.server import main, serve
from limiter.rls.service import (
    OK,
    OVER_LIMIT,
    RateLimitService,
    build_response,
    rate_limit,
    response_of,
    status_fields,
)
from ratepilot.servers import RedisServer, free_port
from tests.limiter.support import CONFIG_HEAD, SLOW

CONFIG = CONFIG_HEAD + f"""anonymous_tier: free
default_tier: free
tiers:
  free:
    client:    {{rate: {SLOW}, burst: 3}}
    aggregate: {{rate: {SLOW}, burst: 1000}}
    key_prefixes: [free_]
  pro:
    client:    {{rate: {SLOW}, burst: 6}}
    aggregate: {{rate: {SLOW}, burst: 1000}}
    key_prefixes: [pro_]
  closed:
    client:    {{rate: {SLOW}, burst: 6}}
    aggregate: {{rate: {SLOW}, burst: 1000}}
    failure_policy: fail_closed
rls:
  domain: shop
  rules:
    - {{key: route, value: checkout, tier: closed}}
  max_descriptors: 4
"""
Entry = RateLimitDescriptor.Entry


def descriptor(hits: int | None = None, **entries: str) -> RateLimitDescriptor:
    """A descriptor of the given entries (and hits_addend)."""
    made = RateLimitDescriptor(entries=[Entry(key=k, value=v) for k, v in entries.items()])
    if hits is not None:
        made.hits_addend.value = hits
    return made


def request(*descriptors: RateLimitDescriptor, domain: str = "shop", hits: int = 0) -> Any:
    """A RateLimitRequest."""
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits)


Scenario = Callable[[Any, RateLimiter], Awaitable[Any]]


def run(url: str, scenario: Scenario, config_path: Path | None = None) -> Any:
    """Serve the rls on a grpc.aio server and run `scenario(stub, runtime)` against it (the config
    file at `config_path`, watched every 50 ms, else CONFIG)."""

    async def body() -> Any:
        if config_path is None:
            runtime = RateLimiter(parse_config(textwrap.dedent(CONFIG).replace("REDIS_URL", url)))
        else:
            runtime = RateLimiter(load_config(config_path), config_path=config_path, reload_s=0.05)
        await runtime.start()
        server = grpc.aio.server()
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitService(runtime.guard), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await scenario(rls_pb2_grpc.RateLimitServiceStub(channel), runtime)
        finally:
            await server.stop(None)
            await runtime.stop()

    return asyncio.run(body())


def test_descriptors_map_to_tiers_clients_and_costs(redis_server: RedisServer) -> None:
    async def scenario(stub: Any, _runtime: RateLimiter) -> list[Any]:
        return [
            await stub.ShouldRateLimit(request(descriptor(client_id="free_a", cost="2"))),  # free: 3 - 2
            await stub.ShouldRateLimit(request(descriptor(client_id="free_a"))),  # 1 - 1
            await stub.ShouldRateLimit(request(descriptor(client_id="free_a"))),  # over
            await stub.ShouldRateLimit(request(descriptor(tier="pro", client_id="free_a", hits=5))),  # tier entry: pro, 6 - 5
            await stub.ShouldRateLimit(request(descriptor(route="checkout", tier="pro", client_id="x"), hits=6)),  # rule first
            await stub.ShouldRateLimit(request(descriptor(client_id="free_b"), domain="other")),  # not our domain
        ]

    replies = run(redis_server.url, scenario)
    codes = [[s.code for s in r.statuses] for r in replies]
    assert codes == [[OK], [OK], [OVER_LIMIT], [OK], [OK], [OK]]
    assert [r.statuses[0].limit_remaining for r in replies[:5]] == [1, 0, 0, 1, 0]
    assert [r.statuses[0].current_limit.name for r in replies[:5]] == ["free/client"] * 3 + ["pro/client", "closed/client"]
    refused = replies[2]
    assert refused.overall_code == OVER_LIMIT
    assert refused.statuses[0].duration_until_reset.seconds == 1000  # one token at 0.001 tokens/s
    headers = {h.key: h.value for h in refused.response_headers_to_add}
    assert headers["retry-after"] == "1000"
    assert headers["ratelimit"].startswith('"client";r=0;')
    assert not replies[5].statuses[0].HasField("current_limit")  # another domain: answered OK, not counted


def test_all_descriptors_of_a_request_go_in_one_round_trip(redis_server: RedisServer) -> None:
    async def scenario(stub: Any, runtime: RateLimiter) -> tuple[Any, int]:
        bucket = runtime.guard.redis_bucket
        assert isinstance(bucket, RedisBucket)
        before = bucket.round_trips
        reply = await stub.ShouldRateLimit(
            request(descriptor(client_id="free_a"), descriptor(client_id="free_b", cost="3"), descriptor(client_id="pro_c", cost="7"))
        )
        return reply, bucket.round_trips - before

    reply, round_trips = run(redis_server.url, scenario)
    assert round_trips == 1
    assert [s.code for s in reply.statuses] == [OK, OK, OVER_LIMIT]  # 7 > the pro client's burst of 6
    assert reply.overall_code == OVER_LIMIT


def test_redis_gone_follows_each_tiers_failure_policy(redis_server: RedisServer) -> None:
    async def scenario(stub: Any, _runtime: RateLimiter) -> list[Any]:
        redis_server.stop()
        return [
            await stub.ShouldRateLimit(request(descriptor(client_id="pro_a"))),  # fail_open: the local guard admits
            await stub.ShouldRateLimit(request(descriptor(tier="closed", client_id="x"))),  # fail_closed: refused
        ]

    opened, closed = run(redis_server.url, scenario)
    assert opened.overall_code == OK and opened.statuses[0].limit_remaining == 5
    assert closed.overall_code == OVER_LIMIT
    assert {h.key: h.value for h in closed.response_headers_to_add}["retry-after"] == "1"


def test_an_edited_rls_section_applies_without_a_restart(redis_server: RedisServer, tmp_path: Path) -> None:
    path = tmp_path / "limiter.yaml"
    path.write_text(textwrap.dedent(CONFIG).replace("REDIS_URL", redis_server.url))

    async def scenario(stub: Any, runtime: RateLimiter) -> tuple[Any, Any]:
        before = await stub.ShouldRateLimit(request(descriptor(client_id="free_a", hits=3), domain="shop"))
        path.write_text(path.read_text().replace("domain: shop", "domain: store"))
        deadline = asyncio.get_running_loop().time() + 10
        while runtime.guard.config.rls.domain != "store" and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        after = await stub.ShouldRateLimit(request(descriptor(client_id="free_a"), domain="shop"))
        return before, after

    before, after = run(redis_server.url, scenario, config_path=path)
    assert before.overall_code == OK and before.statuses[0].limit_remaining == 0  # shop was ours: counted
    assert after.overall_code == OK and not after.statuses[0].HasField("current_limit")  # now another domain


def test_a_descriptor_follows_the_clients_table_after_a_reload(redis_server: RedisServer, tmp_path: Path) -> None:
    """Descriptors are remembered per config: a client moved to another tier is charged there at once."""
    path = tmp_path / "limiter.yaml"
    path.write_text(textwrap.dedent(CONFIG).replace("REDIS_URL", redis_server.url))

    async def scenario(stub: Any, runtime: RateLimiter) -> tuple[Any, Any]:
        before = await stub.ShouldRateLimit(request(descriptor(client_id="vip")))  # no prefix: the default tier
        path.write_text(path.read_text() + "clients: {vip: pro}\n")
        deadline = asyncio.get_running_loop().time() + 10
        while not runtime.guard.config.clients and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        after = await stub.ShouldRateLimit(request(descriptor(client_id="vip")))
        return before, after

    before, after = run(redis_server.url, scenario, config_path=path)
    assert (before.statuses[0].current_limit.name, before.statuses[0].limit_remaining) == ("free/client", 2)
    assert (after.statuses[0].current_limit.name, after.statuses[0].limit_remaining) == ("pro/client", 5)


def test_a_remembered_reply_equals_the_reply_built_afresh() -> None:
    """One-descriptor replies are remembered by what they say: each equals the one built from its verdict."""
    config = parse_config(textwrap.dedent(CONFIG).replace("REDIS_URL", "redis://127.0.0.1:1"))
    guard = Guard(config, None, LocalBucket(), LimiterMetrics(CollectorRegistry()))  # no Redis: the local guard decides

    async def verdicts() -> list[Verdict]:
        return [guard.start_in(tier, client, cost) for tier, client, cost in CHECKS]  # type: ignore[misc]

    decided = asyncio.run(verdicts())
    assert [v.allowed for v in decided] == [True, True, False, True, True, False, True]
    for verdict in decided + decided:  # the second pass answers from the remembered replies
        assert build_response([verdict]) == build_reply_afresh(verdict)
    assert len({build_response([v]).SerializeToString() for v in decided}) == len(decided)  # nothing mixed up


# (tier, client, cost): the free client bucket holds 3 (its local-guard share here: 3), pro holds 6
CHECKS = [("free", "a", 1.0), ("free", "a", 1.0), ("free", "a", 2.0), ("pro", "a", 2.0), ("pro", "b", 6.0), ("pro", "b", 1.0), ("free", "b", 3.0)]


def build_reply_afresh(verdict: Verdict) -> Any:
    """The reply of one verdict as the service built it before replies were remembered."""
    return response_of([status_fields(verdict)], [verdict])


def test_too_many_descriptors_is_invalid_argument(redis_server: RedisServer) -> None:
    async def scenario(stub: Any, _runtime: RateLimiter) -> grpc.StatusCode:
        try:
            await stub.ShouldRateLimit(request(*[descriptor(client_id=str(i)) for i in range(5)]))
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    assert run(redis_server.url, scenario) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(5.0, (5, "SECOND")), (0.5, (30, "MINUTE")), (0.001, (3, "HOUR")), (1e-6, (1, "DAY"))],
)
def test_current_limit_uses_the_smallest_unit_holding_a_request(rate: float, expected: tuple[int, str]) -> None:
    limit = rate_limit(rate, "t/client")
    assert (limit.requests_per_unit, rls_pb2.RateLimitResponse.RateLimit.Unit.Name(limit.unit)) == expected


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("rls: {rules: [{key: route, tier: nope}]}", "rls.rules[0]: tier 'nope' is not one of the tiers"),
        ("rls: {client_key: 'has space'}", "descriptor key must match"),
        ("rls: {max_descriptors: 0}", "rls.max_descriptors"),
    ],
)
def test_bad_rls_sections_are_refused_with_a_reason(section: str, message: str) -> None:
    text = "default_tier: a\ntiers: {a: {client: {rate: 1, burst: 1}, aggregate: {rate: 1, burst: 1}}}\n" + section
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(text)


def test_cli_refuses_bad_input_before_serving(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("default_tier: a\ntiers: {}\n")
    assert main(["--config", str(bad), "--port", str(free_port())]) == 2
    assert "at least one tier" in capsys.readouterr().err
    assert main(["--port", "0"]) == 2


def test_a_taken_port_is_refused_before_redis_is_touched() -> None:
    config = parse_config(textwrap.dedent(CONFIG).replace("REDIS_URL", "redis://127.0.0.1:1/0"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        runtime = RateLimiter(config)
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1:"):
            asyncio.run(serve(runtime, f"127.0.0.1:{taken.getsockname()[1]}"))
    assert runtime.guard.redis_bucket is None  # never started
