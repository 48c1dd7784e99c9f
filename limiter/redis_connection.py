"""`PipelinedConnection`: one Redis connection as an asyncio Protocol, for the request path.

Commands go out as pre-packed RESP bytes in one `transport.write`; replies are parsed by hiredis
straight from `data_received` and handed, in order, to the callback registered with each command.
No task, stream or lock per round trip: at the batch sizes of one event-loop turn the limiter's
own client work, not Redis, was the cost (redis-py's asyncio connection spends several awaits and
stream reads per reply).

A callback receives the reply, a `hiredis.ReplyError` for an error reply, or a `ConnectionError`
when the connection is lost or aborted before its reply came: every registered callback is called
exactly once. Connecting understands `redis://`, `rediss://` and `unix://` URLs (host, port, socket
path, username, password, db, and the `ssl_cert_reqs` / `ssl_ca_certs` / `ssl_check_hostname`
options); other URL options are ignored.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

__all__ = ["PipelinedConnection", "connection_options", "pack_command"]

ReplyCallback = Callable[[Any], None]


def pack_command(*args: str | bytes | int | float) -> bytes:
    """RESP bytes of one command."""
    return bytes(hiredis.pack_command(args))  # type: ignore[arg-type]


def connection_options(url: str) -> dict[str, Any]:
    """What `PipelinedConnection.open` needs from a Redis URL (redis-py's own URL parser)."""
    return dict(parse_url(url))


def _ssl_context(options: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    reqs = options.get("ssl_cert_reqs", "required")
    if reqs in ("none", ssl.CERT_NONE, None):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif str(options.get("ssl_check_hostname", "true")).lower() in ("false", "0", "no"):
        context.check_hostname = False
    return context


class PipelinedConnection(asyncio.Protocol):
    """A Redis connection whose replies are matched to callbacks in send order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._callbacks: deque[ReplyCallback] = deque()
        self._transport: asyncio.Transport | None = None
        self.closed = False

    @classmethod
    async def open(cls, options: dict[str, Any], timeout_s: float) -> PipelinedConnection:
        """Connect, authenticate and select the db within `timeout_s`; raises ConnectionError or TimeoutError."""
        loop = asyncio.get_running_loop()
        connection_class = options.get("connection_class")
        async with asyncio.timeout(timeout_s):
            if connection_class is UnixDomainSocketConnection or "path" in options:
                _, connection = await loop.create_unix_connection(cls, options["path"])
            else:
                tls = _ssl_context(options) if connection_class is SSLConnection else None
                host = options.get("host", "localhost")
                _, connection = await loop.create_connection(cls, host, int(options.get("port", 6379)), ssl=tls)
            try:
                password, username = options.get("password"), options.get("username")
                if password is not None:
                    await connection.request(*(("AUTH", username, password) if username else ("AUTH", password)))
                if options.get("db"):
                    await connection.request("SELECT", int(options["db"]))
            except BaseException:
                connection.abort()
                raise
        return connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """asyncio: connected."""
        self._transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, callbacks: list[ReplyCallback]) -> None:
        """Write pre-packed commands; `callbacks[i]` gets the i-th reply. Raises ConnectionError when closed."""
        if self.closed or self._transport is None:
            raise ConnectionError("redis connection closed")
        self._callbacks.extend(callbacks)
        self._transport.write(data)

    async def request(self, *args: str | bytes | int | float) -> Any:
        """Send one command and await its reply; an error reply raises it (hiredis.ReplyError)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def resolve(reply: Any) -> None:
            if future.done():
                return
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

        self.send(pack_command(*args), [resolve])
        return await future

    def data_received(self, data: bytes) -> None:
        """asyncio: parse every complete reply and hand it to its callback."""
        reader = self._reader
        reader.feed(data)
        callbacks = self._callbacks
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as error:
                self.abort(ConnectionError(f"redis protocol error: {error}"))
                return
            if reply is False:
                return
            if not callbacks:
                self.abort(ConnectionError("redis sent a reply nobody asked for"))
                return
            callbacks.popleft()(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        """asyncio: the connection is gone; every waiting callback gets a ConnectionError."""
        self._fail_all(ConnectionError(f"redis connection lost: {exc!r}" if exc else "redis connection closed"))

    def abort(self, error: Exception | None = None) -> None:
        """Drop the connection now: replies still on their way are never read (they may belong to a timed-out batch)."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        self._fail_all(error or ConnectionError("redis connection aborted"))

    def _fail_all(self, error: Exception) -> None:
        self.closed = True
        callbacks, self._callbacks = self._callbacks, deque()
        for callback in callbacks:
            callback(error)
