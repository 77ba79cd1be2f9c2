"""Packaging: the server wheel carries the embedded models; the SDK wheel needs no torch."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def _wheel(source: Path, out: Path) -> zipfile.ZipFile:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(source), "-w", str(out)], check=True, capture_output=True)
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def _requires(wheel: zipfile.ZipFile) -> list[str]:
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return [line.split(":", 1)[1].strip() for line in wheel.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")]


def test_server_wheel_ships_the_embedded_models(tmp_path):
    names = set(_wheel(ROOT, tmp_path).namelist())
    for folder in ("toy", "toy-sam", "toy-evaluator"):
        shipped = ROOT / "services" / "atelier" / "embedded" / folder
        if not shipped.exists():
            continue
        for file in shipped.rglob("*"):
            if file.is_file():
                assert f"atelier/{file.relative_to(ROOT / 'services' / 'atelier').as_posix()}" in names


def test_sdk_wheel_is_torch_free_and_carries_the_stubs(tmp_path):
    wheel = _wheel(ROOT / "clients" / "python", tmp_path)
    requires = _requires(wheel)
    assert not [r for r in requires if r.split()[0].lower().startswith(("torch", "diffusers", "transformers"))]
    names = set(wheel.namelist())
    assert {"atelier/__init__.py", "atelier/v1/inversion_pb2.py", "atelier/v1/segmentation_pb2_grpc.py",
            "atelier/sdk/client.py"} <= names
