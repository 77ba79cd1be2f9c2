"""The committed Python stubs must be exactly what grpcio-tools makes from protos/."""
from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
STUBS = ROOT / "clients" / "python" / "atelier" / "v1"


def test_stubs_match_protos(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "atelier" / "v1").glob("*.proto"))
    assert sources, "no .proto files found"
    protoset = tmp_path / "atelier" / "v1" / "atelier.protoset"
    (tmp_path / "atelier" / "v1").mkdir(parents=True)
    args = ["protoc", f"-I{PROTOS}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            "--include_source_info", f"--descriptor_set_out={protoset}"]
    assert protoc.main(args + sources) == 0
    generated = sorted(p.name for p in (tmp_path / "atelier" / "v1").iterdir())
    committed = sorted(p.name for p in STUBS.iterdir() if p.suffix in {".py", ".pyi", ".protoset"} and p.name != "__init__.py")
    assert generated == committed, "stub files differ from the .proto set: run `make protos`"
    drifted = [name for name in generated if not filecmp.cmp(tmp_path / "atelier" / "v1" / name, STUBS / name, shallow=False)]
    assert not drifted, f"stubs out of date with protos/ (run `make protos`): {drifted}"


def test_the_descriptor_set_carries_the_proto_comments() -> None:
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString((STUBS / "atelier.protoset").read_bytes()).file
    comments = [location.leading_comments for f in files for location in f.source_code_info.location]
    assert any("Invert an image under its source prompt" in comment for comment in comments)
