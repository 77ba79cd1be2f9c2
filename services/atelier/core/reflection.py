"""gRPC server reflection whose Atelier descriptors carry the .proto comments.

grpcio-reflection answers from the process's descriptor pool, and the pool's
descriptors (from the generated ``*_pb2.py``) have no source info, so
``grpcurl describe`` would show no documentation. ``make protos`` also writes
``atelier/v1/atelier.protoset``, a FileDescriptorSet built with
``--include_source_info``; this servicer answers file requests for those files
with their documented form and everything else as grpcio-reflection does.
Subclassing is the smallest change: the library has no hook for source info.

Both reflection versions are served. grpcio-reflection ships only ``grpc.reflection.v1alpha``;
grpcurl and newer tools ask ``grpc.reflection.v1`` first. The v1 proto is v1alpha with the
package renamed (same messages, same field numbers, same wire bytes), so v1 is the same
servicer under the v1 method name, and v1's descriptor (v1alpha's, renamed) is added to the
default pool so that reflection describes itself under both names.
"""
from __future__ import annotations

from importlib import resources
from typing import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

SERVICE_NAME = reflection.SERVICE_NAME
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


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


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The v1 reflection.proto: v1alpha's with package, file name and type references renamed."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old_prefix, new_prefix = f".{proto.package}.", ".grpc.reflection.v1."

    def rename(type_name: str) -> str:
        return new_prefix + type_name[len(old_prefix):] if type_name.startswith(old_prefix) else type_name

    def rename_fields(message: descriptor_pb2.DescriptorProto) -> None:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = rename(field.type_name)
        for nested in message.nested_type:
            rename_fields(nested)

    for message in proto.message_type:
        rename_fields(message)
    for service in proto.service:
        for method in service.method:
            method.input_type, method.output_type = rename(method.input_type), rename(method.output_type)
    proto.package = "grpc.reflection.v1"
    proto.name = _V1_FILE
    proto.options.Clear()
    return proto


def _register_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
    except KeyError:
        pool.Add(v1_file_descriptor())


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Like ``reflection.enable_server_reflection``, with the documented Atelier descriptors,
    as v1alpha and v1 (both reflection services are listed as well)."""
    _register_v1_descriptor()
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = DocumentedReflectionServicer(dict.fromkeys(names))  # ordered, without duplicates
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),))
