"""Local launcher: every configured Atelier service (and Triton when asked) on loopback,
wired to each other, on the embedded models.

    python -m atelier.launcher                      # up until Ctrl-C / SIGTERM
    python -m atelier.launcher --triton             # the segmentation encoder on Triton too
    python -m atelier.launcher -- python examples/demo.py   # run a command against them, then stop

deploy/local/services.json lists the services: name, port, metrics_port, ``calls`` (services
it depends on: each becomes ``--<name>-address host:port``), ``args`` (extra flags) and ``env``.
The launcher starts them all, waits until each reports SERVING on grpc.health.v1, prints their
addresses, and on Ctrl-C / SIGTERM (or when the command ends) sends SIGTERM to every child's
process group, waits for the drains, SIGKILLs what is left: no process outlives it (the
children also get PR_SET_PDEATHSIG, so even a SIGKILLed launcher takes them along).
The command sees ATELIER_<SERVICE>_ADDRESS for every service and exits with its status.

Kubernetes does this job in production (k8s/); this is for one machine.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["main", "ServiceSpec", "load_config", "installed", "thread_env"]

_PR_SET_PDEATHSIG = 1


@dataclass
class ServiceSpec:
    name: str
    port: int
    metrics_port: int
    host: str = "127.0.0.1"
    calls: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class TritonSpec:
    grpc_port: int = 8101
    http_port: int = 8100
    metrics_port: int = 8102
    venv: str = ".venv-triton"


def load_config(path: str, require_all: bool = False) -> tuple[list[ServiceSpec], TritonSpec]:
    """The services to start. One whose package is not installed is left out, loudly (its
    callers then start without that dependency), unless ``require_all``."""
    raw = json.loads(Path(path).read_text())
    services = [ServiceSpec(**entry) for entry in raw["services"]]
    names = {s.name for s in services}
    for service in services:
        unknown = set(service.calls) - names
        if unknown:
            raise ValueError(f"{path}: {service.name} calls {sorted(unknown)}, which the file does not start")
    missing = [s.name for s in services if not installed(s.name)]
    if missing and require_all:
        raise ValueError(f"{path}: not installed: {', '.join('atelier.' + m for m in missing)}")
    for name in missing:
        print(f"[launcher] NOT starting {name}: atelier.{name} is not installed in this environment", flush=True)
    services = [s for s in services if s.name not in missing]
    for service in services:
        service.calls = [c for c in service.calls if c not in missing]
    return services, TritonSpec(**raw.get("triton", {}))


def installed(service: str) -> bool:
    """Whether ``python -m atelier.<service>`` exists."""
    try:
        return importlib.util.find_spec(f"atelier.{service}.__main__") is not None
    except ModuleNotFoundError:
        return False


class _Stop(Exception):
    """Raised in the main thread by SIGINT/SIGTERM."""


def _on_signal(signum, _frame):
    raise _Stop(signal.Signals(signum).name)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: a SIGKILLed launcher still takes it along.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        pass


class Children:
    """Started processes, each in its own process group (so a service's own children stop too)."""

    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self.procs.append((name, proc))
        print(f"[launcher] started {name} (pid {proc.pid}): {' '.join(cmd)}", flush=True)
        return proc

    def stop(self, timeout: float) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"[launcher] {name} did not stop in {timeout:.0f} s; killing it", flush=True)
                proc.kill()
                proc.wait()
            # Whatever the service left in its group (e.g. tritonserver) goes too.
            _signal_group(proc, signal.SIGKILL)
            print(f"[launcher] {name} stopped (exit status {proc.returncode})", flush=True)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_serving(name: str, address: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode} before it was SERVING")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise TimeoutError(f"{name} at {address} not SERVING after {timeout:.0f} s")


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_env(environ: dict[str, str], service_env: dict[str, str], services: int,
               cpus: Optional[int]) -> dict[str, str]:
    """Each service's share of the cores, unless the caller or the service's ``env`` sets
    OMP_NUM_THREADS. Without it torch starts a thread per core in every service, and several
    services' spinning OpenMP pools on one machine slow each other many-fold (make demo's
    invert stage on a loaded 2-core machine: 405 s with torch's default, 21 s with one each)."""
    if "OMP_NUM_THREADS" in environ or "OMP_NUM_THREADS" in service_env:
        return {}
    share = str(max(1, (cpus or 1) // max(1, services)))
    return {name: share for name in THREAD_VARIABLES if name not in environ and name not in service_env}


def service_command(service: ServiceSpec, by_name: dict[str, ServiceSpec],
                    triton: Optional[TritonSpec]) -> list[str]:
    cmd = [sys.executable, "-m", f"atelier.{service.name}", "--host", service.host, "--port", str(service.port),
           "--metrics-port", str(service.metrics_port)]
    for dependency in service.calls:
        cmd += [f"--{dependency}-address", by_name[dependency].address]
    if triton is not None and service.name == "segmentation":
        cmd += ["--backend", "triton", "--triton-url", f"127.0.0.1:{triton.grpc_port}"]
    return cmd + service.args


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m atelier.launcher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="deploy/local/services.json")
    parser.add_argument("--triton", action="store_true", help="run the SAM image encoder on a local Triton")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--stop-timeout", type=float, default=60.0, help="drain time before SIGKILL")
    parser.add_argument("--require-all", action="store_true", help="fail when a configured service is not installed")
    args = parser.parse_args(argv)
    try:
        services, triton = load_config(args.config, args.require_all)
    except (OSError, ValueError, TypeError) as error:
        parser.error(str(error))
    triton = triton if args.triton else None
    by_name = {s.name: s for s in services}
    addresses = {f"ATELIER_{s.name.upper()}_ADDRESS": s.address for s in services}

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    children = Children()
    status = 0
    try:
        if triton is not None:
            proc = children.start("triton", [
                sys.executable, "-m", "atelier.segmentation.triton_launcher", "--triton-venv", triton.venv,
                "--grpc-port", str(triton.grpc_port), "--http-port", str(triton.http_port),
                "--metrics-port", str(triton.metrics_port)], dict(os.environ))
        threads = {s.name: thread_env(dict(os.environ), s.env, len(services), os.cpu_count()) for s in services}
        for name, variables in threads.items():
            if variables:
                print(f"[launcher] {name}: {' '.join(f'{k}={v}' for k, v in variables.items())} "
                      "(its share of the cores; set OMP_NUM_THREADS to override)", flush=True)
        started = [(s, children.start(s.name, service_command(s, by_name, triton),
                                      {**os.environ, **threads[s.name], **s.env})) for s in services]
        for service, proc in started:
            wait_serving(service.name, service.address, args.startup_timeout, proc)
            print(f"[launcher] {service.name} is SERVING at {service.address} "
                  f"(metrics http://{service.host}:{service.metrics_port}/metrics)", flush=True)
        print("[launcher] all services up: " + " ".join(f"{k}={v}" for k, v in addresses.items()), flush=True)
        if not command:
            print("[launcher] Ctrl-C or SIGTERM stops them", flush=True)
            while all(proc.poll() is None for _, proc in started):
                time.sleep(0.5)
            crashed = [s.name for s, proc in started if proc.poll() is not None]
            print(f"[launcher] {', '.join(crashed)} exited on its own; stopping the others", flush=True)
            status = 1
        else:
            client = subprocess.Popen(command, env={**os.environ, **addresses})
            try:
                status = client.wait()
            finally:
                if client.poll() is None:
                    client.terminate()
                    client.wait()
    except _Stop as stop:
        print(f"[launcher] {stop}: stopping", flush=True)
    except (RuntimeError, TimeoutError) as error:
        print(f"[launcher] {error}", file=sys.stderr, flush=True)
        status = 1
    finally:
        # A second Ctrl-C must not abandon the children half-way through the drain.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        children.stop(args.stop_timeout)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


if __name__ == "__main__":
    sys.exit(main())
