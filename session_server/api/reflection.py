"""Server reflection under both names clients use: `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

grpcio-reflection serves only v1alpha, while newer tools (grpcurl, Postman, grpc-js's reflection
clients) ask for v1 first. The two protos are the same messages under another package, field for
field, so v1 is served by the same servicer with v1alpha's message classes: the bytes on the wire
are identical. The v1 file itself (v1alpha's descriptor, renamed) is added to the descriptor pool,
so a client can also describe the v1 service through reflection.
"""

from __future__ import annotations

import contextlib

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds grpc/reflection/v1/reflection.proto to `pool` (once per process)."""
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    old_prefix, new_prefix = f".{reflection_pb2.DESCRIPTOR.package}.", f".{V1_PACKAGE}."
    file.name, file.package = _V1_FILE, V1_PACKAGE
    file.ClearField("options")
    for message in file.message_type:
        for field in message.field:
            if field.type_name.startswith(old_prefix):
                field.type_name = new_prefix + field.type_name[len(old_prefix):]
    for service in file.service:
        for method in service.method:
            method.input_type = new_prefix + method.input_type[len(old_prefix):]
            method.output_type = new_prefix + method.output_type[len(old_prefix):]
    pool.AddSerializedFile(file.SerializeToString())


class _ReflectionServicer(reflection.aio.ReflectionServicer):
    """grpcio-reflection's, finding a method's file too: its descriptor pool knows services,
    messages, fields and enum values by name, not methods, so `grpcurl describe
    codelane.v1.SessionService.CreateSession` was NOT_FOUND (grpc/grpc#34743)."""

    def _file_containing_symbol(self, request, fully_qualified_name):
        service_name, _, method_name = fully_qualified_name.rpartition(".")
        with contextlib.suppress(KeyError):  # not a service's name: the symbol is looked up as it is
            if method_name in self._pool.FindServiceByName(service_name).methods_by_name:
                fully_qualified_name = service_name  # a method's file is its service's
        return super()._file_containing_symbol(request, fully_qualified_name)


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> list[str]:
    """Serves reflection v1 and v1alpha on `server` for `service_names` (the reflection services
    themselves added); returns the full list of names reflection lists."""
    _add_v1_descriptor(descriptor_pool.Default())
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    servicer = _ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))
    return names
