"""How `RedisBucket` sends a turn's checks to a Redis Cluster: redis-py's cluster pipeline, one
EVALSHA per check (the keys of different checks may live on different nodes).

One round trip per turn's batch, under the bucket's deadline; a connection failure or timeout
backs the bucket off; NOSCRIPT (a node without the script) loads it once and resends only those
checks. Concurrent pipelines that meet NOSCRIPT share one SCRIPT LOAD.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from limiter.check_encoding import SCRIPT, EncodedCheck, batch_command, split_reply
from limiter.errors import RedisUnavailable
from limiter.pending_checks import Pending, fail, settle
from limiter.redis_clients import CONNECTION_ERRORS, resend_noscript

if TYPE_CHECKING:
    from limiter.redis_bucket import RedisBucket

__all__ = ["ClusterRoundTrips"]


class ClusterRoundTrips:
    """The cluster half of a `RedisBucket` (its client is a `redis.asyncio.RedisCluster`)."""

    def __init__(self, bucket: RedisBucket):
        self.bucket = bucket
        self._loading: asyncio.Future[None] | None = None  # a SCRIPT LOAD under way

    async def run(self, batch: list[Pending], deadline: float) -> None:
        """Decide `batch` in one pipeline by loop time `deadline`; every check is settled."""
        bucket = self.bucket
        try:
            async with asyncio.timeout_at(deadline):
                replies = await self._execute([item[0] for item in batch])
        except CONNECTION_ERRORS as error:
            bucket.backoff.failure()
            fail(batch, f"redis unreachable or slower than {bucket.timeout_s:g} s: {error!r}")
        except (RedisError, RedisUnavailable) as error:
            fail(batch, f"redis refused the checks: {error}")
        except BaseException as error:  # cancelled: the callers must not hang
            fail(batch, f"check abandoned: {error!r}")
            raise
        else:
            bucket.backoff.success()
            for item, reply in zip(batch, replies, strict=True):
                outcome = (
                    RedisUnavailable(f"redis refused the check: {reply}")
                    if isinstance(reply, Exception)
                    else split_reply(reply, [item[0]])[0]
                )
                settle(item, outcome)
        finally:
            bucket.round_trip_done()

    async def _execute(self, checks: list[EncodedCheck]) -> list[Any]:
        """One EVALSHA per check; on NOSCRIPT load the script once and resend only those (they did not run)."""
        epoch = self.bucket.script_epoch
        return await resend_noscript(checks, self._pipeline, lambda: self._reload(epoch))

    async def _reload(self, seen_epoch: int) -> None:
        """Load the script unless another pipeline did since `seen_epoch`; concurrent callers share one load."""
        bucket = self.bucket
        if bucket.script_epoch != seen_epoch:
            return
        if self._loading is not None:
            await asyncio.shield(self._loading)
            return
        self._loading = loading = asyncio.get_running_loop().create_future()
        try:
            await bucket.client.script_load(SCRIPT)
            bucket.script_loaded()
            loading.set_result(None)
        except BaseException as error:
            loading.set_exception(RedisUnavailable(f"SCRIPT LOAD failed: {error!r}"))
            loading.exception()  # marked retrieved: waiters (if any) still get it
            raise
        finally:
            self._loading = None

    async def _pipeline(self, checks: list[EncodedCheck]) -> list[Any]:
        """One round trip; error replies come back as exception objects in place."""
        self.bucket.round_trips += 1
        pipe = self.bucket.client.pipeline(transaction=False)
        for check in checks:
            pipe.execute_command(*batch_command([check]))
        return list(await pipe.execute(raise_on_error=False))
