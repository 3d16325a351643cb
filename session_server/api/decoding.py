"""A request message that does not parse, or that is bigger than its method ever takes, ends its
call with INVALID_ARGUMENT.

gRPC parses a request before any servicer runs, and a parse error (a string field of bad UTF-8,
a truncated field) escaped as UNKNOWN, with a traceback logged per call. This interceptor, last
in the chain (after authentication), lets the parse fail into a marker that the handler turns
into a status. Request streams (the worker hub) read their messages themselves and are left alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from session_server.api.errors import abort

# Requests refused unparsed past a size: protobuf parses a map (labels, env) in time quadratic
# in its entries (200,000 labels: 0.3 s; the 64 MiB a request may take: minutes), on the event
# loop, before any handler can refuse it. The biggest CreateSession the server accepts is about
# 1.2 MiB (a config of 1 Mi characters as stored, labels of 64 KiB).
MAX_REQUEST_BYTES = {"/codelane.v1.SessionService/CreateSession": 2 * 1024 * 1024}


class _Undecodable:
    """What a request that did not parse is handed to its handler as: why, for the client."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


async def _refuse(context: grpc.aio.ServicerContext, request: _Undecodable) -> NoReturn:
    await abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.problem, "INVALID_ARGUMENT")


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        largest = MAX_REQUEST_BYTES.get(details.method)

        def lenient(raw: bytes) -> Any:
            if largest is not None and len(raw) > largest:
                return _Undecodable(f"the request is {len(raw):,} bytes; {details.method} takes at most {largest:,} "
                                    "(a session's config, prompt and labels are bounded well under it)")
            try:
                return parse(raw)
            except DecodeError as exc:
                return _Undecodable(f"the request does not parse: {exc}; send a well-formed message of the "
                                    "method's request type (string fields in UTF-8)")

        attribute = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, attribute)
        if inspect.isasyncgenfunction(behavior):

            async def checked_stream(request: Any, context: grpc.aio.ServicerContext):
                if isinstance(request, _Undecodable):
                    await _refuse(context, request)
                async for response in behavior(request, context):
                    yield response

            return handler._replace(request_deserializer=lenient, **{attribute: checked_stream})

        # A unary handler, or a stream one that writes with context.write (grpc's health Watch).
        async def checked(request: Any, context: grpc.aio.ServicerContext):
            if isinstance(request, _Undecodable):
                await _refuse(context, request)
            return await behavior(request, context)

        return handler._replace(request_deserializer=lenient, **{attribute: checked})
