"""Packaging: the server wheel carries the embedded models; the SDK wheel needs no torch;
the two share the ``atelier`` namespace without both shipping ``atelier/__init__.py``."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


# What each project's build reads: the server is found under services/, the SDK under atelier/.
_PROJECT_FILES = {ROOT: ("pyproject.toml", "services"),
                  ROOT / "clients" / "python": ("pyproject.toml", "README.md", "atelier")}


def _wheel(source: Path, out: Path) -> zipfile.ZipFile:
    """Build ``source``'s wheel from a clean copy of its sources: setuptools packs whatever its
    build/ folder holds, so building in the checkout would ship files a stale build/ kept from
    an older layout (and builds running at once would share that folder)."""
    clean = out / "src"
    for name in _PROJECT_FILES[source]:
        if (source / name).is_dir():
            shutil.copytree(source / name, clean / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        elif (source / name).exists():
            clean.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, clean / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           str(clean), "-w", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
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


def test_sdk_wheel_is_typed(tmp_path):
    names = set(_wheel(ROOT / "clients" / "python", tmp_path).namelist())
    assert {"atelier/py.typed", "atelier/v1/inversion_pb2.pyi", "atelier/v1/atelier.protoset",
            "atelier/aio/client.py"} <= names


def test_only_the_sdk_owns_the_package_init_and_survives_uninstalling_the_server(tmp_path):
    sdk = _wheel(ROOT / "clients" / "python", tmp_path / "sdk")
    server = _wheel(ROOT, tmp_path / "server")
    assert "atelier/__init__.py" in sdk.namelist()
    assert "atelier/__init__.py" not in server.namelist()  # the server is a namespace portion

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Third-party dependencies come from this environment (a path entry: its own .pth files, which
    # point at the editable atelier sources, are not processed), so nothing is downloaded.
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    def pip(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "pip", "--python", python, *args], check=True, capture_output=True)

    def run(code: str) -> subprocess.CompletedProcess:
        # without PYTHONPATH: a source folder on it would stand in for the uninstalled server
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        return subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)

    pip("install", "-q", "--no-deps", sdk.filename, server.filename)
    both = run("import atelier, atelier.core.errors, atelier.inversion.servicer; print(atelier.Client.__name__)")
    assert both.returncode == 0 and both.stdout.strip() == "Client", both.stderr
    pip("uninstall", "-q", "-y", "atelier-server")
    sdk_only = run("import atelier; atelier.Client('127.0.0.1:1').close(); import atelier.sdk.inversion")
    assert sdk_only.returncode == 0, sdk_only.stderr
    assert "No module named 'atelier.core'" in run("import atelier.core").stderr
