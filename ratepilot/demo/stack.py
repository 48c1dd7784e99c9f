"""The processes of one demo run and their configs: redis-server, edge, Prometheus, controller.

Every part listens on a free local port and logs into the run's folder. The adaptive run starts
the controller with the committed default policy; the static run leaves it out, so the edge keeps
the static rate of its config (what an operator would configure: the nominal capacity).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from policy.rl import DEFAULT_MODEL_PATH
from ratepilot.demo.supervisor import HttpPart, Supervisor
from ratepilot.servers import PrometheusServer, RedisServer, free_port

TIER = "demo"  # the tier of the demo's keys (the only tier of a single-tier stack, the bottom one of two)
KEY_PREFIX = "demo_"
TOP_TIER, TOP_PREFIX = "gold", "gold_"  # two-tier stacks: the top-priority tier and its keys
TOP_SHARE = 0.25  # the gold tier's static rate, share of the nominal capacity (its share of the demo's traffic)
PRIORITY = {TOP_TIER: 2, TIER: 1}
SCRAPE_INTERVAL_S = 1.0  # Prometheus scrapes the edge and the controller this often
BACKEND = "demo-backend"  # the backend group both tiers share in the controller's config


@dataclass(frozen=True)
class StackSettings:
    """What the stack of one run looks like."""

    nominal_capacity_rps: float
    slo_ms: float = 300.0
    burst_s: float = 1.0
    tick_interval_s: float = 5.0
    workers: int = 4
    backend_timeout_s: float = 2.0
    policy: str = "rl"
    model: str | None = None  # rl: None = the committed default policy
    seed: int = 0
    two_tiers: bool = False  # gold (priority 2) beside demo (priority 1), sharing the one backend


def static_rates(settings: StackSettings) -> dict[str, float]:
    """Each tier's static (aggregate) rate: together the nominal capacity."""
    rate = settings.nominal_capacity_rps
    if not settings.two_tiers:
        return {TIER: rate}
    return {TOP_TIER: rate * TOP_SHARE, TIER: rate * (1 - TOP_SHARE)}


def tier_prefixes(settings: StackSettings) -> dict[str, str]:
    """API-key prefix of each tier."""
    return {TOP_TIER: TOP_PREFIX, TIER: KEY_PREFIX} if settings.two_tiers else {TIER: KEY_PREFIX}


def limiter_config(redis_url: str, settings: StackSettings) -> dict[str, object]:
    """limiter.yaml of the demo edge: the tiers' aggregate buckets add up to the nominal capacity."""
    prefixes = tier_prefixes(settings)
    tiers = {
        tier: {
            "client": {"rate": rate, "burst": max(rate * settings.burst_s, 2.0)},  # never binds
            "aggregate": {"rate": rate, "burst": max(rate * settings.burst_s, 2.0)},
            "failure_policy": "fail_open",
            "key_prefixes": [prefixes[tier]],
        }
        for tier, rate in static_rates(settings).items()
    }
    return {
        "redis": {"url": redis_url, "timeout_ms": 50},  # a busy 2-core box: avoid spurious fail-open
        "client_header": "x-api-key",
        "anonymous_tier": TIER,
        "default_tier": TIER,
        "tiers": tiers,
        "costs": {"default": 1, "payload": {"max_extra": 0}},
        "rate_table": {"poll_s": 1, "client_scale_max": 1.0},
        "exempt_paths": ["/health", "/metrics", "/admin/backend"],
    }


def controller_config(redis_url: str, prometheus_url: str, port: int, settings: StackSettings) -> dict[str, object]:
    """controller.yaml of the demo: the tiers, bounded around their static rates; two tiers share one backend by priority."""
    tiers: dict[str, dict[str, object]] = {}
    for tier, rate in static_rates(settings).items():
        tiers[tier] = {"static_rate": rate, "min_rate": rate / 10, "max_rate": rate * 2, "burst_s": settings.burst_s,
                       "slo_ms": settings.slo_ms}  # fmt: skip
        if settings.two_tiers:
            tiers[tier].update(backend=BACKEND, priority=PRIORITY[tier], max_rate=settings.nominal_capacity_rps * 2)
    return {
        "redis": {"url": redis_url},
        "prometheus": {"url": prometheus_url, "window": rate_window(settings)},
        "loop": {"tick_interval_s": settings.tick_interval_s, "rate_ttl_s": max(30.0, 3 * settings.tick_interval_s)},
        "lease": {"enabled": True},
        "policy": {"name": settings.policy, "model": None},
        "tiers": tiers,
        "admin": {"enabled": True, "host": "127.0.0.1", "port": port},
    }


