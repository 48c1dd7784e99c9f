"""`RedisBucket`: asyncio token buckets on Redis, one atomic Lua check-and-consume per request.

`await bucket.check(keys, specs, cost)` returns `(allowed, [Decision per key])`; the guard uses
`submit_to()` so the verdict is built as the reply is read. Bad input raises `BucketError` before
anything is sent (`limiter/check_encoding.py` encodes the check); every Redis failure becomes
`RedisUnavailable`. A check that failed or timed out is never sent again (it may have run); only a
check answered NOSCRIPT (it did not run) is resent, after loading the script once. After a
connection failure or timeout the bucket stops calling Redis for a short, growing back-off window in
which checks fail at once, so callers fall back immediately and a dead Redis sees a trickle of probes.

Every check arriving in the same event-loop turn goes out in one round trip. On a single Redis the
round trip is ONE EVALSHA deciding the checks one after the other (each still atomic), written on the
bucket's own `PipelinedConnection`; on a Redis Cluster it is redis-py's cluster pipeline, one EVALSHA
per check (`limiter/redis_cluster.py`). Keys of one check must share a hash tag
(`rp:{TIER}:c:CLIENT` with `rp:{TIER}:tier`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import hiredis
import redis.asyncio
from redis.exceptions import RedisError

from limiter.backoff import Backoff
from limiter.bucket import BucketSpec, Decision
from limiter.check_encoding import (
    MAX_BATCH,
    SCRIPT,
    EncodedCheck,
    RawOutcome,
    ScriptResult,
    decisions_from_tokens,
    encode_check,
    packed_batch,
    script_result,
    split_reply,
)
from limiter.errors import RedisUnavailable
from limiter.pending_checks import Pending, Resolver, fail, resolver_failed, settle
from limiter.redis_clients import (
    CONNECTION_ERRORS,
    DEFAULT_TIMEOUT_S,
    check_no_retries,
    is_noscript,
    make_async_client,
)
from limiter.redis_cluster import ClusterRoundTrips
from limiter.redis_connection import PipelinedConnection, pack_command

log = logging.getLogger("ratepilot.redis_bucket")

__all__ = ["RedisBucket", "Resolver"]

_CHECK = itemgetter(0)  # a Pending's check
_SCRIPT_LOAD = pack_command("SCRIPT", "LOAD", SCRIPT)


class _Abandoned(ConnectionError):
    """The bucket dropped the connection itself (a batch timed out, or the bucket closed)."""


class _Batch:
    """Checks sent in one write on the bucket's connection: one EVALSHA per group, replies in order."""

    __slots__ = (
        "bucket", "connection", "groups", "sizes", "answered", "epoch", "resent", "deadline", "noscript", "lost", "timed_out",
    )  # fmt: skip

    def __init__(
        self, bucket: RedisBucket, connection: PipelinedConnection, groups: list[list[Pending]], sizes: list[int], resent: bool
    ):
        self.bucket = bucket
        self.connection = connection
        self.groups = groups
        self.sizes = sizes  # per group, the reply length when every check is answered: 1 + per check 1 + keys
        self.answered = 0  # groups whose reply (or failure) came
        self.epoch = bucket.script_epoch
        self.resent = resent  # already resent once after NOSCRIPT
        self.deadline = 0.0  # loop time after which the batch has timed out (the bucket's watchdog checks it)
        self.noscript: list[Pending] = []
        self.lost: Exception | None = None
        self.timed_out = False

    def on_reply(self, reply: Any) -> None:
        """The reply of the next group: results to the futures, or the error each check met."""
        group = self.groups[self.answered]
        self.answered += 1
        if type(reply) is list:
            if len(reply) == self.sizes[self.answered - 1]:  # every check answered: split_reply() inlined
                now_us = reply[0]
                at = 1
                for item in group:
                    check, future, resolve, context = item
                    end = at + 1 + len(check.keys)
                    outcome = (reply[at] == 1, reply[at + 1 : end], now_us)
                    at = end
                    if resolve is not None and not future.done():
                        try:  # settle() inlined for the guard's checks (hot path: one call less per request)
                            resolve(future, context, outcome)
                        except Exception as error:
                            resolver_failed(item, error)
                    else:
                        settle(item, outcome)
            else:  # some check met an error (its answer is one element), or a malformed reply
                for item, answer in zip(group, split_reply(reply, list(map(_CHECK, group))), strict=True):
                    settle(item, answer)
        elif is_noscript(reply):
            self.noscript.extend(group)  # they did not run: safe to resend
        elif isinstance(reply, ConnectionError):
            self.lost = reply
            fail(group, f"redis unreachable: {reply}")
        else:  # an error reply for the whole script (OOM, BUSY...): Redis answered, these checks failed
            fail(group, f"redis refused the checks: {reply!r:.200}")
        if self.answered == len(self.groups):
            self.bucket._finished(self)

    def on_timeout(self) -> None:
        """Deadline passed: fail what is unanswered and drop the connection (late replies must never be read)."""
        self.timed_out = True
        bucket = self.bucket
        fail([item for group in self.groups[self.answered :] for item in group], f"redis slower than {bucket.timeout_s:g} s")
        bucket.backoff.failure()
        self.connection.abort(_Abandoned("a batch timed out"))


