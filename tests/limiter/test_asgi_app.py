"""The limiter mounted in a user's own FastAPI app, served by a real uvicorn against a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pytest
import redis
from fastapi import Depends, FastAPI, Header

from controller.lease import LeaderLease
from controller.rate_store import RateStore
from controller.settings import LeaseSettings
from limiter import ConfigError, RateLimiter, RateLimitMiddleware
from ratepilot.servers import RedisServer, free_port
from tests.limiter.support import RATELIMIT, ServedApp, wait_until, write_config


def build_user_app(config_path: Path) -> tuple[FastAPI, RateLimiter, list[str]]:
    """A small app as a user writes one: its own lifespan and routes, one route charged by a dependency."""
    events: list[str] = []
    limiter = RateLimiter(config_path)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append(f"app start-up, limiter running: {limiter.running}")
        yield
        events.append(f"app shut-down, limiter running: {limiter.running}")

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(RateLimitMiddleware, limiter=limiter)

    def current_user(authorization: Annotated[str | None, Header()] = None) -> str | None:
        """The authenticated user (here: the bearer token's name)."""
        return authorization.removeprefix("Bearer ") if authorization else None

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/items")
    def items() -> list[str]:
        return ["a", "b"]

    @app.get("/ready", dependencies=[Depends(limiter.exempt())])
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/reports", dependencies=[Depends(limiter.charge(cost=2, tier="pro", client=current_user))])
    def reports() -> dict[str, bool]:
        return {"queued": True}

    return app, limiter, events


def other_clients(admin: redis.Redis) -> list[dict[str, Any]]:
    """Connections to the server other than `admin`'s own."""
    own = admin.client_id()
    return [c for c in admin.client_list() if int(c["id"]) != own]


def test_user_fastapi_app_limits_charges_follows_the_controller_and_shuts_down_clean(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    config_path = write_config(tmp_path / "limiter.yaml", redis_server.url)
    app, limiter, events = build_user_app(config_path)
    admin = redis.Redis.from_url(redis_server.url)
    served = ServedApp(app, free_port())
    served.start()
    try:
        assert events == ["app start-up, limiter running: True"]  # the limiter starts before the app's own start-up
        client = served.client

        for path in ("/health", "/ready"):  # exempt by the config's exempt_paths, and by a dependency
            answers = [client.get(path, headers={"x-api-key": "free_z"}) for _ in range(12)]
            assert {r.status_code for r in answers} == {200} and "ratelimit" not in answers[0].headers

        # the middleware charges /items by the cost table (1 token); the free tier's client bucket holds 5
        items = [client.get("/items", headers={"x-api-key": "free_a"}) for _ in range(6)]
        assert [r.status_code for r in items] == [200] * 5 + [429]
        assert items[0].json() == ["a", "b"]
        assert items[0].headers["ratelimit-policy"].startswith('"client";q=5;')
        assert RATELIMIT.match(items[4].headers["ratelimit"]).group(1) == "0"  # type: ignore[union-attr]
        refused = items[5]
        assert int(refused.headers["retry-after"]) >= 1 and RATELIMIT.match(refused.headers["ratelimit"])
        assert refused.json()["error"] == "rate_limited" and refused.json()["limited_by"] == "client"

        # /reports is charged by its dependency only: 2 tokens in the pro tier (client burst 12) for the
        # user the bearer token names, not for the API key (free_b would be refused after 5 if charged too)
        headers = {"x-api-key": "free_b", "authorization": "Bearer alice"}
        reports = [client.post("/reports", headers=headers) for _ in range(7)]
        assert [r.status_code for r in reports] == [200] * 6 + [429]
        assert reports[0].json() == {"queued": True}
        assert reports[0].headers["ratelimit-policy"].startswith('"client";q=12;')
        assert RATELIMIT.match(reports[0].headers["ratelimit"]).group(1) == "10"  # type: ignore[union-attr]
        assert int(reports[6].headers["retry-after"]) >= 1 and reports[6].json()["tier"] == "pro"
        assert admin.exists("rp:{pro}:c:alice") and not admin.exists("rp:{free}:c:free_b")
        assert client.post("/reports", headers={"authorization": "Bearer bob"}).status_code == 200  # bob's own bucket

        # the controller writes the free tier's rate as controller/rate_store.py writes it: in force by the
        # end of the first poll that starts after the write
        lease = LeaderLease(admin, "controller-test", LeaseSettings(lease_s=30.0, renew_deadline_s=20.0, retry_period_s=1.0))
        assert lease.try_acquire_or_renew()
        store = RateStore(admin, ttl_s=60.0, decisions_maxlen=10)
        assert limiter.reader is not None
        polls_before = limiter.reader.polls
        store.write(lease.replica_id, lease.token(), ["free"], np.array([40.0]), np.array([90.0]), ["controller"], ["{}"], True)
        assert wait_until(lambda: limiter.reader is not None and limiter.reader.polls >= polls_before + 2, 10.0)
        after = client.get("/items", headers={"x-api-key": "free_c"})
        assert '"tier";q=90;' in after.headers["ratelimit-policy"]
        assert limiter.guard.tiers["free"].rates.source == "controller"
        assert other_clients(admin), "the limiter holds its Redis connections while serving"
    finally:
        served.stop()
    assert events[-1] == "app shut-down, limiter running: True"  # the limiter stops after the app's own shut-down
    assert served.leftover_tasks == []
    assert not limiter.running and limiter.guard.redis_bucket is None
    assert wait_until(lambda: other_clients(admin) == [], 10.0), other_clients(admin)
    admin.close()


def test_client_callable_and_bad_config(redis_server: RedisServer, tmp_path: Path) -> None:
    config_path = write_config(tmp_path / "limiter.yaml", redis_server.url)
    limiter = RateLimiter(config_path, client=lambda request: request.headers.get("x-user"))
    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter=limiter)

    @app.get("/v1/items")
    def items() -> dict[str, bool]:
        return {"ok": True}

    served = ServedApp(app, free_port())
    served.start()
    try:
        # the callable names the client: the API-key header is ignored, so two keys of one user share a bucket
        statuses = [served.client.get("/v1/items", headers={"x-user": "carol", "x-api-key": f"free_{i}"}).status_code
                    for i in range(6)]  # fmt: skip
        assert statuses == [200] * 5 + [429]
        assert served.client.get("/v1/items", headers={"x-user": "dave"}).status_code == 200
        assert served.client.get("/v1/items").status_code == 200  # no user: the anonymous client, as the edge does
        admin = redis.Redis.from_url(redis_server.url)
        assert {k.decode() for k in admin.scan_iter("rp:{free}:c:*")} == {"rp:{free}:c:carol", "rp:{free}:c:dave", "rp:{free}:c:"}
        admin.close()
    finally:
        served.stop()
    assert served.leftover_tasks == []

    bad = tmp_path / "bad.yaml"
    bad.write_text(config_path.read_text().replace("burst: 5", "burst: -5", 1))
    with pytest.raises(ConfigError, match="greater than 0"):
        RateLimiter(bad)
    with pytest.raises(ValueError, match="not one of the tiers"):
        limiter.charge(cost=1, tier="gold")
    with pytest.raises(ValueError, match="smallest burst"):
        limiter.charge(cost=6, tier="free")
    for cost in (0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="cost must be"):
            limiter.charge(cost=cost)
