"""`ratepilot controller` with a Redis or Prometheus URL that is not one: a one-line error and exit 2 at start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controller.settings import SettingsError, settings_from_mapping
from ratepilot.servers import RedisServer
from tests.controller.support import make_settings, write_config

BAD_REDIS = ["notaurl", "http://127.0.0.1:6379", "redis://", "redis://127.0.0.1:notaport/0", "redis://127.0.0.1:6379/zero"]
BAD_PROMETHEUS = ["notaurl", "127.0.0.1:9090", "ftp://127.0.0.1:9090", "http://", "http://127.0.0.1:99999"]


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`ratepilot controller ARGV --once` as a real process (a traceback would show on stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RATEPILOT_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "ratepilot.cli", "controller", *argv, "--once"], capture_output=True,
                          text=True, timeout=120, env=full_env)  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess[str], field: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-500:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in result.stderr, result.stderr[-500:]


@pytest.mark.parametrize("url", ["notaurl", "redis://127.0.0.1:notaport/0"])
def test_bad_redis_url_on_the_command_line(url: str) -> None:
    one_line_error(run(["--redis-url", url]), "redis.url")


def test_bad_redis_url_in_the_environment() -> None:
    one_line_error(run([], env={"RATEPILOT_REDIS_URL": "notaurl"}), "redis.url")


def test_bad_redis_url_in_the_config(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", make_settings("redis://127.0.0.1:6379/0", "http://127.0.0.1:9090"))
    data = yaml.safe_load(config.read_text())
    data["redis"]["url"] = "notaurl"
    config.write_text(yaml.safe_dump(data))
    one_line_error(run(["--config", str(config)]), "redis.url")


def test_bad_prometheus_url_on_the_command_line_and_in_the_environment() -> None:
    one_line_error(run(["--prometheus-url", "notaurl"]), "prometheus.url")
    one_line_error(run([], env={"RATEPILOT_PROMETHEUS_URL": "localhost:9090"}), "prometheus.url")


@pytest.mark.parametrize("url", BAD_REDIS)
def test_redis_urls_that_are_not_urls_are_refused(url: str) -> None:
    data = make_settings("redis://127.0.0.1:6379/0", "http://127.0.0.1:9090").model_dump(mode="json")
    data["redis"]["url"] = url
    with pytest.raises(SettingsError, match=r"^redis\.url: .*not a Redis URL"):
        settings_from_mapping(data, env={})


@pytest.mark.parametrize("url", BAD_PROMETHEUS)
def test_prometheus_urls_that_are_not_urls_are_refused(url: str) -> None:
    data = make_settings("redis://127.0.0.1:6379/0", "http://127.0.0.1:9090").model_dump(mode="json")
    data["prometheus"]["url"] = url
    with pytest.raises(SettingsError, match=r"^prometheus\.url: .*not an http\(s\) URL"):
        settings_from_mapping(data, env={})


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://user:pw@cache.example:6380/2", "unix:///run/redis.sock"])
def test_good_redis_urls_pass(url: str) -> None:
    data = make_settings(url, "https://prom.example/prometheus").model_dump(mode="json")
    assert settings_from_mapping(data, env={}).redis.url == url


def test_once_with_prometheus_unreachable_exits_1(redis_server: RedisServer) -> None:
    """A URL that parses but answers nothing: the tick still writes safe rates, and the exit says it was not good."""
    result = run(["--redis-url", redis_server.url, "--prometheus-url", "http://127.0.0.1:9"])
    assert result.returncode == 1, result.stderr[-500:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["result"] == "written" and "prometheus" in summary["errors"]
    assert result.stderr.strip().splitlines()[-1] == "ratepilot controller: the tick could not read its inputs (see errors)"