class RedisBucket:
    """Asyncio check-and-consume on Redis that coalesces the checks of one event-loop turn.

    `await check(keys, specs, cost)` returns `(allowed, [Decision per key])` or raises
    `RedisUnavailable`, or `BucketError` at once for bad input. At most `max_in_flight` round trips
    are outstanding; checks arriving meanwhile gather into the next one. On a single Redis a turn's
    checks go out as soon as `chunk` of them have gathered (while a round trip is free), the rest at
    the end of the turn, so Redis decides the first requests of a turn while the edge still parses
    the next ones (docs/limiter.md, "Why the request path looks as it does"). A bucket belongs to
    the event loop that first uses it.

    A batch's deadline is `timeout_s` after it is sent plus how long its checks waited to be sent
    (an allowance for our own loop's lag: the timeout is meant for Redis). Checks that waited longer
    than `max_lag_s` are failed unsent. The connection of a timed-out batch is dropped (its late
    replies are never read), so checks behind it fail at once and the next probe after the back-off
    reconnects.
    """

    def __init__(
        self,
        client: Any,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_in_flight: int = 4,
        chunk: int = 8,
        backoff: Backoff | None = None,
        max_lag_s: float = 0.05,
    ):
        if not (timeout_s > 0 and max_lag_s > 0) or max_in_flight < 1 or chunk < 1:
            raise ValueError("timeout_s and max_lag_s must be positive, max_in_flight and chunk at least 1")
        check_no_retries(client)
        self.client = client
        self.timeout_s = timeout_s
        self.max_lag_s = max_lag_s
        self.max_in_flight = max_in_flight
        self.backoff = backoff or Backoff()
        self.script_loads = 0  # SCRIPT LOADs sent (on connect, and once per NOSCRIPT episode)
        self.round_trips = 0  # pipelines sent to Redis, connection attempts of the request path included
        self._pending: list[Pending] = []
        self._pending_since = 0.0  # loop time the oldest pending check was asked
        self._flush_scheduled = False
        self._in_flight = 0
        self.script_epoch = 0  # bumped by every SCRIPT LOAD
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._out: list[_Batch] = []  # batches sent on the connection and not yet finished, in send order
        self._watchdog: asyncio.TimerHandle | None = None  # fires at the earliest deadline of `_out`
        self._watchdog_at = 0.0
        # Single Redis: our own pipelined connection, opened with the client's connection settings.
        self._options: dict[str, Any] | None = None
        if isinstance(client, redis.asyncio.Redis):
            pool = client.connection_pool
            self._options = {**pool.connection_kwargs, "connection_class": pool.connection_class}
        # checks that go out before the turn ends; off on a cluster, whose pipelines of one turn
        # may run in any order across nodes and connections
        self.chunk = chunk if self._options is not None else 1 << 62
        self._connection: PipelinedConnection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._cluster = ClusterRoundTrips(self) if self._options is None else None

    def script_loaded(self) -> None:
        """Count a SCRIPT LOAD (sent, or done): batches that went out before it may still meet NOSCRIPT."""
        self.script_loads += 1
        self.script_epoch += 1

    def round_trip_done(self) -> None:
        """A cluster round trip finished: free its slot and send what gathered meanwhile."""
        self._in_flight -= 1
        self._schedule_flush()

    @classmethod
    def from_url(
        cls, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, cluster: bool = False, **options: Any
    ) -> RedisBucket:
        """A bucket on a new asyncio client for `url` (`cluster=True` for a Redis Cluster seed node)."""
        return cls(make_async_client(url, timeout_s, cluster), timeout_s=timeout_s, **options)

    async def warm_up(self, timeout_s: float = 1.0) -> None:
        """Load the script and open the connection now, so the first checks need no connect.

        Call it at start-up (a cold connect alone can exceed a 5 ms check timeout). Raises
        RedisUnavailable when Redis cannot be reached within `timeout_s`; checks then fail
        over as usual and connect later.
        """
        try:
            if self._options is not None:
                await self._open(timeout_s)
                return
            async with asyncio.timeout(timeout_s):
                await self.client.script_load(SCRIPT)
                self.script_loaded()
                if hasattr(self.client, "initialize"):
                    await self.client.initialize()  # cluster: discover the slots of every node
        except (*CONNECTION_ERRORS, RedisError, hiredis.ReplyError) as error:
            raise RedisUnavailable(f"redis not reachable at warm-up: {error!r}") from error

    async def aclose(self) -> None:
        """Wait (a bounded time) for outstanding round trips, then close the connections."""
        deadline = time.monotonic() + self.timeout_s + self.max_lag_s + 0.1
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._connection is not None:
            self._connection.abort(_Abandoned("bucket closed"))
            self._connection = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending, self._pending = self._pending, []
        fail(pending, "bucket closed")
        self._loop = None
        await self.client.aclose()

    async def check(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> tuple[bool, list[Decision]]:
        """Consume `cost` tokens from every bucket of `keys` if all hold it; one Decision per key."""
        check = encode_check(keys, specs, cost)
        allowed, tokens, _ = await self.submit(check)
        return allowed, decisions_from_tokens(allowed, tokens, check.buckets)

    async def check_raw(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> ScriptResult:
        """Like check(), but the integer answer, server time included (tests, tools)."""
        check = encode_check(keys, specs, cost)
        return script_result(await self.submit(check), check.buckets)

    def submit(self, check: EncodedCheck) -> asyncio.Future[RawOutcome]:
        """Queue an encoded check for this turn's round trip; the future gets (allowed, tokens µt per key, server µs).

        Raises RedisUnavailable at once while backing off; the future fails with RedisUnavailable.
        """
        loop = self._loop
        if loop is None:  # asyncio.get_running_loop() costs a getpid() system call on Python 3.11
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[RawOutcome] = loop.create_future()
        self.submit_to(check, future, None, None)
        return future

    def submit_to(self, check: EncodedCheck, future: asyncio.Future[Any], resolve: Resolver | None, context: Any) -> None:
        """Like submit(), but the outcome (or the RedisUnavailable met) goes to `resolve(future, context, outcome)`,
        which settles `future` itself (the guard builds its verdict there: no coroutine resumes per check).

        Raises RedisUnavailable at once while backing off (nothing is queued).
        """
        backoff = self.backoff
        if backoff.blocked_until and backoff.blocked():
            raise RedisUnavailable(f"redis backing off for {backoff.remaining_s:.3f} s after a failure")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        pending = self._pending
        if not pending:
            self._pending_since = loop.time()
        pending.append((check, future, resolve, context))
        if len(pending) >= self.chunk and self._in_flight < self.max_in_flight:
            self._send_pending()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _schedule_flush(self) -> None:
        if self._pending and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """End of the turn: send what gathered, unless enough round trips are already out."""
        self._flush_scheduled = False
        self._send_pending()

    def _send_pending(self) -> None:
        """Send the pending checks now (one round trip), unless enough round trips are already out."""
        if not self._pending or self._in_flight >= self.max_in_flight:
            return
        loop = self._loop
        assert loop is not None
        connection = self._connection
        if self._options is not None and (connection is None or connection.closed):
            if self._connecting is None and not self.backoff.blocked():
                self.round_trips += 1  # a connection attempt is a probe too
                self._connecting = self._spawn(self._connect())
            elif self._connecting is None:
                batch, self._pending = self._pending, []
                fail(batch, "redis backing off after a failure")
            return  # the connect flushes (or fails) what is pending when it is done
        batch, since = self._pending, self._pending_since
        self._pending = []
        if self.backoff.blocked():  # a round trip failed while these waited: they were never sent
            fail(batch, "redis backing off after a failure")
            return
        now = loop.time()
        waited = now - since
        if waited > self.max_lag_s:  # a busy loop, not Redis: no back-off
            fail(batch, f"checks waited {waited:.3f} s (more than {self.max_lag_s:g} s) before they could be sent")
            return
        if self._cluster is not None:  # redis-py's cluster pipeline routes each check to its node
            self._in_flight += 1
            self._spawn(self._cluster.run(batch, now + self.timeout_s + waited))
            return
        assert connection is not None  # single Redis: connected (checked above)
        self._send(connection, batch, now + self.timeout_s + waited, resent=False)

    def _send(self, connection: PipelinedConnection, items: list[Pending], deadline: float, resent: bool) -> None:
        """One write: up to MAX_BATCH checks per EVALSHA, under the watchdog's deadline."""
        if len(items) <= MAX_BATCH:  # one EVALSHA: the common case
            data, size = packed_batch(list(map(_CHECK, items)))
            groups, sizes = [items], [size]
        else:
            groups = _groups(items)
            packed, sized = zip(*[packed_batch(list(map(_CHECK, group))) for group in groups], strict=True)
            data, sizes = b"".join(packed), list(sized)
        batch = _Batch(self, connection, groups, sizes, resent)
        self._in_flight += 1
        self.round_trips += 1
        batch.deadline = deadline
        self._out.append(batch)
        if self._watchdog is None or deadline < self._watchdog_at:
            self._arm_watchdog(deadline)
        try:
            connection.send(data, [batch.on_reply] * len(groups))
        except ConnectionError as error:  # closed between the check and the write
            for _ in groups:
                batch.on_reply(error)

    def _arm_watchdog(self, when: float) -> None:
        # One timer for all batches out, not a call_at and a cancel per batch (hot path).
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog_at = when
        self._watchdog = self._loop.call_at(when, self._check_deadlines)  # type: ignore[union-attr]

    def _check_deadlines(self) -> None:
        """Watchdog: time out the batches past their deadline, then wait for the next deadline."""
        self._watchdog = None
        now = self._loop.time()  # type: ignore[union-attr]
        for batch in list(self._out):
            if batch.deadline <= now and batch in self._out:  # an earlier timeout may have finished it
                batch.on_timeout()
        if self._out:
            self._arm_watchdog(min(batch.deadline for batch in self._out))

    def _finished(self, batch: _Batch) -> None:
        """Every group of `batch` answered (or failed): settle the back-off, resend NOSCRIPT checks, flush."""
        self._out.remove(batch)
        self._in_flight -= 1
        if batch.lost is not None:
            if not isinstance(batch.lost, _Abandoned):  # our own abort was counted where it happened
                self.backoff.failure()
        elif not batch.timed_out and (self.backoff.blocked_until or self.backoff.failures):
            self.backoff.success()
        if batch.noscript:
            self._resend(batch)
        self._schedule_flush()

    def _resend(self, batch: _Batch) -> None:
        """NOSCRIPT: load the script (once per episode) and resend those checks after it on the same connection."""
        items = batch.noscript
        connection = self._connection
        if batch.resent or connection is None or connection.closed:
            fail(items, "redis lost the script again right after loading it" if batch.resent else "redis connection lost")
            return
        if batch.epoch == self.script_epoch:  # no load sent since this batch went out
            self.script_loaded()  # counted when sent: later batches must not send another
            connection.send(_SCRIPT_LOAD, [_log_load_failure])
        self._send(connection, items, self._loop.time() + self.timeout_s, resent=True)  # type: ignore[union-attr]

    async def _open(self, timeout_s: float) -> None:
        """Connect and load the script (a fresh server may not have it) within `timeout_s`."""
        assert self._options is not None
        async with asyncio.timeout(timeout_s):
            connection = await PipelinedConnection.open(self._options, timeout_s)
            try:
                await connection.request("SCRIPT", "LOAD", SCRIPT)
            except BaseException:
                connection.abort(_Abandoned("script load failed"))
                raise
        self.script_loaded()
        if self._connection is not None:
            self._connection.abort(_Abandoned("replaced"))
        self._connection = connection
        if self._loop is None:
            self._loop = asyncio.get_running_loop()

    async def _connect(self) -> None:
        """The request path's (re)connect: on failure back off and fail what waited for it."""
        try:
            await self._open(self.timeout_s)
        except (*CONNECTION_ERRORS, hiredis.ReplyError) as error:
            self.backoff.failure()
            pending, self._pending = self._pending, []
            fail(pending, f"redis unreachable: {error!r}")
        finally:
            self._connecting = None
            self._schedule_flush()

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task = self._loop.create_task(coroutine)  # type: ignore[union-attr]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _log_load_failure(reply: Any) -> None:
    if isinstance(reply, Exception):
        log.warning("SCRIPT LOAD after NOSCRIPT failed: %r", reply)


def _groups(items: list[Pending]) -> list[list[Pending]]:
    """Checks per EVALSHA: up to MAX_BATCH in one (bounds how long one script blocks the server)."""
    return [items[i : i + MAX_BATCH] for i in range(0, len(items), MAX_BATCH)]
