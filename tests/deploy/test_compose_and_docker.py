"""compose.yaml and the Dockerfile, checked as far as possible without a Docker engine."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.service import build_parser as controller_parser
from limiter.edge import build_parser as edge_parser
from ratepilot.cli import SUBCOMMANDS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The parsed compose file."""
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_services_and_published_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "prometheus", "edge", "controller", "grafana"}
    published = [port.split(":")[0] for service in services.values() for port in service.get("ports", [])]
    assert len(published) == len(set(published)), f"a host port is published twice: {published}"
    assert {"8080", "8081", "9090", "3000"} <= set(published)


def test_depends_on_and_volumes_refer_to_what_exists(compose: dict[str, Any]) -> None:
    services = compose["services"]
    named_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named_volumes, f"{name}: unknown named volume {source}"
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()


def test_ratepilot_commands_parse_with_the_real_parsers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, parser in (("edge", edge_parser()), ("controller", controller_parser())):
        command = services[name]["command"]
        assert command[0] in SUBCOMMANDS
        args = parser.parse_args(command[1:])
        mounted = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        assert str(args.config) in mounted, f"{name}: its --config is not mounted"
        port = args.port
        assert f"{port}:{port}" in services[name]["ports"]


def test_prometheus_scrapes_the_compose_services(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    for service, port in (("edge", 8080), ("controller", 8081)):
        assert f"{service}:{port}" in targets
        assert service in compose["services"]


def test_grafana_provisioning_points_at_the_mounted_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "ratepilot.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert (DEPLOY / mounts[dashboards_path] / "ratepilot.json").is_file()
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["uid"] == "prometheus"
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_dockerfile_is_multi_stage_non_root_and_copies_what_exists() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, flags=re.MULTILINE)
    assert stages[-1] == "runtime" and "builder" in stages and len(stages) >= 3
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER\s+10001", runtime, flags=re.MULTILINE)
    assert 'ENTRYPOINT ["ratepilot"]' in runtime
    assert "apt-get" not in runtime and "pip install" not in runtime  # build tools stay in the builder
    for source in re.findall(r"^COPY\s+(?!--from)(\S+)", text, flags=re.MULTILINE):
        assert (ROOT / source).exists(), f"COPY {source}: missing"
    assert (DEPLOY / "Dockerfile.dockerignore").is_file()
