"""Bearer-token authentication: one token for clients (sessions, admin), one for workers."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable, Callable

import grpc

from session_server.api.errors import abort

WORKER_HUB_PREFIX = "/codelane.v1.WorkerHubService/"
# Workers fetch snapshots from the content service: it answers to the worker token too.
WORKER_PREFIXES = (
    WORKER_HUB_PREFIX,
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/",
    "/google.bytestream.ByteStream/",
)
# How long a refused bidi stream waits for its caller's first message (see _rejecting_handler).
FIRST_MESSAGE_WAIT = 2.0
# Health checks and reflection stay open, as load balancers and grpcurl expect.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str, token: str, problem: str
                       ) -> grpc.RpcMethodHandler:
    async def refuse(_request, context: grpc.aio.ServicerContext):
        await abort(context, grpc.StatusCode.UNAUTHENTICATED, message, "UNAUTHENTICATED", token=token, problem=problem)

    async def refuse_stream(_request, context: grpc.aio.ServicerContext):
        await abort(context, grpc.StatusCode.UNAUTHENTICATED, message, "UNAUTHENTICATED", token=token, problem=problem)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    async def refuse_after_first_message(requests, context: grpc.aio.ServicerContext):
        # A bidi caller writes at once (a worker its Hello). Ended under that write, a grpc.aio
        # caller is told INTERNAL "Internal error from Core" instead of this status (grpc#36066),
        # and a worker retries instead of saying its token is wrong. The message is taken as
        # bytes, never parsed, and waited for a bounded time.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(anext(aiter(requests), None), FIRST_MESSAGE_WAIT)
        await abort(context, grpc.StatusCode.UNAUTHENTICATED, message, "UNAUTHENTICATED", token=token, problem=problem)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_after_first_message)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` (the scheme in any case) against the client or the
    worker token."""

    def __init__(self, client_token: str | None, worker_token: str | None) -> None:
        self._client = client_token.encode() if client_token else None
        self._worker = worker_token.encode() if worker_token else None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        is_worker = method.startswith(WORKER_PREFIXES)
        expected = self._worker if is_worker else self._client
        if expected is None or method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        # The scheme's name is case-insensitive (RFC 9110, 11.1): "bearer x" is "Bearer x".
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.lstrip(" ").encode(), expected):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None  # no such method: UNIMPLEMENTED, as for a caller with the token (reflection is open)
        who = "worker" if is_worker else "client"
        flag = "--token of `codelane worker`" if is_worker else "the client's token"
        problem = "missing" if not given else "wrong"
        return _rejecting_handler(handler, f"{problem} {who} bearer token: check {flag}", who, problem)