def rate_window(settings: StackSettings) -> str:
    """The controller's rate() window: one tick, as in the simulator the policy learned in (each observation is
    the interval just ended, not a blend with the one before), and never under two scrapes."""
    return f"{round(max(settings.tick_interval_s, 2 * SCRAPE_INTERVAL_S) * 1000)}ms"


def ratepilot_argv(*args: str) -> list[str]:
    """Run a ratepilot subcommand with this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "ratepilot.cli", *args]


class Stack:
    """Starts the parts of one run under a supervisor; `edge_url`, `controller_url`, `prometheus_url`."""

    def __init__(self, workdir: Path, settings: StackSettings, adaptive: bool, supervisor: Supervisor | None = None):
        self.workdir = workdir
        self.settings = settings
        self.adaptive = adaptive
        self.supervisor = supervisor or Supervisor()
        self.edge: HttpPart | None = None
        self.controller: HttpPart | None = None
        self.prometheus: PrometheusServer | None = None
        self.redis: RedisServer | None = None

    def start(self) -> None:
        """redis -> edge -> Prometheus -> controller; PartFailed (everything stopped) if one fails."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        s = self.settings
        redis_server = RedisServer(workdir=self.workdir / "redis")
        redis_server.name = "redis-server"
        self.supervisor.start(redis_server)
        self.redis = redis_server

        limiter_yaml = self.workdir / "limiter.yaml"
        limiter_yaml.write_text(yaml.safe_dump(limiter_config(redis_server.url, s), sort_keys=False))
        edge_port = free_port()
        edge_argv = ratepilot_argv(
            "edge", "--config", str(limiter_yaml), "--port", str(edge_port),
            "--capacity-rps", f"{s.nominal_capacity_rps:g}", "--workers", str(s.workers),
            "--queue-limit", str(max(64, s.workers * 16)), "--backend-timeout-s", f"{s.backend_timeout_s:g}",
            "--seed", str(s.seed), "--log-level", "warning",
        )  # fmt: skip
        self.edge = HttpPart("edge", edge_argv, edge_port, self.workdir)
        self.supervisor.start(self.edge)

        controller_port = free_port()
        targets = [f"127.0.0.1:{edge_port}"] + ([f"127.0.0.1:{controller_port}"] if self.adaptive else [])
        self.prometheus = PrometheusServer(targets, workdir=self.workdir / "prometheus", scrape_interval_s=SCRAPE_INTERVAL_S)
        self.supervisor.start(self.prometheus)

        if self.adaptive:
            controller_yaml = self.workdir / "controller.yaml"
            config = controller_config(redis_server.url, self.prometheus.url, controller_port, s)
            controller_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
            args = ["controller", "--config", str(controller_yaml), "--replica-id", "demo-controller"]
            if s.policy == "rl":
                args += ["--model", s.model or str(DEFAULT_MODEL_PATH)]
            self.controller = HttpPart("controller", ratepilot_argv(*args), controller_port, self.workdir)
            self.supervisor.start(self.controller)

    @property
    def edge_url(self) -> str:
        """Base URL of the edge."""
        assert self.edge is not None
        return self.edge.url

    def set_capacity(self, capacity_rps: float) -> None:
        """Set the synthetic backend's capacity (POST /admin/backend)."""
        body = json.dumps({"capacity_rps": float(capacity_rps)}).encode()
        request = urllib.request.Request(
            f"{self.edge_url}/admin/backend", data=body, method="POST", headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=2) as response:
            response.read()

    def stop(self) -> None:
        """Stop every part of this run."""
        self.supervisor.stop_all()
