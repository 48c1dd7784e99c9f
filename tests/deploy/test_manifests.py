"""The Kubernetes manifests (kustomize layout) parse, validate against the Kubernetes schemas offline and hang together; the configs they ship validate."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controller.service import build_parser as controller_parser
from controller.service import settings_from_args
from limiter.config import load_config
from limiter.edge import build_parser as edge_parser

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
BASE = K8S / "base"


def load_kustomization(folder: Path) -> list[dict[str, Any]]:
    """Every document of a kustomization's resources, recursively (no patches applied)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = (folder / resource).resolve()
        if path.is_dir():
            docs += load_kustomization(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    """The base's documents."""
    return load_kustomization(BASE)


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Documents of one kind by name."""
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A matchLabels selector selects these labels."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_every_resource_and_generated_file_exists() -> None:
    for folder in (BASE, K8S / "overlays" / "production"):
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        for resource in kustomization["resources"]:
            assert (folder / resource).exists(), f"{folder}: {resource}"
        for generator in kustomization.get("configMapGenerator", []):
            for file in generator["files"]:
                assert (folder / file).is_file(), f"{folder}: {file}"


def test_the_required_objects_are_there(docs: list[dict[str, Any]]) -> None:
    deployments = of_kind(docs, "Deployment")
    assert set(deployments) == {"redis", "ratepilot-edge", "ratepilot-controller"}
    assert deployments["ratepilot-controller"]["spec"]["replicas"] == 2
    assert set(of_kind(docs, "Service")) == {"redis", "ratepilot-edge", "ratepilot-controller"}
    assert set(of_kind(docs, "PodDisruptionBudget")) == {"ratepilot-edge", "ratepilot-controller"}
    assert set(of_kind(docs, "ServiceMonitor")) == {"ratepilot"}
    assert set(of_kind(docs, "PrometheusRule")) == {"ratepilot"}
    assert set(of_kind(docs, "HorizontalPodAutoscaler")) == {"ratepilot-edge"}


def test_deployment_selectors_match_their_pods_and_containers_are_bounded(docs: list[dict[str, Any]]) -> None:
    for name, deployment in of_kind(docs, "Deployment").items():
        spec = deployment["spec"]
        pod_labels = spec["template"]["metadata"]["labels"]
        assert matches(spec["selector"]["matchLabels"], pod_labels), name
        assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True, name
        for container in spec["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"]), name
            assert "readinessProbe" in container and "livenessProbe" in container, name
            port_names = {port["name"] for port in container["ports"]}
            for probe in (container["readinessProbe"], container["livenessProbe"]):
                target = probe.get("httpGet") or probe.get("tcpSocket")
                if target is not None:
                    assert target["port"] in port_names, f"{name}: probe port {target['port']}"


def test_services_select_a_deployment_and_target_a_named_port(docs: list[dict[str, Any]]) -> None:
    deployments = of_kind(docs, "Deployment").values()
    for name, service in of_kind(docs, "Service").items():
        selected = [d for d in deployments if matches(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert len(selected) == 1, name
        ports = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{name}: {port}"


def test_pdbs_servicemonitor_and_hpa_point_at_real_objects(docs: list[dict[str, Any]]) -> None:
    deployments = of_kind(docs, "Deployment")
    for name, pdb in of_kind(docs, "PodDisruptionBudget").items():
        assert matches(pdb["spec"]["selector"]["matchLabels"], deployments[name]["spec"]["template"]["metadata"]["labels"])
        assert pdb["spec"]["minAvailable"] < deployments[name]["spec"]["replicas"]
    monitor = of_kind(docs, "ServiceMonitor")["ratepilot"]
    scraped = [s for s in of_kind(docs, "Service").values() if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert {s["metadata"]["name"] for s in scraped} == {"ratepilot-edge", "ratepilot-controller"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in scraped)
        assert endpoint["path"] == "/metrics"
    hpa = of_kind(docs, "HorizontalPodAutoscaler")["ratepilot-edge"]["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment" and hpa["scaleTargetRef"]["name"] in deployments
    metrics = {m["type"]: m for m in hpa["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Resource"]["resource"]["target"]["averageUtilization"] == 60
    assert metrics["External"]["external"]["metric"]["name"] == "token_bucket_utilization"
    assert metrics["External"]["external"]["target"]["value"] == "70"
    assert hpa["minReplicas"] >= 2


def test_config_maps_mounted_by_the_deployments_are_generated(docs: list[dict[str, Any]]) -> None:
    generated = {g["name"] for g in yaml.safe_load((BASE / "kustomization.yaml").read_text())["configMapGenerator"]}
    mounted = {
        volume["configMap"]["name"]
        for deployment in of_kind(docs, "Deployment").values()
        for volume in deployment["spec"]["template"]["spec"].get("volumes", [])
        if "configMap" in volume
    }
    assert mounted == generated


def test_container_args_parse_with_the_real_command_lines(docs: list[dict[str, Any]]) -> None:
    deployments = of_kind(docs, "Deployment")
    edge_args = deployments["ratepilot-edge"]["spec"]["template"]["spec"]["containers"][0]["args"]
    controller_args = deployments["ratepilot-controller"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert edge_args[0] == "edge" and controller_args[0] == "controller"
    edge = edge_parser().parse_args(edge_args[1:])
    assert edge.port == 8080 and edge.config == "/etc/ratepilot/limiter.yaml"
    controller = controller_parser().parse_args(controller_args[1:])
    assert controller.port == 8081 and str(controller.config) == "/etc/ratepilot/controller.yaml"


def test_shipped_configs_validate_and_agree_on_the_tiers() -> None:
    limiter = load_config(BASE / "config" / "limiter.yaml")
    args = controller_parser().parse_args(["--config", str(BASE / "config" / "controller.yaml")])
    controller = settings_from_args(args, env={})
    assert set(limiter.tiers) == set(controller.tier_names)
    for name, tier in limiter.tiers.items():
        assert controller.tiers[name].static_rate == tier.aggregate.rate, name
    assert controller.lease.enabled and controller.admin.host == "0.0.0.0"


def test_prometheusrule_is_in_sync_with_the_rule_files() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_prometheusrule", K8S / "sync_prometheusrule.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (BASE / "prometheusrule.yaml").read_text() == module.render(), "run deploy/k8s/sync_prometheusrule.py"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("folder", ["base", "overlays/production"])
def test_kustomize_builds(folder: str) -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = sorted(doc["kind"] for doc in built)
    assert kinds.count("Deployment") == 3 and kinds.count("ConfigMap") == 2
    if folder.startswith("overlays"):
        assert {doc["metadata"].get("namespace") for doc in built if doc["kind"] != "Namespace"} == {"ratepilot"}
        images = {c["image"] for d in built if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]}
        assert "ghcr.io/ratepilot/ratepilot:0.1.0" in images


# prometheus-operator's custom resources: kubernetes-validate ships the Kubernetes schemas only
OPERATOR_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())  # oldest we claim, newest the package knows


def every_manifest() -> list[dict[str, Any]]:
    """The base's documents and the production overlay's own."""
    overlay = K8S / "overlays" / "production" / "namespace.yaml"
    return load_kustomization(BASE) + [doc for doc in yaml.safe_load_all(overlay.read_text()) if doc]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    """Offline, strict (an unknown or misspelt field is an error), against the schemas kubernetes-validate ships."""
    checked, operator = [], []
    for doc in every_manifest():
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert (doc["apiVersion"], doc["kind"]) in OPERATOR_KINDS, f"{name}: no schema for {doc['apiVersion']}"
            operator.append(name)
            continue
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name} (Kubernetes {version}): {path}: {exc.message}")
        checked.append(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Namespace"} <= set(checked)
    assert len(operator) == 2


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("Deployment", lambda d: d["spec"].update(replicas="two"), "is not of type 'integer'"),
        ("Deployment", lambda d: d["spec"]["template"]["spec"].update(restartPolicy2="Always"), "Additional properties"),
        ("Service", lambda d: d["spec"]["ports"][0].pop("port"), "'port' is a required property"),
    ],
)
def test_the_schema_check_catches_a_broken_manifest(kind: str, change: Any, message: str) -> None:
    doc = copy.deepcopy(next(d for d in every_manifest() if d["kind"] == kind))
    change(doc)
    with pytest.raises(kubernetes_validate.ValidationError, match=message):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
