"""Schemathesis fuzzing of the admin API from its own OpenAPI spec, through real uvicorn: never a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings

from controller.policies import LoadedPolicy
from controller.runtime import Controller
from ratepilot.servers import RedisServer
from tests.controller.api_server import ApiServer
from tests.controller.policies import LatencyFollower
from tests.controller.support import TOKEN, make_settings

TIERS = {"free": {"static_rate": 100, "min_rate": 10, "max_rate": 1000}}


@pytest.fixture(scope="module")
def served(redis_server_session: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    redis.Redis.from_url(redis_server_session.url).flushall()
    # Prometheus is not needed to fuzz the API: a closed port makes ticks take the "metrics missing" path
    settings = make_settings(redis_server_session.url, "http://127.0.0.1:9", tiers=TIERS)
    controller = Controller(settings, LoadedPolicy(LatencyFollower(), "latency_follower"))
    controller.lease.try_acquire_or_renew()
    controller.loop.tick()
    with ApiServer(controller) as server:
        yield server
    controller.stop()


def operations(url: str) -> list[object]:
    """Every operation of the served OpenAPI spec."""
    loaded = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in loaded.get_all_operations()]


def test_no_server_errors_with_or_without_the_token(served: ApiServer) -> None:
    ops = operations(served.url)
    labels = {op.label for op in ops}  # type: ignore[attr-defined]
    assert {"PUT /overrides/{tier}", "POST /policy/reload", "POST /mode", "GET /decisions"} <= labels
    seen: list[int] = []
    for op in ops:

        @given(case=op.as_strategy())  # type: ignore[attr-defined]
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: schemathesis.Case) -> None:
            for headers in ({"Authorization": f"Bearer {TOKEN}"}, {}):
                response = case.call(base_url=served.url, headers=headers, timeout=60)
                seen.append(response.status_code)
                assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:300])

        fuzz()
    assert 200 in seen and 401 in seen and 422 in seen
