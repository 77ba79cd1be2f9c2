"""Local launcher: start Atelier services as child processes, wait until each
reports SERVING on grpc.health.v1, optionally run a command against them, then
stop them with SIGTERM (graceful drain) and exit with the command's status.

    python -m atelier.launcher --config deploy/local/services.json -- python examples/demo.py

Kubernetes does this job in production (deploy/, k8s/); this is for one machine.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def wait_serving(address: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"service at {address} exited with status {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise TimeoutError(f"service at {address} not SERVING after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="deploy/local/services.json")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    config = json.loads(Path(args.config).read_text())

    children: list[tuple[str, subprocess.Popen]] = []
    env_addresses = {}
    try:
        for service in config["services"]:
            name, host, port = service["name"], service.get("host", "127.0.0.1"), service["port"]
            cmd = [sys.executable, "-m", f"atelier.{name}", "--host", host, "--port", str(port)]
            cmd += ["--metrics-port", str(service["metrics_port"])] + service.get("args", [])
            print(f"[launcher] starting {name} on {host}:{port}: {' '.join(cmd)}", flush=True)
            children.append((name, subprocess.Popen(cmd, env={**os.environ, **service.get("env", {})})))
            env_addresses[f"ATELIER_{name.upper()}_ADDRESS"] = f"{host}:{port}"
        for (name, proc), service in zip(children, config["services"]):
            address = f"{service.get('host', '127.0.0.1')}:{service['port']}"
            wait_serving(address, args.startup_timeout, proc)
            print(f"[launcher] {name} is SERVING at {address}", flush=True)
        if not command:
            print("[launcher] all services up; Ctrl-C stops them", flush=True)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return 0
        return subprocess.call(command, env={**os.environ, **env_addresses})
    finally:
        for name, proc in children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in children:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print(f"[launcher] {name} did not stop in 60 s; killing it", flush=True)
                proc.kill()
                continue
            if proc.returncode != 0:
                print(f"[launcher] {name} exited with status {proc.returncode}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
