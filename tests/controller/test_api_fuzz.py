"""Bad admin bodies through real uvicorn and Redis: never a 5xx, a 422 naming the field, nothing stored.

Schemathesis fuzzes every operation from the served OpenAPI spec; the hypothesis tests below send
what a spec-driven fuzzer does not: raw JSON text with `NaN`, `Infinity`, `1e309`, booleans,
strings and huge numbers in every field of every admin body.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from controller.overrides import AUDIT_KEY, parse_override
from controller.policies import LoadedPolicy
from controller.rate_store import MODE_KEY, OVERRIDES_KEY
from controller.runtime import Controller
from controller.settings import MAX_POLICY_PARAM
from limiter.bucket import MAX_RATE
from ratepilot.servers import RedisServer
from tests.controller.api_server import ApiServer
from tests.controller.policies import LatencyFollower
from tests.controller.support import TOKEN, make_settings

TIERS = {"free": {"static_rate": 100, "min_rate": 10, "max_rate": 1000}}
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)

# JSON tokens that are not a usable number: non-finite (Python's reader takes NaN/Infinity, 1e309 overflows
# to inf), wrong types, and numbers beyond any sane rate
NOT_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e309", "-1e309", "true", "false", '"5"', '"NaN"', "[]", "{}", '{"a": 1}']
HUGE = ["1e300", "1e20", "123456789012345678901234567890123456789012345678901234567890", "-1e300"]
RATE_FIELDS = ("min_rate", "max_rate", "pinned_rate")


@pytest.fixture(scope="module")
def controller(redis_server_session: RedisServer) -> Iterator[Controller]:
    redis.Redis.from_url(redis_server_session.url).flushall()
    # Prometheus is not needed to fuzz the API: a closed port makes ticks take the "metrics missing" path
    settings_ = make_settings(redis_server_session.url, "http://127.0.0.1:9", tiers=TIERS)
    ctl = Controller(settings_, LoadedPolicy(LatencyFollower(), "latency_follower"))
    ctl.lease.try_acquire_or_renew()
    ctl.loop.tick()
    yield ctl
    ctl.stop()


@pytest.fixture(scope="module")
def served(controller: Controller) -> Iterator[ApiServer]:
    with ApiServer(controller) as server:
        yield server


@pytest.fixture(scope="module")
def http(served: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def redis_client_m(redis_server_session: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server_session.url)
    yield client
    client.close()


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
        # valid data from the spec, and data that breaks it (wrong types, out of range, missing fields)
        cases = st.one_of(op.as_strategy(), op.as_strategy(GenerationMode.NEGATIVE))  # type: ignore[attr-defined]

        @given(case=cases)
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: schemathesis.Case) -> None:
            for headers in ({"Authorization": f"Bearer {TOKEN}"}, {}):
                response = case.call(base_url=served.url, headers=headers, timeout=60)
                seen.append(response.status_code)
                assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:300])

        fuzz()
    assert {200, 401, 422} <= set(seen), sorted(set(seen))


def usable_rate(token: str) -> bool:
    """Whether a JSON token is a number the override accepts as a rate (finite, 0 < x <= MAX_RATE)."""
    value = json.loads(token)
    return type(value) in (int, float) and math.isfinite(value) and 0 < value <= MAX_RATE


def snapshot(client: redis.Redis) -> tuple[object, ...]:
    return client.hgetall(OVERRIDES_KEY), client.xlen(AUDIT_KEY), client.get(MODE_KEY)


def body_text(fields: dict[str, str]) -> str:
    """A JSON object from raw value tokens (so NaN, Infinity and 1e309 go over the wire as written)."""
    return "{" + ", ".join(f"{json.dumps(name)}: {token}" for name, token in fields.items()) + "}"


def refused(response: httpx.Response, field: str) -> bool:
    """A 422 whose detail names `field` in some error's location."""
    return response.status_code == 422 and any(field in map(str, e.get("loc", [])) for e in response.json()["detail"])


@pytest.mark.parametrize("token", NOT_NUMBERS + HUGE + ["0", "-1"])
@pytest.mark.parametrize("field", [*RATE_FIELDS, "ttl_s"])
def test_an_override_with_a_bad_number_is_422_naming_the_field(http: httpx.Client, redis_client_m: redis.Redis,
                                                               field: str, token: str) -> None:  # fmt: skip
    before = snapshot(redis_client_m)
    fields = {"max_rate": "500", "who": '"alice"', "reason": '"incident 7"', field: token}
    response = http.put("/overrides/free", content=body_text(fields), headers=AUTH)
    assert refused(response, field), (response.status_code, response.text[:300])
    assert snapshot(redis_client_m) == before


@pytest.mark.parametrize("token", ["NaN", "Infinity", "1e309", "true", "5", "[]", "null", '""', json.dumps("x" * 1000)])
@pytest.mark.parametrize("field", ["who", "reason"])
def test_an_override_with_a_bad_who_or_reason_is_422(http: httpx.Client, redis_client_m: redis.Redis, field: str, token: str) -> None:
    before = snapshot(redis_client_m)
    fields = {"max_rate": "500", "who": '"alice"', "reason": '"incident 7"', field: token}
    response = http.put("/overrides/free", content=body_text(fields), headers=AUTH)
    assert refused(response, field), (response.status_code, response.text[:300])
    assert snapshot(redis_client_m) == before


