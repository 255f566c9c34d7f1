"""The shipped cluster files parse and refer only to metrics carpool exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import carpool.orchestrator.runtime.ray_runtime as ray_runtime
import carpool.orchestrator.serving.base_server as base_server

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def exported_metric_names() -> set[str]:
    """Names passed to ray.util.metrics in the runtime and the serving replicas, as
    Prometheus shows them (a histogram as its buckets)."""
    names = set()
    for module in (ray_runtime, base_server):
        source = Path(module.__file__).read_text()
        for kind, name in re.findall(
            r'ray_metrics\.(Gauge|Counter|Histogram)\(\s*"([a-z_]+)"', source
        ):
            names.add(f"ray_{name}_bucket" if kind == "Histogram" else f"ray_{name}")
    return names


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((CLUSTER / "grafana_dashboard.json").read_text())
    assert dashboard["panels"], "dashboard has no panels"
    exported = exported_metric_names()
    assert "ray_carpool_job_loss" in exported
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"ray_carpool_[a-z_]+", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queried |= set(re.findall(r"ray_carpool_[a-z_]+", variable["definition"]))
    assert queried and queried <= exported, queried - exported
    # Every exported metric is on the dashboard.
    assert exported <= queried, exported - queried


def test_ray_cluster_launcher_config_matches_rays_own_schema() -> None:
    """Validated against the JSON schema the Ray cluster launcher itself uses."""
    import jsonschema
    import ray
    import yaml

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)  # the schema forbids unknown top-level fields
    assert config["head_node_type"] in config["available_node_types"]
    assert any("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"])


# Fields of KubeRay's ray.io/v1 RayCluster and the Kubernetes pod template, as
# listed in the KubeRay CRD API reference (docs.ray.io, "KubeRay CRD API
# reference") and the Kubernetes API reference for PodSpec and Container.
KUBERAY_FIELDS = {
    "RayCluster": {"apiVersion", "kind", "metadata", "spec"},
    "RayClusterSpec": {
        "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
        "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
        "workerGroupSpecs",
    },
    "AuthOptions": {"mode", "secretName", "enableK8sTokenAuth"},
    "HeadGroupSpec": {"template", "headService", "enableIngress", "rayStartParams", "serviceType"},
    "WorkerGroupSpec": {
        "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
        "rayStartParams", "template", "scaleStrategy", "numOfHosts",
    },
    "PodTemplateSpec": {"metadata", "spec"},
    "PodSpec": {
        "containers", "initContainers", "volumes", "nodeSelector", "tolerations", "affinity",
        "serviceAccountName", "imagePullSecrets", "securityContext", "priorityClassName",
    },
    "Container": {
        "name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "ports",
        "resources", "volumeMounts", "lifecycle", "securityContext", "workingDir",
    },
}  # fmt: skip


def _check(obj: dict, kind: str) -> None:
    unknown = set(obj) - KUBERAY_FIELDS[kind]
    assert not unknown, f"{kind} has fields its API does not define: {sorted(unknown)}"


def _check_pod_template(template: dict) -> None:
    _check(template, "PodTemplateSpec")
    _check(template["spec"], "PodSpec")
    for container in template["spec"]["containers"]:
        _check(container, "Container")


def test_kuberay_manifest_names_only_defined_fields() -> None:
    import yaml

    manifest = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    _check(manifest, "RayCluster")
    spec = manifest["spec"]
    _check(spec, "RayClusterSpec")
    assert spec["authOptions"]["mode"] == "token"
    _check(spec["authOptions"], "AuthOptions")
    _check(spec["headGroupSpec"], "HeadGroupSpec")
    _check_pod_template(spec["headGroupSpec"]["template"])
    assert all(isinstance(v, str) for v in spec["headGroupSpec"]["rayStartParams"].values())
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        _check(group, "WorkerGroupSpec")
        _check_pod_template(group["template"])
        for container in group["template"]["spec"]["containers"]:
            gpus += int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert gpus >= 1, "the worker group has no GPU"


def test_operator_example_loads() -> None:
    from carpool.orchestrator.control.operator_config import load_operator_config

    config = load_operator_config(CLUSTER / "operator.example.yaml")
    assert config.storage.startswith("s3://") and config.group_size == 2
