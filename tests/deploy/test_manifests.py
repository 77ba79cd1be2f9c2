"""Deploy checks: the kustomize overlays build and validate against the Kubernetes
schema offline, and the Prometheus rules pass promtool's checks and unit tests."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["gpu", "cpu-dev", "triton"]
SERVICE_PORTS = {"atelier-inversion": 50051, "atelier-segmentation": 50052}


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (.ci/run installs it)")
    return path


def _build(overlay: str) -> list[dict]:
    out = subprocess.run(
        [_require("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        check=True, capture_output=True, text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _build(overlay)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.31", strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_probe_health_and_drain(overlay: str) -> None:
    deployments = {d["metadata"]["name"]: d for d in _build(overlay) if d["kind"] == "Deployment"}
    triton = deployments.pop("atelier-triton", None)
    assert set(deployments) == set(SERVICE_PORTS)
    assert (triton is not None) == (overlay == "triton")
    for name, dep in deployments.items():
        spec = dep["spec"]["template"]["spec"]
        container = spec["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        grace = int(env["ATELIER_GRACE_SECONDS"])
        # Kubernetes must wait longer than the server drains, or it kills in-flight work.
        assert spec["terminationGracePeriodSeconds"] > grace
        assert container["readinessProbe"]["grpc"]["port"] == SERVICE_PORTS[name]
        assert int(env["ATELIER_PORT"]) == SERVICE_PORTS[name]
        if overlay in ("gpu", "triton"):
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert env["ATELIER_DEVICE"] == "cuda"
        if overlay == "triton" and name == "atelier-segmentation":
            assert env["ATELIER_SEGMENTATION_BACKEND"] == "triton"
            host, port = env["ATELIER_TRITON_URL"].split(":")
            served = triton["spec"]["template"]["spec"]["containers"][0]
            assert host == "atelier-triton" and f"--grpc-port={port}" in served["args"]
            assert served["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_prometheus_rules_check_and_unit_tests() -> None:
    promtool = _require("promtool")
    rules = ROOT / "deploy" / "prometheus"
    subprocess.run([promtool, "check", "rules", "atelier-rules.yaml"], cwd=rules, check=True, capture_output=True)
    result = subprocess.run([promtool, "test", "rules", "atelier-rules.test.yaml"], cwd=rules, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