@pytest.mark.parametrize("token", NOT_NUMBERS + ['"ACTIVE"', '"sideways"', "null", "1"])
def test_a_mode_that_is_not_active_or_shadow_is_422(http: httpx.Client, redis_client_m: redis.Redis, token: str) -> None:
    before = snapshot(redis_client_m)
    response = http.post("/mode", content=body_text({"mode": token}), headers=AUTH)
    assert refused(response, "mode"), (response.status_code, response.text[:300])
    assert snapshot(redis_client_m) == before


@pytest.mark.parametrize("token", NOT_NUMBERS + ["1e10", "-1e10"])
def test_a_reload_with_a_bad_policy_parameter_is_422_and_keeps_the_policy(http: httpx.Client, controller: Controller,
                                                                           token: str) -> None:  # fmt: skip
    in_force = controller.policies.current
    body = '{"name": "aimd", "params": {"increase": ' + token + "}}"
    response = http.post("/policy/reload", content=body, headers=AUTH)
    assert refused(response, "increase"), (response.status_code, response.text[:300])
    assert controller.policies.current is in_force


@pytest.mark.parametrize("token", ["NaN", "true", "7", "[]", '"x\\u0000y"'])
@pytest.mark.parametrize("field", ["name", "model"])
def test_a_reload_with_a_bad_name_or_model_is_422(http: httpx.Client, controller: Controller, field: str, token: str) -> None:
    in_force = controller.policies.current
    response = http.post("/policy/reload", content=body_text({field: token}), headers=AUTH)
    assert response.status_code == 422, (response.status_code, response.text[:300])
    assert controller.policies.current is in_force


rate_tokens = st.one_of(
    st.sampled_from(NOT_NUMBERS + HUGE + ["0", "-0.0", "-5"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),  # any finite float: most are out of range
    st.floats(min_value=0.001, max_value=MAX_RATE).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
)
text_tokens = st.one_of(st.text(max_size=120).map(json.dumps), st.sampled_from(NOT_NUMBERS + ["null", "12"]))


@FUZZ
@given(
    rates=st.dictionaries(st.sampled_from(RATE_FIELDS), rate_tokens, min_size=1),
    ttl=st.none() | rate_tokens,
    who=text_tokens,
    reason=text_tokens,
)
def test_fuzzed_override_bodies_are_stored_only_when_every_field_is_good(
    http: httpx.Client, redis_client_m: redis.Redis, rates: dict[str, str], ttl: str | None, who: str, reason: str
) -> None:
    fields = {**rates, "who": who, "reason": reason} | ({} if ttl is None else {"ttl_s": ttl})
    before = snapshot(redis_client_m)
    response = http.put("/overrides/free", content=body_text(fields), headers=AUTH)
    assert response.status_code in (200, 422), (response.status_code, fields, response.text[:300])
    if response.status_code == 422:
        assert snapshot(redis_client_m) == before
        return
    assert all(usable_rate(token) for token in rates.values()), fields
    assert all(isinstance(json.loads(t), str) for t in (who, reason)), fields
    stored = parse_override(redis_client_m.hget(OVERRIDES_KEY, "free"))
    for name, token in rates.items():
        assert getattr(stored, name) == float(json.loads(token))
    assert redis_client_m.xlen(AUDIT_KEY) == before[1] + 1  # type: ignore[operator]


@FUZZ
@given(mode=st.one_of(st.sampled_from(['"active"', '"shadow"']), text_tokens, rate_tokens))
def test_fuzzed_mode_bodies(http: httpx.Client, redis_client_m: redis.Redis, mode: str) -> None:
    before = snapshot(redis_client_m)
    response = http.post("/mode", content=body_text({"mode": mode}), headers=AUTH)
    assert response.status_code in (200, 422), (response.status_code, mode, response.text[:300])
    if response.status_code == 422:
        assert snapshot(redis_client_m) == before
    else:
        assert json.loads(mode) in ("active", "shadow") and redis_client_m.get(MODE_KEY) == json.loads(mode).encode()


@FUZZ
@given(params=st.dictionaries(st.sampled_from(["increase", "decrease", "min_factor", "max_factor"]), rate_tokens, max_size=3))
def test_fuzzed_reload_parameters(http: httpx.Client, controller: Controller, params: dict[str, str]) -> None:
    in_force = controller.policies.current
    body = '{"name": "aimd", "params": ' + body_text(params) + "}"
    response = http.post("/policy/reload", content=body, headers=AUTH)
    assert response.status_code in (200, 422), (response.status_code, body, response.text[:300])
    if response.status_code == 422:
        assert controller.policies.current is in_force
        return
    for token in params.values():
        value = json.loads(token)
        assert type(value) in (int, float) and math.isfinite(value) and abs(value) <= MAX_POLICY_PARAM, body


@pytest.mark.parametrize("body", ["NaN", "Infinity", "1e309", "true", "[]", '"x"', "{", ""])
@pytest.mark.parametrize(("method", "path"), [("PUT", "/overrides/free"), ("POST", "/mode"), ("POST", "/policy/reload")])
def test_a_body_that_is_not_an_object_is_422(http: httpx.Client, redis_client_m: redis.Redis, controller: Controller,
                                             method: str, path: str, body: str) -> None:  # fmt: skip
    if path == "/policy/reload" and body == "":
        pytest.skip("an empty body reloads the policy in force (documented)")
    before, in_force = snapshot(redis_client_m), controller.policies.current
    response = http.request(method, path, content=body, headers=AUTH)
    assert response.status_code == 422, (response.status_code, response.text[:300])
    assert snapshot(redis_client_m) == before and controller.policies.current is in_force
