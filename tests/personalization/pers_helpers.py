"""Helpers shared by the personalization tests (imported by name; no package)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def concept_image(seed: int, size: int = 64) -> np.ndarray:
    """A toy-world-like picture: a red square (the subject) near the centre on a blue background."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:] = (40, 70, 200)
    offset = int(rng.integers(-4, 5))
    lo, hi = size // 4 + offset, 3 * size // 4 + offset
    pixels[lo:hi, lo:hi] = (210, 40, 40)
    return pixels


def square_mask(size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = True
    return mask


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def in_process_server(data_dir, *, database: str = "", lease_seconds: float = 30.0, checkpoint_every: int = 50,
                      max_pending_jobs: int = 64, segmentation_address: str = "", max_queue: int = 8,
                      poll_seconds: float = 0.2, replica_id: str = "", **extras):
    """A personalization server on loopback with the textual-inversion test method as "eqdiff"."""
    from prometheus_client import CollectorRegistry

    from atelier.core.config import ServerConfig
    from atelier.core.metrics import Metrics
    from atelier.core.server import start
    from atelier.personalization.app import PersonalizationApp
    from ti_method import TextualInversionMethod

    config = ServerConfig(service="personalization", host="127.0.0.1", port=0, metrics_port=0, grace_seconds=1,
                          max_queue=max_queue, max_image_pixels=256 * 256, extras=dict(
                              data_dir=str(data_dir), database=database, lease_seconds=lease_seconds,
                              checkpoint_every=checkpoint_every, max_pending_jobs=max_pending_jobs,
                              segmentation_address=segmentation_address, job_poll_seconds=poll_seconds,
                              replica_id=replica_id, **extras))
    metrics = Metrics(CollectorRegistry())
    app = PersonalizationApp(config, metrics=metrics, methods={"eqdiff": TextualInversionMethod()})
    running = start(app, config, metrics)
    app.attach(running)
    try:
        assert running.wait_loaded(240), "the personalization service did not load"
        assert running.load_error is None, running.load_error
        yield running
    finally:
        running.stop(1)


class ServerProcess:
    """``python serve_ti.py`` in a child process (so a test can kill -9 it)."""

    def __init__(self, data_dir, port: int, *, database: str = "", lease_seconds: float = 2.0,
                 checkpoint_every: int = 5, replica_id: str = "", log: Optional[Path] = None):
        self.port = port
        self.address = f"127.0.0.1:{port}"
        args = [sys.executable, str(HERE / "serve_ti.py"), "--host", "127.0.0.1", "--port", str(port),
                "--metrics-port", "-1", "--data-dir", str(data_dir), "--lease-seconds", str(lease_seconds),
                "--checkpoint-every", str(checkpoint_every), "--job-poll-seconds", "0.2", "--grace-seconds", "1"]
        if database:
            args += ["--database", database]
        if replica_id:
            args += ["--replica-id", replica_id]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
        self.log = open(log or Path(data_dir) / f"server-{port}.log", "ab")
        self.process = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_serving(self, timeout: float = 180.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.process.poll() is None, f"server exited with {self.process.returncode}"
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise AssertionError(f"server on {self.address} not serving after {timeout} s")

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no drain, no lease release
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self.log.close()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


MASK_ARGS = {"masks": [square_mask(), square_mask()]}  # no segmentation service needed
