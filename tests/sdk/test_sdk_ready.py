"""client.ready() / health() against real grpc.health.v1 servers on loopback, and the default deadline."""
from __future__ import annotations

import socket
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import atelier
from atelier.sdk.client import SERVICES

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def health_server():
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


def _closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_ready_needs_every_configured_service_serving(health_server):
    servicer, address = health_server
    servicer.set("atelier.v1.Inversion", SERVING)
    others = {name: proto for name, (_, _, proto) in SERVICES.items() if name != "inversion"}
    assert others  # every service the SDK has a client for is checked
    with atelier.Client(address) as client:
        assert client.health() == {"inversion": "SERVING", **{name: "SERVICE_UNKNOWN" for name in others}}
        assert not client.ready()
        for name, proto_service in others.items():
            servicer.set(proto_service, NOT_SERVING)
            assert client.health()[name] == "NOT_SERVING" and not client.ready()
            servicer.set(proto_service, SERVING)
        assert client.ready()


def test_an_unreachable_service_is_not_ready(health_server):
    servicer, address = health_server
    servicer.set("atelier.v1.Inversion", SERVING)
    with atelier.Client(inversion=address, segmentation=_closed_port()) as client:
        statuses = client.health(timeout=2.0)
        assert statuses["inversion"] == "SERVING" and statuses["segmentation"].startswith("UNREACHABLE")
        assert not client.ready(timeout=2.0)
    with atelier.Client(inversion=address) as only_inversion:  # only configured services count
        assert only_inversion.health() == {"inversion": "SERVING"} and only_inversion.ready()


def test_calls_have_a_default_deadline(servers):
    _, _, address = servers()
    with atelier.Client(address) as client:
        assert client.timeout == atelier.DEFAULT_TIMEOUT == 600.0
    fake, _, address = servers()
    with atelier.Client(address) as client:
        client.inversion.invert(np.zeros((16, 16, 3), np.uint8), "x")
    # <= 601: the grpc-timeout header is rounded up to a coarser unit on the wire (seen: 600.999 s).
    assert fake.time_remaining[0] is not None and 500 < fake.time_remaining[0] <= 601
    fake, _, address = servers()
    with atelier.Client(address, timeout=None) as client:  # None: explicitly no deadline
        client.inversion.invert(np.zeros((16, 16, 3), np.uint8), "x")
    assert fake.time_remaining[0] is None or fake.time_remaining[0] > 10**6
