"""A request message that does not parse, or that is bigger than its method ever takes, ends its
call with INVALID_ARGUMENT.

gRPC parses a request before any servicer runs, and a parse error (a string field of bad UTF-8,
a truncated field) escaped as UNKNOWN, with a traceback logged per call. This interceptor, last
in the chain (after authentication), lets the parse fail into a marker that the handler turns
into a status. A request stream's messages are parsed as the servicer reads them, so there the
marker becomes UndecodableMessage, raised at that read: a servicer that owes a status of its own
for it catches it (the worker hub: INVALID_HELLO for a first message), and one that does not
ends with INVALID_ARGUMENT like a unary call (ByteStream.Write).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from session_server.api.errors import abort
from session_server.api.handlers import Behavior, wrapped

# Requests refused unparsed past a size. Protobuf parses a map (labels, env) in time quadratic
# in its entries (200,000 labels: 0.3 s; the 64 MiB a request may take: minutes), on the event
# loop, before any handler can refuse it; and every request parsed is held until its call ends:
# eight clients sending 60 MiB prompts, each refused, had the server hold 5-6 GiB. Each bound is
# well over the largest request the method accepts: a CreateSession of a config of 1 Mi characters
# as stored and labels of 64 KiB is about 1.2 MiB, a prompt of 1 Mi characters at most 4 MiB of
# UTF-8, an external task's result of 1 Mi characters the same with its metadata.
MAX_REQUEST_BYTES = {
    "/codelane.v1.SessionService/CreateSession": 2 * 1024 * 1024,
    "/codelane.v1.SessionService/SendMessage": 5 * 1024 * 1024,
    "/codelane.v1.SessionService/CompleteExternalTask": 8 * 1024 * 1024,
}
# Every other request of the client-facing services holds ids, page tokens and short texts.
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
_BOUNDED_SERVICES = ("/codelane.v1.SessionService/", "/codelane.v1.AdminService/")



class UndecodableMessage(Exception):
    """A request, or a message of a request stream, refused unparsed: it does not parse, or it is
    bigger than its method takes. The exception's message says which, for the client."""


class _Undecodable:
    """What a request that did not parse is handed on as: why, for the client."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


async def _refuse(context: grpc.aio.ServicerContext, exc: UndecodableMessage) -> NoReturn:
    await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT")


async def _checked_messages(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise UndecodableMessage(request.problem)
        yield request


def _parsed(request: Any, streaming: bool) -> Any:
    """What the servicer is handed: a request stream whose reads raise UndecodableMessage for a
    message that did not parse, or the request (UndecodableMessage at once if it did not)."""
    if streaming:
        return _checked_messages(request)
    if isinstance(request, _Undecodable):
        raise UndecodableMessage(request.problem)
    return request


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        largest = MAX_REQUEST_BYTES.get(details.method)
        if largest is None and details.method.startswith(_BOUNDED_SERVICES):
            largest = DEFAULT_MAX_REQUEST_BYTES
        streaming = handler.request_streaming
        what = "a message of the request stream" if streaming else "the request"

        def lenient(raw: bytes) -> Any:
            if largest is not None and len(raw) > largest:
                return _Undecodable(f"the request is {len(raw):,} bytes; {details.method} takes at most {largest:,} "
                                    "(its fields' own bounds, in session.proto, are well under it)")
            try:
                return parse(raw)
            except DecodeError as exc:
                return _Undecodable(f"{what} does not parse: {exc}; send only well-formed messages of the "
                                    "method's request type (string fields in UTF-8)")

        def stream(behavior: Behavior) -> Behavior:
            async def checked_stream(request: Any, context: grpc.aio.ServicerContext):
                try:
                    async for response in behavior(_parsed(request, streaming), context):
                        yield response
                except UndecodableMessage as exc:
                    await _refuse(context, exc)

            return checked_stream

        def other(behavior: Behavior) -> Behavior:
            async def checked(request: Any, context: grpc.aio.ServicerContext):
                try:
                    return await behavior(_parsed(request, streaming), context)
                except UndecodableMessage as exc:
                    await _refuse(context, exc)

            return checked

        return wrapped(handler, stream=stream, other=other, request_deserializer=lenient)
