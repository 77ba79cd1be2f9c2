"""atelier.Client: addresses and channels, token metadata, TLS, and the torch-free import."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

import atelier

IMAGE = np.zeros((16, 16, 3), dtype=np.uint8)


def test_token_travels_as_bearer_metadata_on_every_call(servers):
    fake, _, address = servers()
    with atelier.Client(address, token="s3cret") as client:
        inversion = client.inversion.invert(IMAGE, "x", num_inference_steps=1)
        client.inversion.edit(inversion, "y")
    assert [metadata.get("authorization") for metadata in fake.metadata] == ["Bearer s3cret"] * 2


def test_no_token_no_authorization_header(servers):
    fake, _, address = servers()
    with atelier.Client(address) as client:
        client.inversion.invert(IMAGE, "x", num_inference_steps=1)
    assert "authorization" not in fake.metadata[0]
    assert fake.metadata[0]["user-agent"].startswith("atelier-python/")


def test_one_channel_per_distinct_address(servers):
    fake, _, address = servers()
    client = atelier.Client("127.0.0.1:1", inversion=address, synthesis="127.0.0.1:2")
    try:
        assert client.transport("segmentation").channel is client.transport("personalization").channel
        assert client.transport("inversion").channel is not client.transport("segmentation").channel
        assert client.transport("synthesis").channel is not client.transport("segmentation").channel
        assert client.inversion is client.inversion
        client.inversion.invert(IMAGE, "x", num_inference_steps=1)  # routed to the per-service address
        assert fake.attempts == 1
    finally:
        client.close()


def test_missing_addresses_are_reported_clearly(servers):
    with pytest.raises(ValueError, match="give an address"):
        atelier.Client()
    client = atelier.Client(segmentation="127.0.0.1:1")
    with pytest.raises(ValueError, match="no address for the inversion service"):
        client.inversion
    with pytest.raises(AttributeError, match="unknown Atelier service"):
        client.service("painting")


def test_a_closed_client_refuses_calls(servers):
    _, _, address = servers()
    client = atelier.Client(address)
    client.inversion.invert(IMAGE, "x", num_inference_steps=1)
    client.close()
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.inversion.invert(IMAGE, "x", num_inference_steps=1)


def test_max_message_bytes_applies_to_the_channel(servers):
    fake, _, address = servers()
    with atelier.Client(address, max_message_bytes=1024) as client:
        big = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        with pytest.raises(atelier.ResourceExhaustedError):
            client.inversion.invert(big, "x")
    assert fake.attempts == 0


def make_certificate(directory: Path) -> tuple[bytes, bytes]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=atelier.test",
         "-addext", "subjectAltName=DNS:atelier.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return key.read_bytes(), cert.read_bytes()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_tls_with_token_uses_call_credentials(servers, tmp_path):
    key, cert = make_certificate(tmp_path)
    fake, _, address = servers(grpc.ssl_server_credentials([(key, cert)]))
    tls = atelier.TLSConfig(root_certificates=tmp_path / "cert.pem", server_name="atelier.test")
    with atelier.Client(address, tls=tls, token="tls-token") as client:
        client.inversion.invert(IMAGE, "x", num_inference_steps=1)
    assert fake.metadata[0]["authorization"] == "Bearer tls-token"
    with atelier.Client(address, retries=0) as plaintext:  # the TLS port refuses plaintext
        with pytest.raises(atelier.UnavailableError):
            plaintext.inversion.invert(IMAGE, "x", num_inference_steps=1)
    assert fake.attempts == 1


def test_tls_config_needs_key_and_chain_together():
    with pytest.raises(ValueError, match="go together"):
        atelier.Client("127.0.0.1:1", tls=atelier.TLSConfig(private_key=b"key"))
    with pytest.raises(TypeError, match="tls must be"):
        atelier.Client("127.0.0.1:1", tls="yes")


TORCH_FREE_IMPORT = """
import importlib, importlib.abc, pkgutil, sys

class ForbidTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("the SDK must not import torch")
        return None

sys.meta_path.insert(0, ForbidTorch())
import atelier
import atelier.sdk
for module in pkgutil.walk_packages(atelier.sdk.__path__, "atelier.sdk."):
    importlib.import_module(module.name)
client = atelier.Client("127.0.0.1:1")
client.inversion
client.close()
assert "torch" not in sys.modules, "torch was imported"
print("torch-free:", sorted(m for m in sys.modules if m.startswith("atelier.sdk.")))
"""


def test_the_sdk_imports_and_builds_a_client_without_torch():
    completed = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_IMPORT], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert "atelier.sdk.inversion" in completed.stdout
