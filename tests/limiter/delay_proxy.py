"""`DelayProxy`: a TCP proxy for tests that holds every reply back by a set delay (no netem on this kernel).

Bytes from the client go upstream at once; every chunk the upstream sends back is delivered to the
client `reply_delay_s` after it arrived, in order. So a Redis behind it stays healthy and runs each
command at once, while its clients see every reply late: a slow network or a slow-to-answer server,
not a dead one. The delay can be changed while connections are open (it applies to replies that
arrive afterwards). The proxy runs its own asyncio loop in a daemon thread; `connections` counts the
TCP connections it accepted (each a connection attempt of some client).

    with DelayProxy(redis_server.port) as proxy:
        client = redis.Redis.from_url(proxy.url)
        proxy.reply_delay_s = 0.5
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType

CHUNK = 65536


class DelayProxy:
    """Listens on a free 127.0.0.1 port and forwards to `upstream_port`, replies held back `reply_delay_s`."""

    def __init__(self, upstream_port: int, reply_delay_s: float = 0.0, upstream_host: str = "127.0.0.1"):
        if not reply_delay_s >= 0:
            raise ValueError(f"reply_delay_s must be >= 0, got {reply_delay_s!r}")
        self.upstream = (upstream_host, upstream_port)
        self.reply_delay_s = reply_delay_s
        self.connections = 0  # TCP connections accepted since start
        self.port = 0  # known once started
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        """redis:// URL of the proxy (db 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> DelayProxy:
        """Listen, in the proxy's own thread; returns once the port accepts connections."""
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop
        ).result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop listening, close every open connection, end the thread."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:  # the proxy's own loop: every other task is a connection of it
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()  # upstream down: the client sees its connection closed
            return
        try:
            await asyncio.gather(
                self._pipe(client_reader, upstream_writer, delayed=False),
                self._pipe(upstream_reader, client_writer, delayed=True),
            )
        except asyncio.CancelledError:
            pass  # stop(): ends quietly (asyncio's stream callback would report a cancelled task as an error)
        finally:
            client_writer.close()
            upstream_writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool) -> None:
        """Copy until EOF, then close the writer (the other side sees EOF: both halves end together)."""
        try:
            if delayed:
                await self._copy_delayed(reader, writer)
            else:
                while data := await reader.read(CHUNK):
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _copy_delayed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Each chunk leaves `reply_delay_s` after it came, in order; EOF too, once the chunks before it are out."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    return
                writer.write(data)
                await writer.drain()

        sender = loop.create_task(deliver())
        try:
            while True:
                data = await reader.read(CHUNK)
                queue.put_nowait((loop.time() + self.reply_delay_s, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender
