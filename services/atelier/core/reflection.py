"""gRPC server reflection whose Atelier descriptors carry the .proto comments.

grpcio-reflection answers from the process's descriptor pool, and the pool's
descriptors (from the generated ``*_pb2.py``) have no source info, so
``grpcurl describe`` would show no documentation. ``make protos`` also writes
``atelier/v1/atelier.protoset``, a FileDescriptorSet built with
``--include_source_info``; this servicer answers file requests for those files
with their documented form and everything else as grpcio-reflection does.
Subclassing is the smallest change: the library has no hook for source info.
"""
from __future__ import annotations

from importlib import resources
from typing import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

SERVICE_NAME = reflection.SERVICE_NAME


def documented_files() -> dict[str, bytes]:
    """File name -> serialized FileDescriptorProto with source info, from the committed protoset."""
    data = resources.files("atelier.v1").joinpath("atelier.protoset").read_bytes()
    return {f.name: f.SerializeToString() for f in descriptor_pb2.FileDescriptorSet.FromString(data).file}


class DocumentedReflectionServicer(reflection.ReflectionServicer):
    def __init__(self, service_names: Iterable[str], documented: dict[str, bytes] | None = None):
        super().__init__(service_names)
        self._pool = descriptor_pool.Default()
        self._documented = documented_files() if documented is None else documented

    def _file_by_filename(self, request, filename):
        try:
            return self._response(self._pool.FindFileByName(filename), request)
        except KeyError:
            return super()._file_by_filename(request, filename)

    def _file_containing_symbol(self, request, fully_qualified_name):
        try:
            return self._response(self._pool.FindFileContainingSymbol(fully_qualified_name), request)
        except KeyError:
            return super()._file_containing_symbol(request, fully_qualified_name)

    def _response(self, descriptor, request) -> reflection_pb2.ServerReflectionResponse:
        files: dict[str, object] = {}
        pending = [descriptor]
        while pending:  # the file and its transitive imports, as grpcio-reflection sends them
            current = pending.pop()
            if current.name not in files:
                files[current.name] = current
                pending.extend(current.dependencies)
        serialized = []
        for name, file in files.items():
            if name in self._documented:
                serialized.append(self._documented[name])
            else:
                proto = descriptor_pb2.FileDescriptorProto()
                file.CopyToProto(proto)
                serialized.append(proto.SerializeToString())
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(file_descriptor_proto=serialized),
            original_request=request,
        )


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Like ``reflection.enable_server_reflection``, with the documented Atelier descriptors."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(DocumentedReflectionServicer(service_names), server)
