"""The plaintext health-only port (--health-port) beside a TLS main port, on real servers over
loopback: kubelet's gRPC probes speak plaintext, so with TLS they go to this port."""
from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from atelier.core import auth
from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics
from atelier.core.server import start
from atelier.sdk import Client
from atelier.sdk.client import TLSConfig
from atelier.v1 import inversion_pb2, inversion_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from core_fakes import FakeInversionApp, wait_for  # noqa: E402

pytest.importorskip("cryptography")
from pki import TestCA  # noqa: E402
from processes import free_port  # noqa: E402

pytestmark = pytest.mark.timeout(60)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TOKEN = "s3cret"


def _listening_ports() -> set[int]:
    """TCP ports this process listens on (Linux /proc)."""
    fds = Path("/proc/self/fd")
    inodes = set()
    for fd in os.listdir(fds):
        try:
            target = os.readlink(fds / fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _check(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture
def tls_server(tmp_path):
    """A TLS + token main port and a plaintext health port; models held until the test loads them;
    each UNet step of the fake waits (up to 30 s) for app.release."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("reads listening sockets from /proc")
    ca = TestCA(tmp_path)
    cert, key = ca.issue("server", server=True)
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    app = FakeInversionApp(metrics=Metrics(CollectorRegistry()), step_seconds=30)
    app.loaded.clear()
    config = ServerConfig(service="inversion", host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=20,
                          health_port=free_port(),
                          auth=auth.AuthConfig(token_files=(str(tmp_path / "tokens"),), tls_cert=str(cert),
                                               tls_key=str(key)))
    before = _listening_ports()
    server = start(app, config, metrics=app.executor.metrics)
    try:
        assert _listening_ports() - before == {server.port, config.health_port}
        yield app, server, ca
    finally:
        app.release.set()
        app.loaded.set()
        server.stop(0)


def test_health_port_is_plaintext_health_only_beside_a_tls_port(tls_server):
    app, server, ca = tls_server
    assert server.health_port is not None and server.health_port != server.port
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
        for service in ("", "atelier.v1.Inversion"):  # loading
            assert _check(probe, service) == NOT_SERVING
        app.loaded.set()
        assert server.wait_loaded(10) and server.load_error is None
        for service in ("", "atelier.v1.Inversion"):  # no token, no TLS: what kubelet sends
            assert _check(probe, service) == SERVING
        with pytest.raises(grpc.RpcError) as caught:  # a service RPC, even with a good token
            list(inversion_pb2_grpc.InversionStub(probe).Invert(
                inversion_pb2.InvertRequest(prompt="x", num_inference_steps=1), timeout=5,
                metadata=(("authorization", f"Bearer {TOKEN}"),)))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as caught:
            list(reflection_pb2_grpc.ServerReflectionStub(probe).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The main port still speaks only TLS: a plaintext health check does not get through.
    with grpc.insecure_channel(server.address) as plaintext:
        with pytest.raises(grpc.RpcError) as caught:
            _check(plaintext)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with Client(server.address, token=TOKEN, tls=TLSConfig(root_certificates=str(ca.ca_path))) as client:
        app.release.set()
        assert client.inversion.invert(np.zeros((8, 8, 3), np.uint8), "a cat", method="ddim",
                                       num_inference_steps=1).num_inference_steps == 1


def test_health_port_reports_the_drain_and_closes_after_the_main_server(tls_server):
    app, server, ca = tls_server
    app.loaded.set()
    assert server.wait_loaded(10)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.ca_path.read_bytes())
    with grpc.secure_channel(server.address, credentials) as main, \
            grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
        assert _check(probe) == SERVING
        in_flight = inversion_pb2_grpc.InversionStub(main).Invert(
            inversion_pb2.InvertRequest(prompt="x", num_inference_steps=2), timeout=30,
            metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert next(in_flight).progress.step == 1  # now waiting on app.release
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 20})
        stopper.start()
        try:
            assert wait_for(lambda: _check(probe) == NOT_SERVING)
            assert _check(probe, "atelier.v1.Inversion") == NOT_SERVING
            assert stopper.is_alive()  # still draining: the call holds it, and the probe port answers
        finally:
            app.release.set()
        assert list(in_flight)[-1].HasField("result")
        stopper.join(20)
        assert not stopper.is_alive() and server.wait(0)
        with pytest.raises(grpc.RpcError) as caught:  # gone with the main server
            _check(probe)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_no_health_port_by_default_and_flag_env():
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("reads listening sockets from /proc")
    app = FakeInversionApp(metrics=Metrics(CollectorRegistry()))
    app.release.set()
    config = ServerConfig.from_args(["--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"], "inversion",
                                    environ={})
    assert config.health_port == 0
    before = _listening_ports()
    server = start(app, config, metrics=app.executor.metrics)
    try:
        assert server.health_port is None
        assert _listening_ports() - before == {server.port}
    finally:
        server.stop(0)
    assert ServerConfig.from_args([], "inversion", environ={"ATELIER_HEALTH_PORT": "8081"}).health_port == 8081
    assert ServerConfig.from_args(["--health-port", "8082"], "inversion",
                                  environ={"ATELIER_HEALTH_PORT": "8081"}).health_port == 8082
    for argv in (["--health-port", "70000"], ["--health-port", "50051"]):  # 50051: inversion's --port
        with pytest.raises(SystemExit):
            ServerConfig.from_args(argv, "inversion", environ={})


def test_a_health_port_in_use_fails_the_start():
    app = FakeInversionApp(metrics=Metrics(CollectorRegistry()))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = ServerConfig(service="inversion", host="127.0.0.1", port=0, metrics_port=-1,
                              health_port=taken.getsockname()[1])
        with pytest.raises(OSError, match="cannot bind"):
            start(app, config, metrics=app.executor.metrics)
    app.close()
