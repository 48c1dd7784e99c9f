"""limiter.yaml validation, env overrides, hot reload; weighted costs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from limiter.config import ConfigError, ConfigWatcher, load_config, parse_config
from limiter.costs import CostTable
from tests.limiter.support import BASE_CONFIG, write_config


def test_packaged_example_validates_and_seeds_heavy_inference() -> None:
    config = load_config(environ={})
    assert config.client_header == "x-api-key"
    assert set(config.tiers) >= {"free", "pro"}
    assert CostTable(config.costs).cost("POST", "/v1/infer") == 3
    assert config.rate_table.poll_s == 5
    assert config.redis.timeout_ms <= 10


def test_env_overrides_file_values() -> None:
    env = {
        "RATEPILOT_REDIS_URL": "redis://10.0.0.1:6380/2",
        "RATEPILOT_RATE_POLL_S": "1.5",
        "RATEPILOT_REDIS_TIMEOUT_MS": "7",
        "RATEPILOT_CLIENT_HEADER": "X-Tenant",
    }
    config = parse_config(BASE_CONFIG.replace("REDIS_URL", "redis://127.0.0.1:1/0"), env)
    assert config.redis.url == "redis://10.0.0.1:6380/2"
    assert config.rate_table.poll_s == 1.5
    assert config.redis.timeout_ms == 7
    assert config.client_header == "x-tenant"


def test_an_empty_variable_keeps_the_files_value() -> None:
    """As for the controller (both read their files through limiter/config_file.py): set but empty means unset."""
    config = parse_config(BASE_CONFIG.replace("REDIS_URL", "redis://127.0.0.1:1/0"), {"RATEPILOT_REDIS_URL": "", "RATEPILOT_RATE_POLL_S": ""})
    assert config.redis.url == "redis://127.0.0.1:1/0"
    assert config.rate_table.poll_s == parse_config(BASE_CONFIG.replace("REDIS_URL", "redis://127.0.0.1:1/0"), {}).rate_table.poll_s


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", "redis://127.0.0.1:1/0")
    config = load_config(None, environ={"RATEPILOT_CONFIG": str(path)})
    assert config.tiers["pro"].client.burst == 12


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("burst: 5}", "burst: 2}"), "could never pass"),  # POST /v1/infer costs 3 > burst 2
        (("default_tier: free", "default_tier: gold"), "default_tier"),
        (("vip-key: pro", "vip-key: gold"), "unknown tier"),
        (("client_header: x-api-key", "client_header: 'bad header'"), "client_header"),
        (("poll_s: 0.2", "poll_s: -1"), "rate_table.poll_s"),
        (("cost: 3}", "cost: .nan}"), "cost"),
        (("timeout_ms: 1000", "timeout_ms: 1000\n  retries: 3"), "retries"),
        (("url: REDIS_URL", "url: http://x"), "redis.url"),
        (("timeout_ms: 1000", "timeout_ms: 1000\n  chunk: 0"), "redis.chunk"),
    ],
)
def test_invalid_config_names_the_problem(change: tuple[str, str], message: str) -> None:
    text = BASE_CONFIG.replace(*change, 1).replace("REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match=message):
        parse_config(text, {})


def test_unreadable_or_non_mapping_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})
    with pytest.raises(ConfigError, match="mapping"):
        parse_config("- a\n- b\n", {})
    with pytest.raises(ConfigError, match="YAML"):
        parse_config("tiers: [unclosed\n", {})


def _rewrite(path: Path, text: str) -> None:
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a distinct mtime even on coarse clocks


def test_watcher_applies_valid_and_refuses_invalid(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(tmp_path / "c.yaml", "redis://127.0.0.1:1/0")
    watcher = ConfigWatcher(path, load_config(path, environ={}), environ={})
    assert watcher.poll() is None  # unchanged

    _rewrite(path, path.read_text().replace("burst: 12}", "burst: 20}"))
    new = watcher.poll()
    assert new is not None and new.tiers["pro"].client.burst == 20

    with caplog.at_level(logging.ERROR, logger="ratepilot.config"):
        _rewrite(path, path.read_text().replace("default_tier: free", "default_tier: nope"))
        assert watcher.poll() is None
    assert "reload refused" in caplog.text
    assert watcher.current.tiers["pro"].client.burst == 20  # the old valid config stays


def test_watcher_keeps_redis_settings_until_restart(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", "redis://127.0.0.1:1/0")
    watcher = ConfigWatcher(path, load_config(path, environ={}), environ={})
    _rewrite(path, path.read_text().replace("redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0").replace("burst: 12}", "burst: 30}"))
    new = watcher.poll()
    assert new is not None
    assert new.redis.url == "redis://127.0.0.1:1/0"
    assert new.tiers["pro"].client.burst == 30


def test_costs_by_route_method_and_size() -> None:
    config = parse_config(
        """
        default_tier: t
        tiers: {t: {client: {rate: 1, burst: 10}, aggregate: {rate: 1, burst: 10}}}
        costs:
          default: 1
          routes:
            - {method: POST, path: /v1/infer, cost: 3}
            - {method: "*", path: /v1/batch/*, cost: 2}
            - {method: GET, path: /v1/batch/cheap, cost: 0.5}
          payload: {bytes_per_token: 1000, max_extra: 2}
        """,
        {},
    )
    costs = CostTable(config.costs)
    assert costs.cost("POST", "/v1/infer") == 3
    assert costs.cost("GET", "/v1/infer") == 1  # method matters
    assert costs.cost("PUT", "/v1/batch/x/y") == 2
    assert costs.cost("GET", "/v1/batch/cheap") == 2  # first match wins
    assert costs.cost("GET", "/v1/items") == 1
    assert costs.cost("GET", "/v1/items", content_length=1000) == 1  # the first unit is free
    assert costs.cost("GET", "/v1/items", content_length=1001) == 2
    assert costs.cost("POST", "/v1/infer", content_length=10**9) == 5  # capped at max_extra
