"""Start and stop a real tritonserver (the one nvidia-pytriton bundles) for the SAM encoder.

PyTriton's own ``Triton`` class serves Python callables through its proxy backend; we
serve a plain model repository (deploy/triton-repository), so the binary is run directly:
loopback addresses and explicit ports, the Python-backend stub matching the Triton venv's
Python copied into a private backend folder, LD_LIBRARY_PATH pointing at that Python's
lib folder (a pyenv Python's stub otherwise loads the system libpython), a per-instance
shared-memory prefix, PR_SET_PDEATHSIG so the server never outlives us, and SIGTERM to
stop it (tritonserver then unloads models and frees its /dev/shm regions).

    python -m atelier.segmentation.triton_launcher --triton-venv .venv-triton
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

__all__ = ["TritonServer", "TritonLaunchError", "find_tritonserver", "free_port"]

_LOG = logging.getLogger(__name__)
REPOSITORY = Path(__file__).resolve().parents[3] / "deploy" / "triton-repository"
MODEL_NAME = "sam_image_encoder"


class TritonLaunchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _venv_python_version(venv: Path) -> str:
    libs = sorted(glob.glob(str(venv / "lib" / "python3.*")))
    if not libs:
        raise TritonLaunchError(f"{venv} is not a Python virtual environment (no lib/python3.*)")
    return Path(libs[-1]).name.removeprefix("python")


def find_tritonserver(venv: Path) -> Path:
    """The tritonserver binary inside the venv's pytriton package."""
    version = _venv_python_version(venv)
    binary = venv / "lib" / f"python{version}" / "site-packages" / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if not binary.exists():
        raise TritonLaunchError(f"no tritonserver in {venv}: install nvidia-pytriton there (make triton-venv)")
    return binary


def _base_python_lib(venv: Path) -> Optional[Path]:
    """The lib folder of the Python the venv was made from (pyvenv.cfg's ``home``/../lib)."""
    config = venv / "pyvenv.cfg"
    if not config.exists():
        return None
    for line in config.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            lib = Path(value.strip()).parent / "lib"
            return lib if lib.is_dir() else None
    return None


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGTERM the server if the launching process dies.
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class TritonServer:
    """One tritonserver process on loopback; use as a context manager or start()/stop()."""

    def __init__(self, triton_venv: str | Path, model_repository: str | Path = REPOSITORY,
                 sam_path: Optional[str] = None, grpc_port: int = 0, http_port: int = 0, metrics_port: int = 0,
                 host: str = "127.0.0.1", extra_env: Optional[dict] = None, log_verbose: int = 0):
        self.venv = Path(triton_venv).resolve()
        self.binary = find_tritonserver(self.venv)
        self.model_repository = Path(model_repository).resolve()
        self.sam_path = sam_path
        self.host = host
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.extra_env = dict(extra_env or {})
        self.log_verbose = log_verbose
        self.shm_prefix = f"atelier_triton_{os.getpid()}_{self.grpc_port}_"
        self.process: Optional[subprocess.Popen] = None
        self.workspace: Optional[Path] = None
        self.log_path: Optional[Path] = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    # ------------------------------------------------------------------ lifecycle
    def _prepare_backends(self, workspace: Path) -> Path:
        version = _venv_python_version(self.venv)
        server_root = self.binary.parent.parent
        backend = workspace / "backends" / "python"
        backend.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy(server_root / "backends" / "python" / name, backend / name)
        stub = server_root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise TritonLaunchError(f"pytriton ships no Python-backend stub for Python {version}")
        shutil.copy(stub, backend / "triton_python_backend_stub")
        return workspace / "backends"

    def _environment(self) -> dict:
        env = os.environ.copy()
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"  # the stub's python: the Triton venv's
        env.pop("PYTHONPATH", None)  # never leak the service venv's packages into the stub
        env.pop("VIRTUAL_ENV", None)
        libs = [str(p) for p in (_base_python_lib(self.venv),) if p]
        libs.append(str(self.binary.parents[3] / "nvidia_pytriton.libs"))
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        if self.sam_path:
            env["ATELIER_TRITON_SAM_PATH"] = str(self.sam_path)
        env.update(self.extra_env)
        return env

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise TritonLaunchError("already started")
        self.workspace = Path(tempfile.mkdtemp(prefix="atelier-triton-"))
        backends = self._prepare_backends(self.workspace)
        self.log_path = self.workspace / "tritonserver.log"
        command = [
            str(self.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--disable-auto-complete-config",  # the config is complete; skips one stub launch (~5 s)
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=self._environment(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, cwd=self.workspace)
        return self

    def logs(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return ""

    def wait_ready(self, timeout: float = 60.0, model: str = MODEL_NAME) -> None:
        """Block until the server and ``model`` are ready; raise with the log tail otherwise."""
        import tritonclient.grpc as triton_grpc
        from tritonclient.utils import InferenceServerException

        client = triton_grpc.InferenceServerClient(self.grpc_url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process is None or self.process.poll() is not None:
                    code = None if self.process is None else self.process.returncode
                    raise TritonLaunchError(f"tritonserver exited (code {code}):\n{self.logs()[-4000:]}")
                try:
                    if client.is_server_ready(client_timeout=1.0) and client.is_model_ready(model, client_timeout=1.0):
                        return
                except InferenceServerException:
                    pass
                if time.monotonic() > deadline:
                    raise TritonLaunchError(f"tritonserver not ready after {timeout:.0f}s:\n{self.logs()[-4000:]}")
                time.sleep(0.1)
        finally:
            client.close()

    def shm_segments(self) -> list[str]:
        """This server's shared-memory segments currently in /dev/shm."""
        return sorted(glob.glob(f"/dev/shm/{self.shm_prefix}*"))

    def stop(self, timeout: float = 20.0) -> list[str]:
        """SIGTERM, wait (SIGKILL after ``timeout``), remove the workspace.

        Returns the shared-memory segments a clean shutdown should have freed but did not
        (they are removed too, so nothing leaks either way)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _LOG.warning("tritonserver ignored SIGTERM for %.0fs; killing it", timeout)
                self.process.kill()
                self.process.wait()
        leftovers = self.shm_segments()
        for path in leftovers:
            _LOG.warning("removing leaked shared-memory segment %s", path)
            Path(path).unlink(missing_ok=True)
        if self.workspace is not None:
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.workspace = None
        return leftovers

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton-venv", default=".venv-triton")
    parser.add_argument("--model-repository", default=str(REPOSITORY))
    parser.add_argument("--sam-path", help="SamModel folder (default: the registry's toy-sam)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sam_path = args.sam_path
    if not sam_path:
        from atelier.core.models import ModelRegistry

        sam_path = ModelRegistry.from_config().resolve("toy-sam")
    server = TritonServer(args.triton_venv, args.model_repository, sam_path=sam_path, host=args.host,
                          grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        server.wait_ready(timeout=120)
        _LOG.info("tritonserver ready: grpc %s, metrics %s", server.grpc_url, server.metrics_url)
        while not stop.wait(0.5):
            if server.process.poll() is not None:
                _LOG.error("tritonserver exited (code %s)", server.process.returncode)
                sys.stderr.write(server.logs()[-4000:])
                return 1
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
