"""A request message that does not parse ends its call with INVALID_ARGUMENT.

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


class _Undecodable:
    """What a request that did not parse is handed to its handler as."""

    __slots__ = ("error",)

    def __init__(self, error: DecodeError) -> None:
        self.error = error


async def _refuse(context: grpc.aio.ServicerContext, request: _Undecodable) -> NoReturn:
    await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                f"the request does not parse: {request.error}; send a well-formed message of the method's request "
                "type (string fields in UTF-8)", "INVALID_ARGUMENT")


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

        def lenient(raw: bytes) -> Any:
            try:
                return parse(raw)
            except DecodeError as exc:
                return _Undecodable(exc)

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
