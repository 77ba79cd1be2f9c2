"""gRPC server reflection, v1 and v1alpha.

grpcio-reflection ships only ``grpc.reflection.v1alpha``; grpcurl and newer tools ask
``grpc.reflection.v1`` first. The v1 proto is v1alpha with the package renamed (same
messages, same field numbers, same wire bytes), so v1 is served by the same servicer under
the v1 method name, and its descriptor (v1alpha's, renamed) is added to the default pool
so that reflection can describe itself under both names.
"""
from __future__ import annotations

from typing import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as reflection_v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

__all__ = ["V1_SERVICE_NAME", "V1ALPHA_SERVICE_NAME", "enable_reflection", "v1_file_descriptor"]

V1ALPHA_SERVICE_NAME = reflection_v1alpha.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The v1 reflection.proto: v1alpha's with package, file name and type references renamed."""
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
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
    new_package = "grpc.reflection.v1"
    proto.package = new_package
    proto.name = _V1_FILE
    proto.options.Clear()
    return proto


def _register_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
    except KeyError:
        pool.Add(v1_file_descriptor())


def enable_reflection(service_names: Sequence[str], server: grpc.Server) -> None:
    """Serve reflection for ``service_names`` (plus both reflection services) as v1alpha and v1."""
    _register_v1_descriptor()
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = reflection_v1alpha.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),))
