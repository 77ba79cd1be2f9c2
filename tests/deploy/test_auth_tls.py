"""Bearer tokens, TLS and mutual TLS on a real server over loopback, through the SDK
and through core.auth.dial (service-to-service); round-robin over two replicas."""
from __future__ import annotations

import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from atelier.core import auth
from atelier.core.config import ServerConfig
from atelier.core.metrics import Metrics
from atelier.core.server import start
from atelier.sdk import Client
from atelier.sdk.client import TLSConfig
from atelier.sdk.errors import UnauthenticatedError, UnavailableError
from atelier.v1 import inversion_pb2, inversion_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from core_fakes import FakeInversionApp  # noqa: E402

pytest.importorskip("cryptography")
from pki import TestCA  # noqa: E402

pytestmark = pytest.mark.timeout(60)
IMAGE = np.zeros((8, 8, 3), dtype=np.uint8)


def _serve(auth_config: auth.AuthConfig, host: str = "127.0.0.1"):
    app = FakeInversionApp(metrics=Metrics(CollectorRegistry()))
    app.release.set()
    config = ServerConfig(service="inversion", host=host, port=0, metrics_port=-1, grace_seconds=1, auth=auth_config)
    server = start(app, config, metrics=app.executor.metrics)
    assert server.wait_loaded(10)
    return app, server


@pytest.fixture
def tokens(tmp_path):
    folder = tmp_path / "tokens"  # a mounted Secret: one key per token
    folder.mkdir()
    (folder / "current").write_text("s3cret-current\n")
    (folder / "next").write_text("s3cret-next\n")
    return folder


def _invert(client: Client):
    return client.inversion.invert(IMAGE, "a cat", method="ddim", num_inference_steps=2)


def test_token_required_wrong_refused_right_passes_health_open(tokens):
    _, server = _serve(auth.AuthConfig(token_files=(str(tokens),)))
    try:
        for token in (None, "wrong"):
            with Client(server.address, token=token, retries=0) as client:
                with pytest.raises(UnauthenticatedError):
                    _invert(client)
        for token in ("s3cret-current", "s3cret-next"):  # both keys of the Secret: rotation
            with Client(server.address, token=token) as client:
                assert _invert(client).num_inference_steps == 2
        with grpc.insecure_channel(server.address) as channel:  # probes carry no token
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


def test_rotated_token_file_is_picked_up_without_restart(tokens):
    _, server = _serve(auth.AuthConfig(token_files=(str(tokens),)))
    try:
        (tokens / "current").unlink()
        with Client(server.address, token="s3cret-current", retries=0) as client:
            with pytest.raises(UnauthenticatedError):
                _invert(client)
        with Client(server.address, token="s3cret-next") as client:
            assert _invert(client).num_inference_steps == 2
    finally:
        server.stop(0)


def test_tls_with_token_and_peer_dial(tmp_path, tokens):
    ca = TestCA(tmp_path)
    cert, key = ca.issue("server", server=True)
    _, server = _serve(auth.AuthConfig(token_files=(str(tokens),), tls_cert=str(cert), tls_key=str(key)))
    try:
        tls = TLSConfig(root_certificates=str(ca.ca_path))
        with Client(server.address, token="s3cret-next", tls=tls) as client:
            assert _invert(client).num_inference_steps == 2
        with Client(server.address, token="s3cret-next", retries=0) as client:  # plaintext to a TLS port
            with pytest.raises(UnavailableError):
                _invert(client)
        # Service-to-service: the peer's own token and CA from its config.
        peer_token = tmp_path / "peer-token"
        peer_token.write_text("s3cret-current\n")
        for token_file, ok in ((str(peer_token), True), (None, False)):
            peer = auth.PeerCredentials(token_file=token_file, tls_ca=str(ca.ca_path))
            with auth.dial(server.address, peer) as channel:
                stub = inversion_pb2_grpc.InversionStub(channel)
                request = inversion_pb2.InvertRequest(prompt="x", num_inference_steps=1)
                if ok:
                    assert [e for e in stub.Invert(request, timeout=10) if e.HasField("result")]
                else:
                    with pytest.raises(grpc.RpcError) as caught:
                        list(stub.Invert(request, timeout=10))
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)


