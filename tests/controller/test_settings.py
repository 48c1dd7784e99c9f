"""Settings: the packaged config, environment overrides, and refusal of settings that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from controller import service
from controller.settings import SettingsError, default_config_text, load_settings, settings_from_mapping
from limiter.config import load_config


def base() -> dict:
    return yaml.safe_load(default_config_text())


def test_packaged_config_matches_the_limiter_tiers() -> None:
    settings = load_settings(env={})
    limiter = load_config(environ={})
    assert sorted(settings.tier_names) == sorted(limiter.tiers)
    for name, tier in limiter.tiers.items():
        assert settings.tiers[name].static_rate == tier.aggregate.rate
        assert settings.tiers[name].static_rate * settings.tiers[name].burst_s == tier.aggregate.burst


def test_default_queries_use_the_contract_metric_names() -> None:
    queries = load_settings(env={}).prometheus.queries
    fallbacks = {name: q.fallback or "" for name, q in queries.items()}
    assert "ratepilot_backend_request_seconds_bucket" in fallbacks["p99_latency_ms"]
    assert 'ratepilot_backend_requests_total{outcome="error"}' in fallbacks["error_rate"]
    assert "ratepilot_backend_cpu_utilization" in queries["cpu"].expr and queries["cpu"].fallback is None
    assert 'ratepilot_decision_tokens_total{outcome="allowed"}' in fallbacks["admitted_rps"]
    assert 'ratepilot_decision_tokens_total{outcome="throttled"}' in fallbacks["throttled_rps"]


def test_default_queries_read_the_recording_rules_the_deploy_ships() -> None:
    settings = load_settings(env={})
    rules = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "prometheus" / "rules" / "recording.yml").read_text())
    recorded = {rule["record"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    window, label = settings.prometheus.window, settings.prometheus.tier_label
    for name in ("p99_latency_ms", "error_rate", "admitted_rps", "throttled_rps"):
        query = settings.prometheus.queries[name]
        series = query.expr.replace("{window}", window).split("{")[0]
        assert series in recorded, f"{name} reads {series}, which deploy/prometheus/rules/recording.yml does not record"
        assert query.fallback is not None
        if name in ("p99_latency_ms", "error_rate"):  # the rule is the fallback's PromQL, spaces aside
            fallback = query.fallback.replace("{window}", window).replace("{tier_label}", label)
            assert "".join(recorded[series].split()) == "".join(fallback.split())


def test_environment_overrides_the_file() -> None:
    env = {
        "RATEPILOT_REDIS_URL": "redis://10.0.0.1:6380/2",
        "RATEPILOT_PROMETHEUS_URL": "http://prom:9090",
        "RATEPILOT_ADMIN_TOKEN": "x" * 20,
        "RATEPILOT_CONTROLLER_MODE": "shadow",
    }
    settings = load_settings(env=env)
    assert settings.redis.url == "redis://10.0.0.1:6380/2"
    assert settings.prometheus.url == "http://prom:9090"
    assert settings.admin.token == "x" * 20
    assert settings.loop.mode == "shadow"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("lease", "renew_deadline_s"), 15, "lease_s (15) must be longer than renew_deadline_s"),
        (("lease", "lease_s"), 5, "must be longer than renew_deadline_s"),
        (("lease", "retry_period_s"), 10, "renew_deadline_s (10) must be longer than retry_period_s"),
        (("loop", "rate_ttl_s"), 6, "must be at least two ticks"),
        (("admin", "token"), "short", "at least 16 characters"),
        (("loop", "mode"), "sometimes", "loop.mode"),
        (("prometheus", "window"), "soon", "Prometheus duration"),
        (("tiers", "free", "min_rate"), 500, "min_rate <= static_rate <= max_rate"),
        (("tiers", "free", "max_rate"), float("inf"), "tiers.free.max_rate"),
        (("safety", "max_down"), 0, "safety.max_down"),
        (("prometheus", "queries"), {"latency": {"expr": "up"}}, "unknown queries"),
        (("tiers",), {}, "at least one tier"),
        (("surprise",), 1, "surprise"),
    ],
)
def test_settings_that_cannot_work_are_refused(path: tuple[str, ...], value: object, message: str) -> None:
    data = base()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings_from_mapping(data, env={})


def test_bad_lease_timings_refuse_to_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = base()
    data["lease"].update(lease_s=10, renew_deadline_s=10)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(data))
    assert service.main(["--config", str(config), "--once"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "lease_s (10) must be longer than renew_deadline_s (10)" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "/nonexistent/controller.yaml"], "cannot read"),
        (["--tick-interval", "-1"], "tick_interval_s"),
        (["--json", "out.json"], "--json needs --once"),
        (["--model", "/nonexistent/policy.npz", "--once"], "no such policy file"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert service.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_cli_not_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("tiers: [unclosed")
    assert service.main(["--config", str(config)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
