"""Kubernetes manifests: every overlay renders (kubectl kustomize), every object validates
(kubernetes-validate --strict for built-in kinds, the published prometheus-operator CRD schemas
for ServiceMonitor/PrometheusRule), and the policy points hold on the rendered objects."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["gpu", "cpu-dev", "triton", "multi-replica", "tls"]
SERVICES = {"inversion": 50051, "segmentation": 50052, "personalization": 50053, "synthesis": 50054}
STATELESS = {"inversion", "segmentation", "synthesis"}
# Who calls whom (NetworkPolicy must allow exactly these service-to-service paths).
CALLERS = {"inversion": {"synthesis"}, "segmentation": {"personalization"}, "personalization": {"inversion"},
           "synthesis": set(), "triton": {"segmentation"}}
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors.v1.json",
               ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrules.v1.json"}
KUBERNETES_VERSION = "1.31"


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (make tools)")
    return path


@lru_cache(maxsize=None)
def _render(overlay: str) -> tuple:
    out = subprocess.run([_require("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def _objects(overlay: str, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: copy.deepcopy(d) for d in _render(overlay) if d["kind"] == kind}


def _strict(schema):
    """Reject unknown fields like `kubectl apply --validate=strict`: objects with declared
    properties and no additionalProperties/preserve-unknown-fields get additionalProperties false."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_validator(published: dict):
    import jsonschema

    # Not check_schema(): one published pattern uses Go's inline (?i), which Python's re
    # refuses in that position; patterns are compiled only for fields that are present.
    return jsonschema.Draft7Validator(_strict(published["openAPIV3Schema"]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    jsonschema = pytest.importorskip("jsonschema")
    docs = _render(overlay)
    kinds = {d["kind"] for d in docs}
    assert kinds >= {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy", "ServiceAccount",
                     "PersistentVolumeClaim", "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"}
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_SCHEMAS:
            published = json.loads((Path(__file__).with_name("schemas") / CRD_SCHEMAS[key]).read_text())
            _crd_validator(published).validate(doc)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_crd_validation_catches_mistakes() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    published = json.loads((Path(__file__).with_name("schemas") / "servicemonitors.v1.json").read_text())
    (monitor,) = _objects("gpu", "ServiceMonitor").values()
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        _crd_validator(published).validate(monitor)


def _env(container: dict) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        assert item["name"] not in env, f"{container['name']}: {item['name']} set twice"
        env[item["name"]] = item.get("value")
    return env


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy(overlay: str) -> None:
    deployments = _objects(overlay, "Deployment")
    services = _objects(overlay, "Service")
    pdbs = list(_objects(overlay, "PodDisruptionBudget").values())
    policies = list(_objects(overlay, "NetworkPolicy").values())
    accounts = _objects(overlay, "ServiceAccount")
    expected = {f"atelier-{name}" for name in SERVICES} | ({"atelier-triton"} if overlay == "triton" else set())
    assert set(deployments) == expected
    for name, deployment in deployments.items():
        short = name.removeprefix("atelier-")
        pod = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert pod["automountServiceAccountToken"] is False
        assert accounts[pod["serviceAccountName"]]["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"] == labels
        for container in pod["containers"]:
            # Pod Security "restricted", at container level.
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True
            assert sc["capabilities"]["drop"] == ["ALL"] and sc["readOnlyRootFilesystem"] is True
            assert sc["seccompProfile"]["type"] == "RuntimeDefault"
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert limits["cpu"] == requests["cpu"] and "memory" in limits
            env = _env(container)
            assert int(env["OMP_NUM_THREADS"]) == _cpu(limits["cpu"]), name
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts["/models"]["readOnly"] is True
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"] == "atelier-models"
            for volume in volumes.values():
                if "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory":
                    assert volume["emptyDir"].get("sizeLimit"), volume
            if short == "triton":
                continue
            assert "/var/cache/atelier" in mounts and "/tmp" in mounts  # writable hub caches on a read-only root
            port = SERVICES[short]
            # With TLS on the gRPC port, kubelet's plaintext gRPC probes go to the health-only port.
            probed = int(env["ATELIER_HEALTH_PORT"]) if "ATELIER_TLS_CERT" in env else port
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"]["port"] == probed, (name, probe)
            startup = container["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= (300 if overlay == "cpu-dev" else 600)
            assert pod["terminationGracePeriodSeconds"] > float(env["ATELIER_GRACE_SECONDS"])
            assert int(env["ATELIER_PORT"]) == port
            gpu = limits.get("nvidia.com/gpu")
            if overlay == "cpu-dev" or (overlay == "triton" and short == "segmentation"):
                assert gpu is None and env["ATELIER_DEVICE"] == "cpu"
            else:
                assert gpu == 1 and env["ATELIER_DEVICE"] == "cuda"
        # Headless Service, PDB, NetworkPolicy for every Deployment.
        service = services[name]
        assert service["spec"]["clusterIP"] == "None" and _selects({"matchLabels": service["spec"]["selector"]}, labels)
        assert {p["name"] for p in service["spec"]["ports"]} >= {"grpc", "metrics"}
        assert "health" not in {p["name"] for p in service["spec"]["ports"]}  # for kubelet only
        assert [p for p in pdbs if _selects(p["spec"]["selector"], labels)], f"no PodDisruptionBudget for {name}"
        (policy,) = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        callers = set()
        for rule in policy["spec"]["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            assert ports <= {"grpc", "metrics"}, (name, ports)  # never the plaintext health port
            for source in rule["from"]:
                pod_labels = source.get("podSelector", {}).get("matchLabels", {})
                if pod_labels:
                    assert ports == {"grpc"}
                    callers.add(pod_labels["app.kubernetes.io/name"].removeprefix("atelier-"))
                else:
                    assert set(source) == {"namespaceSelector"}, "ingress from anywhere"
        assert callers == CALLERS[short], (name, callers)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_and_state(overlay: str) -> None:
    hpas = _objects(overlay, "HorizontalPodAutoscaler")
    assert set(hpas) == {f"atelier-{name}" for name in STATELESS}
    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "rules.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]}
    for hpa in hpas.values():
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in served
    personalization = _objects(overlay, "Deployment")["atelier-personalization"]
    container = personalization["spec"]["template"]["spec"]["containers"][0]
    names = {e["name"]: e for e in container["env"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
              for v in personalization["spec"]["template"]["spec"]["volumes"]}
    pvcs = _objects(overlay, "PersistentVolumeClaim")
    # ReadOnlyMany on real clusters; single-node dev clusters have only ReadWriteOnce.
    assert pvcs["atelier-models"]["spec"]["accessModes"] == (["ReadWriteOnce"] if overlay == "cpu-dev" else ["ReadOnlyMany"])
    if overlay == "multi-replica":
        assert personalization["spec"]["replicas"] >= 2
        assert names["ATELIER_DATABASE"]["valueFrom"]["secretKeyRef"]["name"] == "atelier-personalization-db"
        assert pvcs[claims["artifacts"]]["spec"]["accessModes"] == ["ReadWriteMany"]
        assert "atelier-personalization-data" not in pvcs
    else:
        # SQLite on a ReadWriteOnce volume: one replica, never two pods at once.
        assert personalization["spec"]["replicas"] == 1 and personalization["spec"]["strategy"]["type"] == "Recreate"
        assert "ATELIER_DATABASE" not in names
        assert pvcs[claims["data"]]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_triton_overlay_wires_segmentation_to_triton() -> None:
    deployments = _objects("triton", "Deployment")
    env = _env(deployments["atelier-segmentation"]["spec"]["template"]["spec"]["containers"][0])
    assert env["ATELIER_SEGMENTATION_BACKEND"] == "triton"
    host, port = env["ATELIER_TRITON_URL"].split(":")
    triton = deployments["atelier-triton"]["spec"]["template"]["spec"]["containers"][0]
    assert host == "atelier-triton" and f"--grpc-port={port}" in triton["args"]
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The repository is the ONNX export the models-pull Job writes on the models volume.
    repository = next(a for a in triton["args"] if a.startswith("--model-repository=")).split("=", 1)[1]
    assert any(m["mountPath"] == "/models" and repository.startswith("/models/") for m in triton["volumeMounts"])
    job = _models_pull_job()
    (export,) = job["spec"]["template"]["spec"]["containers"]
    assert export["args"][:2] == ["atelier.models", "export-sam-onnx"]
    assert export["args"][export["args"].index("--repository") + 1] == repository
    model = export["args"][export["args"].index("--sam") + 1]
    segmentation = _objects("triton", "ConfigMap")
    (config,) = [c for c in segmentation.values() if c["metadata"]["name"].startswith("atelier-models")]
    registry = dict(e.split("=", 1) for e in config["data"]["ATELIER_MODELS"].split(";"))
    assert registry[config["data"]["ATELIER_SEGMENTATION_MODEL"]] == model


def _check_tls(deployments: dict[str, dict]) -> None:
    """Every service serves TLS from the Secret atelier-tls, calls its peers over TLS, and is
    probed on its plaintext health-only port (kubelet's gRPC probe cannot speak TLS)."""
    for service, port in SERVICES.items():
        pod = deployments[f"atelier-{service}"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = _env(container)
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/var/run/atelier/tls"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert mount["readOnly"] is True and volume["secret"]["secretName"] == "atelier-tls"
        assert {env[k] for k in ("ATELIER_TLS_CERT", "ATELIER_TLS_KEY", "ATELIER_PEER_TLS_CA")} == {
            "/var/run/atelier/tls/" + key for key in ("tls.crt", "tls.key", "ca.crt")}
        health = int(env["ATELIER_HEALTH_PORT"])
        assert health not in (port, int(env["ATELIER_METRICS_PORT"]))
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["health"] == health
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": health}, (service, probe)
    for name, deployment in deployments.items():
        if name.removeprefix("atelier-") not in SERVICES:  # e.g. Triton: untouched
            assert "ATELIER_TLS_CERT" not in _env(deployment["spec"]["template"]["spec"]["containers"][0])


def test_tls_overlay_and_component() -> None:
    _check_tls(_objects("tls", "Deployment"))
    for overlay in OVERLAYS:
        if overlay != "tls":
            assert "ATELIER_TLS_CERT" not in _env(
                _objects(overlay, "Deployment")["atelier-inversion"]["spec"]["template"]["spec"]["containers"][0])


@pytest.mark.parametrize("overlay", ["cpu-dev", "triton", "multi-replica"])
def test_tls_component_composes_with_other_overlays(overlay: str, tmp_path: Path) -> None:
    """What docs/DEPLOY.md tells users: add the component to their overlay."""
    k8s = os.path.relpath(ROOT / "k8s", tmp_path)  # kustomize refuses absolute paths
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{k8s}/overlays/{overlay}]\ncomponents: [{k8s}/components/tls]\n")
    out = subprocess.run([_require("kubectl"), "kustomize", str(tmp_path)],
                         check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    _check_tls({d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"})


def test_registry_names_folders_on_the_models_volume() -> None:
    (config,) = [c for c in _objects("gpu", "ConfigMap").values() if c["metadata"]["name"].startswith("atelier-models")]
    entries = dict(e.split("=", 1) for e in config["data"]["ATELIER_MODELS"].split(";"))
    assert entries and all(path.startswith("/models/") for path in entries.values())
    for service in SERVICES:
        assert config["data"][f"ATELIER_{service.upper()}_MODEL"] in entries
    assert config["data"]["HF_HOME"].startswith("/var/cache/atelier")


def test_dependency_addresses_use_headless_dns() -> None:
    deployments = _objects("gpu", "Deployment")
    for service, callers in CALLERS.items():
        for caller in callers - {"segmentation"}:  # segmentation -> triton: the triton overlay's URL
            env = _env(deployments[f"atelier-{caller}"]["spec"]["template"]["spec"]["containers"][0])
            assert env[f"ATELIER_{service.upper()}_ADDRESS"] == f"dns:///atelier-{service}:{SERVICES[service]}"


def test_dockerfile_user_has_a_home() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "--create-home" in dockerfile and "USER 10001" in dockerfile


def _models_pull_job() -> dict:
    out = subprocess.run([_require("kubectl"), "kustomize", str(ROOT / "k8s" / "jobs" / "models-pull")],
                         check=True, capture_output=True, text=True).stdout
    (job,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Job"]
    return job


def test_models_pull_job_validates_and_fills_the_registry_folders() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    out = subprocess.run([_require("kubectl"), "kustomize", str(ROOT / "k8s" / "jobs" / "models-pull")],
                         check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    (job,) = [d for d in docs if d["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    for container in pod["initContainers"] + pod["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    args = pod["initContainers"][0]["args"]
    assert args[:4] == ["atelier.models", "pull", "--to", "/models"]
    pulled = {entry.split("=", 1)[0]: "/models/" + entry.split("=", 1)[1].rsplit("/", 1)[-1] for entry in args[4:]}
    (config,) = [c for c in _objects("gpu", "ConfigMap").values() if c["metadata"]["name"].startswith("atelier-models")]
    registry = dict(e.split("=", 1) for e in config["data"]["ATELIER_MODELS"].split(";"))
    assert pulled == registry