def test_plaintext_peer_dial_sends_its_token(tmp_path, tokens):
    _, server = _serve(auth.AuthConfig(token_files=(str(tokens),)))
    try:
        peer_token = tmp_path / "peer-token"
        peer_token.write_text("s3cret-next\n")
        with auth.dial(server.address, auth.PeerCredentials(token_file=str(peer_token))) as channel:
            events = list(inversion_pb2_grpc.InversionStub(channel).Invert(
                inversion_pb2.InvertRequest(prompt="x", num_inference_steps=1), timeout=10))
            assert events[-1].HasField("result")
    finally:
        server.stop(0)


def test_dial_refuses_a_missing_or_empty_peer_token(tmp_path):
    with pytest.raises(OSError):
        auth.dial("127.0.0.1:1", auth.PeerCredentials(token_file=str(tmp_path / "absent")))
    (tmp_path / "empty").write_text("# no token yet\n")
    with pytest.raises(ValueError):
        auth.dial("127.0.0.1:1", auth.PeerCredentials(token_file=str(tmp_path / "empty")))


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path):
    ca = TestCA(tmp_path)
    cert, key = ca.issue("server", server=True)
    client_cert, client_key = ca.issue("client", server=False)
    other_ca = TestCA(tmp_path, "other CA")
    rogue_cert, rogue_key = other_ca.issue("rogue", server=False)
    _, server = _serve(auth.AuthConfig(tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(ca.ca_path)))
    try:
        with Client(server.address, tls=TLSConfig(root_certificates=str(ca.ca_path), private_key=str(client_key),
                                                 certificate_chain=str(client_cert))) as client:
            assert _invert(client).num_inference_steps == 2
        for private_key, chain in ((None, None), (str(rogue_key), str(rogue_cert))):
            tls = TLSConfig(root_certificates=str(ca.ca_path), private_key=private_key, certificate_chain=chain)
            with Client(server.address, tls=tls, retries=0) as client:
                with pytest.raises(UnavailableError):  # the handshake fails: no call reaches the server
                    _invert(client)
    finally:
        server.stop(0)


def test_config_flags_and_env(tmp_path, tokens):
    config = ServerConfig.from_args(
        ["--auth-token-file", str(tokens), "--auth-open-services", "grpc.health.v1.Health"], "inversion",
        environ={"ATELIER_PEER_TOKEN_FILE": "/run/peer/token"})
    assert config.auth.token_files == (str(tokens),)
    assert config.auth.open_services == ("grpc.health.v1.Health",)
    assert config.auth.peer.token_file == "/run/peer/token"
    assert "auth_token_file" not in config.extras
    with pytest.raises(SystemExit):
        ServerConfig.from_args(["--tls-cert", "a.pem"], "inversion", environ={})


def test_round_robin_spreads_calls_over_two_replicas():
    replicas = [_serve(auth.AuthConfig()) for _ in range(2)]
    try:
        target = "ipv4:" + ",".join(server.address for _, server in replicas)
        with Client(target, load_balancing="round_robin") as client:
            # round_robin uses the subchannels that are connected; the second may connect a
            # little after the first call. Once both served one, every pick alternates.
            for _ in range(50):
                _invert(client)
                if all(app.evaluations for app, _ in replicas):
                    break
            before = [app.evaluations for app, _ in replicas]
            for _ in range(10):
                _invert(client)
        served = [app.evaluations - b for (app, _), b in zip(replicas, before)]  # 2 UNet steps per call
        assert served == [10, 10], served
    finally:
        for _, server in replicas:
            server.stop(0)


def test_dns_targets_default_to_round_robin():
    client = Client("dns:///atelier-inversion.default.svc:50051")
    assert ("grpc.lb_policy_name", "round_robin") in client._settings.channel_options("dns:///atelier-inversion:50051")
    assert not [o for o in client._settings.channel_options("localhost:50051") if o[0] == "grpc.lb_policy_name"]
