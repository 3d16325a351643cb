"""The server's outer surface: health, reflection, client tokens, graceful shutdown, CLI errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from codelane.v1 import session_pb2, session_pb2_grpc


async def test_health_and_reflection_are_served(make_server) -> None:
    server = await make_server(token="client-secret")
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "codelane.v1.SessionService", "codelane.v1.WorkerHubService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        listed = [s.name async for reply in stream for s in reply.list_services_response.service]
    assert {"codelane.v1.SessionService", "codelane.v1.AdminService", "codelane.v1.WorkerHubService"} <= set(listed)


async def test_reflection_finds_the_file_of_a_method(make_server) -> None:
    # `grpcurl describe codelane.v1.SessionService.CreateSession` asks for the file containing the
    # method's name: grpcio-reflection answered NOT_FOUND ("Symbol not found"), its descriptor
    # pool knowing services and messages, fields and enum values, but not methods (grpc#34743).
    server = await make_server()
    symbols = ["codelane.v1.SessionService.CreateSession", "codelane.v1.SessionService",
               "codelane.v1.AdminService.ListWorkers", "codelane.v1.Session.session_id"]
    async with grpc.aio.insecure_channel(server.address) as channel:
        for service in ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"):
            stream = channel.stream_stream(
                f"/{service}/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in
                    [*symbols, "codelane.v1.SessionService.NoSuchMethod"]]))
            replies = [reply async for reply in stream]
            files = [r.file_descriptor_response.file_descriptor_proto for r in replies[:len(symbols)]]
            names = [descriptor_pb2.FileDescriptorProto.FromString(file[0]).name if file else "" for file in files]
            assert names == ["codelane/v1/session.proto", "codelane/v1/session.proto", "codelane/v1/admin.proto",
                             "codelane/v1/session.proto"], service
            assert replies[-1].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_client_token_is_required_when_set(make_server, tmp_path: Path) -> None:
    server = await make_server(token="client-secret")
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.ListSessions(session_pb2.ListSessionsRequest(), metadata=metadata)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "client bearer token" in error.value.details()
        # The scheme's name is case-insensitive (RFC 9110, 11.1); one space or more follows it.
        for given in ("Bearer client-secret", "bearer client-secret", "BEARER  client-secret"):
            reply = await stub.ListSessions(session_pb2.ListSessionsRequest(), metadata=(("authorization", given),))
            assert list(reply.sessions) == []
        for given in ("Bearer client-secret2", "Bearerclient-secret", "Basic client-secret", "client-secret"):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.ListSessions(session_pb2.ListSessionsRequest(), metadata=(("authorization", given),))
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, given


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Bearer nope"),), (("authorization", "Bearer client-secret"),)],
    ids=["no-token", "wrong-token", "right-token"],
)
async def test_an_unknown_method_is_unimplemented_whatever_the_token(make_server, metadata) -> None:
    """Refusing an unknown method's call without the token read the shape of its handler, which
    is None: AttributeError, UNKNOWN, and a traceback logged per call."""
    server = await make_server(token="client-secret")
    async with grpc.aio.insecure_channel(server.address) as channel:
        method = channel.unary_unary("/codelane.v1.SessionService/NoSuchMethod")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await method(b"", metadata=metadata, timeout=10)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_reports_not_serving_during_shutdown(make_server) -> None:
    server = await make_server()
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(server.stop(grace=1.0))
        second = await asyncio.wait_for(watch.read(), 5)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping


def test_server_cli_rejects_bad_flags_in_one_line(tmp_path: Path) -> None:
    cert = tmp_path / "x.pem"
    cert.write_text("a certificate")
    result = subprocess.run(
        [sys.executable, "-m", "codelane.cli", "server", "--tls-cert", str(cert), "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "codelane server: --tls-cert and --tls-key go together (see codelane server --help)"
