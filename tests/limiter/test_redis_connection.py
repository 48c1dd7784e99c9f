"""The request path's own Redis connection: replies in order, errors in place, AUTH and db from the URL."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import hiredis
import pytest

from limiter.bucket import BucketSpec
from limiter.redis_bucket import RedisBucket
from limiter.redis_connection import PipelinedConnection, connection_options, pack_command
from ratepilot.servers import RedisServer


def test_replies_reach_their_callbacks_in_order_errors_in_place_and_loss_once(redis_server: RedisServer) -> None:
    """Pipelined commands: each callback gets its own reply, an error reply as a ReplyError, a lost connection once."""

    async def scenario() -> tuple[list[Any], list[Any]]:
        connection = await PipelinedConnection.open(connection_options(redis_server.url), 1.0)
        replies: list[Any] = []
        done = asyncio.get_running_loop().create_future()

        def collect(reply: Any) -> None:
            replies.append(reply)
            if len(replies) == 4:
                done.set_result(None)

        packed = b"".join(
            [pack_command("SET", "k", "v"), pack_command("INCR", "k"), pack_command("GET", "k"), pack_command("PING")]
        )
        connection.send(packed, [collect] * 4)
        await asyncio.wait_for(done, 2.0)
        lost: list[Any] = []
        connection.send(pack_command("BLPOP", "nothing", 0), [lost.append])  # never answered
        connection.abort()
        with pytest.raises(ConnectionError):
            connection.send(pack_command("PING"), [lost.append])
        return replies, lost

    replies, lost = asyncio.run(scenario())
    assert replies[0] == b"OK" and isinstance(replies[1], hiredis.ReplyError) and replies[2] == b"v"
    assert replies[3] == b"PONG"
    assert len(lost) == 1 and isinstance(lost[0], ConnectionError)


def test_password_and_db_from_the_url_are_used(tmp_path: Path) -> None:
    """A bucket on `redis://:secret@host:port/3` authenticates and keeps its buckets in db 3."""
    server = RedisServer(workdir=tmp_path, extra_args=["--requirepass", "secret"])
    server.start()
    try:
        url = f"redis://:secret@127.0.0.1:{server.port}/3"

        async def scenario() -> tuple[bool, Any, Any]:
            bucket = RedisBucket.from_url(url, timeout_s=1.0)
            await bucket.warm_up()
            allowed, _ = await bucket.check(["rp:{t}:c:a"], [BucketSpec(1e-3, 5)], 1)
            probe = await PipelinedConnection.open(connection_options(url), 1.0)
            in_db3 = await probe.request("EXISTS", "rp:{t}:c:a")
            await probe.request("SELECT", 0)
            in_db0 = await probe.request("EXISTS", "rp:{t}:c:a")
            probe.abort()
            await bucket.aclose()
            return allowed, in_db3, in_db0

        allowed, in_db3, in_db0 = asyncio.run(scenario())
        assert allowed and in_db3 == 1 and in_db0 == 0

        async def wrong_password() -> None:
            with pytest.raises(hiredis.ReplyError):
                await PipelinedConnection.open(connection_options(f"redis://:wrong@127.0.0.1:{server.port}/0"), 1.0)

        asyncio.run(wrong_password())
    finally:
        server.stop()


def test_bucket_over_a_unix_socket_url(tmp_path: Path) -> None:
    """`unix://PATH?db=2` (allowed by limiter.yaml) reaches a redis-server on its socket, db 2."""
    socket_path = tmp_path / "redis.sock"
    server = RedisServer(workdir=tmp_path, extra_args=["--unixsocket", str(socket_path), "--unixsocketperm", "700"])
    server.start()
    try:
        url = f"unix://{socket_path}?db=2"

        async def scenario() -> tuple[list[bool], Any]:
            bucket = RedisBucket.from_url(url, timeout_s=1.0)
            await bucket.warm_up()
            outcomes = [(await bucket.check(["rp:{t}:c:u"], [BucketSpec(1e-3, 2)], 1))[0] for _ in range(3)]
            probe = await PipelinedConnection.open(connection_options(url), 1.0)
            in_db2 = await probe.request("EXISTS", "rp:{t}:c:u")
            probe.abort()
            await bucket.aclose()
            return outcomes, in_db2

        outcomes, in_db2 = asyncio.run(scenario())
        assert outcomes == [True, True, False] and in_db2 == 1
    finally:
        server.stop()
