"""`SyncRedisBucket`: blocking check-and-consume on Redis, for the benchmarks and the tests.

It sits here, not in `limiter/`, because no service uses it: `benchmarks/bench_limiter.py` measures
one check per call against a raw EVALSHA with it, and the semantics tests run the same checks
through it and through the asyncio `limiter.redis_bucket.RedisBucket`. It encodes checks like the
edge does (`limiter/check_encoding.py`), per call (`check`) or many per round trip (`check_many`),
on a single Redis or a Redis Cluster.

Bad input raises `BucketError` before anything is sent; every Redis failure becomes
`RedisUnavailable`; after a connection failure or timeout it backs off like the asyncio bucket.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import RedisError, ResponseError

from limiter.backoff import Backoff
from limiter.bucket import BucketSpec, Decision
from limiter.check_encoding import (
    MAX_BATCH,
    SCRIPT,
    CheckRequest,
    EncodedCheck,
    RawOutcome,
    ScriptResult,
    batch_command,
    decisions_from_tokens,
    encode_check,
    pack_batch,
    script_result,
    split_reply,
)
from limiter.errors import RedisUnavailable
from limiter.redis_clients import (
    CONNECTION_ERRORS,
    DEFAULT_TIMEOUT_S,
    check_no_retries,
    make_sync_client,
    resend_noscript,
    run_blocking,
)

__all__ = ["SyncRedisBucket"]


class SyncRedisBucket:
    """Blocking check-and-consume on Redis, per call or many per round trip (benchmarks, tests)."""

    def __init__(self, client: Any, backoff: Backoff | None = None):
        check_no_retries(client)
        self.client = client
        self.backoff = backoff or Backoff()
        self.script_loads = 0  # how many times this bucket sent SCRIPT LOAD
        self._connection: Any = None  # own connection (single Redis), made on first use
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, cluster: bool = False) -> SyncRedisBucket:
        """A bucket on a new client for `url` (`cluster=True` for a Redis Cluster seed node)."""
        return cls(make_sync_client(url, timeout_s, cluster))

    def close(self) -> None:
        """Close the bucket's and the client's connections."""
        with self._lock:
            if self._connection is not None:
                self._connection.disconnect()
        self.client.close()

    def load_script(self) -> None:
        """SCRIPT LOAD (on every primary of a cluster); done lazily on the first NOSCRIPT anyway."""
        try:
            self.client.script_load(SCRIPT)
        except CONNECTION_ERRORS as error:
            self.backoff.failure()
            raise RedisUnavailable(f"redis unreachable: {error}") from error
        except RedisError as error:
            raise RedisUnavailable(f"redis refused SCRIPT LOAD: {error}") from error
        self.script_loads += 1

    def check(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> tuple[bool, list[Decision]]:
        """Consume `cost` tokens from every bucket of `keys` if all hold it; one Decision per key."""
        check = encode_check(keys, specs, cost)
        allowed, tokens, _ = self._one(check)
        return allowed, decisions_from_tokens(allowed, tokens, check.buckets)

    def check_raw(self, keys: Sequence[str], specs: Sequence[BucketSpec], cost: float) -> ScriptResult:
        """Like check(), but the integer answer, server time included (tests, tools)."""
        check = encode_check(keys, specs, cost)
        return script_result(self._one(check), check.buckets)

    def check_many(self, requests: Sequence[CheckRequest | tuple[Any, Any, float]]) -> list[tuple[bool, list[Decision]]]:
        """Check many requests in one round trip, each atomically, in order.

        Every request is validated before anything is sent. If Redis fails any of them this
        raises RedisUnavailable for the whole batch (the others may have been charged).
        """
        checks = [encode_check(*request) for request in requests]  # all validated before anything is sent
        return [
            (allowed, decisions_from_tokens(allowed, tokens, check.buckets))
            for (allowed, tokens, _), check in zip(self._call_many(checks), checks, strict=True)
        ]

    def check_many_raw(self, requests: Sequence[CheckRequest | tuple[Any, Any, float]]) -> list[ScriptResult]:
        """Like check_many(), but the integer answers."""
        checks = [encode_check(*request) for request in requests]
        return [script_result(outcome, check.buckets) for outcome, check in zip(self._call_many(checks), checks, strict=True)]

    def _one(self, check: EncodedCheck) -> RawOutcome:
        if self.backoff.blocked():
            raise RedisUnavailable(f"redis backing off for {self.backoff.remaining_s:.3f} s after a failure")
        try:
            reply = self._round_trip([[check]])[0]
            if isinstance(reply, Exception):
                raise reply
        except CONNECTION_ERRORS as error:
            self.backoff.failure()
            raise RedisUnavailable(f"redis unreachable: {error}") from error
        except RedisError as error:
            raise RedisUnavailable(f"redis refused the check: {error}") from error
        self.backoff.success()
        outcome = split_reply(reply, [check])[0]
        if isinstance(outcome, RedisUnavailable):
            raise outcome
        return outcome

    def _call_many(self, checks: list[EncodedCheck]) -> list[RawOutcome]:
        if not checks:
            return []
        if self.backoff.blocked():
            raise RedisUnavailable(f"redis backing off for {self.backoff.remaining_s:.3f} s after a failure")
        if isinstance(self.client, redis.Redis):
            groups = [checks[i : i + MAX_BATCH] for i in range(0, len(checks), MAX_BATCH)]
        else:  # a cluster: keys of different checks may live on different nodes
            groups = [[check] for check in checks]
        try:
            replies = self._round_trip(groups)
        except CONNECTION_ERRORS as error:
            self.backoff.failure()
            raise RedisUnavailable(f"redis unreachable: {error}") from error
        except RedisError as error:
            raise RedisUnavailable(f"redis refused the checks: {error}") from error
        outcomes: list[RawOutcome] = []
        for reply, group in zip(replies, groups, strict=True):
            if isinstance(reply, Exception):
                raise RedisUnavailable(f"redis refused a check: {reply}") from reply
            for outcome in split_reply(reply, group):
                if isinstance(outcome, RedisUnavailable):
                    raise outcome
                outcomes.append(outcome)
        self.backoff.success()
        return outcomes

    def _round_trip(self, groups: list[list[EncodedCheck]]) -> list[Any]:
        """One EVALSHA per group, and those answered NOSCRIPT once more after loading the script."""

        async def send(items: list[list[EncodedCheck]]) -> list[Any]:
            return self._pipeline(items)

        async def load() -> None:
            self.load_script()

        return run_blocking(resend_noscript(groups, send, load))

    def _pipeline(self, groups: list[list[EncodedCheck]]) -> list[Any]:
        """One round trip, one EVALSHA per group; error replies come back as exception objects in place."""
        if not isinstance(self.client, redis.Redis):  # a cluster client routes each command to its node
            pipe = self.client.pipeline(transaction=False)
            for group in groups:
                pipe.execute_command(*batch_command(group))
            return list(pipe.execute(raise_on_error=False))
        # Single Redis: the checks' cached RESP bytes on the bucket's own connection, replies read
        # straight off it (redis-py's pipeline and its pool cost more per call than the script).
        with self._lock:
            connection = self._connection
            if connection is None:
                pool = self.client.connection_pool
                connection = self._connection = pool.connection_class(**pool.connection_kwargs)
            try:
                connection.send_packed_command([b"".join([pack_batch(group) for group in groups])], check_health=False)
                replies: list[Any] = []
                for _ in groups:
                    try:
                        replies.append(connection.read_response())
                    except ResponseError as error:
                        replies.append(error)
            except BaseException:
                connection.disconnect()  # replies may be left unread: never reuse it as is (reconnects on use)
                raise
        return replies
