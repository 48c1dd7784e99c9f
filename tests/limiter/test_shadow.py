"""Shadow mode (as envoyproxy/ratelimit has it): a tier flagged `shadow: true` admits every request and counts
what it would have refused, so an operator can try a limit on live traffic. Over HTTP on a real edge and Redis."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import redis

from limiter.config import ConfigError, parse_config
from ratepilot.servers import RedisServer
from tests.limiter.support import CONFIG_HEAD, RATELIMIT, SLOW, RunningEdge, wait_until

EdgeFactory = Callable[..., RunningEdge]

# Four clients share a tier bucket of 10 tokens; each has 4 of its own. Refill is negligible during the
# test, so the same requests get the same decisions in every run: some refused by the client bucket,
# later ones by the tier bucket. `closed`'s requests are refused only when Redis is gone (fail_closed).
SHADOW_CONFIG = CONFIG_HEAD + f"""default_tier: trial
tiers:
  trial:
    client:    {{rate: {SLOW}, burst: 4}}
    aggregate: {{rate: {SLOW}, burst: 10}}
    shadow: SHADOW
  closed:
    client:    {{rate: {SLOW}, burst: 5}}
    aggregate: {{rate: {SLOW}, burst: 50}}
    failure_policy: fail_closed
    shadow: SHADOW
    key_prefixes: [closed_]
costs:
  default: 1
  routes:
    - {{method: POST, path: /v1/infer, cost: 3}}
"""

# (method, path, client): the same sequence for both runs; costs 1 and 3 mixed
REQUESTS = [
    (method, path, f"client_{i % 4}")
    for i in range(24)
    for method, path in [("POST", "/v1/infer") if i % 5 == 2 else ("GET", "/v1/items")]
]


def _metric(edge: RunningEdge, name: str, labels: str) -> float:
    found = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", edge.get("/metrics").text, re.M)
    return float(found[1]) if found else 0.0


def _run(edge: RunningEdge) -> list[tuple[int, int, int]]:
    """(status, client tokens left, tier tokens left) of each request of REQUESTS, in order."""
    answers = []
    for method, path, key in REQUESTS:
        response = edge.client.request(method, path, headers={"x-api-key": key})
        field = RATELIMIT.match(response.headers["ratelimit"])
        assert field is not None, response.headers
        answers.append((response.status_code, int(field[1]), int(field[3])))
    return answers


def test_shadow_tier_admits_everything_and_counts_what_the_enforcing_run_refuses(
    edge_factory: EdgeFactory, redis_server: RedisServer
) -> None:
    enforcing = edge_factory(redis_server.url, SHADOW_CONFIG.replace("SHADOW", "false"))
    enforced = _run(enforcing)
    refused = [status for status, *_ in enforced].count(429)
    assert {status for status, *_ in enforced} == {200, 429}
    refused_body = enforcing.get("/v1/items", key="client_0").json()
    assert refused_body["limited_by"] in ("client", "tier")
    assert _metric(enforcing, "ratepilot_shadow_refusals_total", 'tier="trial"') == 0
    with redis.Redis.from_url(redis_server.url) as admin:
        admin.flushall()

    shadow = edge_factory(redis_server.url, SHADOW_CONFIG.replace("SHADOW", "true"))
    shadowed = _run(shadow)
    assert [status for status, *_ in shadowed] == [200] * len(REQUESTS)  # no 429 at all
    # every request met the same bucket state as in the enforcing run: the limit was computed, not skipped
    assert [tokens for _, *tokens in shadowed] == [tokens for _, *tokens in enforced]
    assert _metric(shadow, "ratepilot_shadow_refusals_total", 'tier="trial"') == refused >= 6
    # the decisions still say what the limiter decided; only the answer changed
    throttled = 'outcome="throttled",source="redis",tier="trial"'
    assert _metric(shadow, "ratepilot_decisions_total", throttled) == refused
    assert _metric(enforcing, "ratepilot_decisions_total", throttled) == refused + 1  # + the refused_body probe


def test_shadow_fail_closed_tier_admits_while_redis_is_down(edge_factory: EdgeFactory, redis_server: RedisServer) -> None:
    shadow = edge_factory(redis_server.url, SHADOW_CONFIG.replace("SHADOW", "true"))
    assert shadow.get("/v1/items", key="closed_a").status_code == 200
    redis_server.stop()
    statuses = [shadow.get("/v1/items", key="closed_a").status_code for _ in range(5)]
    assert statuses == [200] * 5  # fail_closed would refuse all five
    assert _metric(shadow, "ratepilot_shadow_refusals_total", 'tier="closed"') == 5
    assert _metric(shadow, "ratepilot_decisions_total", 'outcome="throttled",source="fail_closed",tier="closed"') == 5


def test_shadow_flag_turns_on_by_hot_reload(edge_factory: EdgeFactory, redis_server: RedisServer) -> None:
    edge = edge_factory(redis_server.url, SHADOW_CONFIG.replace("SHADOW", "false"))
    statuses = [edge.get("/v1/items", key="client_0").status_code for _ in range(5)]
    assert statuses == [200] * 4 + [429]
    config_path = edge.edge.options.config_path
    assert config_path is not None
    config_path.write_text(config_path.read_text().replace("shadow: false", "shadow: true"))
    assert wait_until(lambda: edge.get("/v1/items", key="client_0").status_code == 200, 10.0)
    assert _metric(edge, "ratepilot_shadow_refusals_total", 'tier="trial"') >= 1


@pytest.mark.parametrize("value", ['"yes"', "1", '"true"', "null"])
def test_shadow_flag_must_be_a_boolean(value: str) -> None:
    text = SHADOW_CONFIG.replace("REDIS_URL", "redis://127.0.0.1:6379/0").replace("SHADOW", value)
    with pytest.raises(ConfigError, match="shadow"):
        parse_config(text)
