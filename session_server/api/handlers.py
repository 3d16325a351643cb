"""What the server's interceptors share: a method handler with its behavior wrapped.

grpc.aio keeps a handler's behavior under one of four names (unary_unary, ..., stream_stream),
and calls it as an async generator when it yields its responses, as a coroutine otherwise (a
unary call, or a stream written with context.write: the worker hub's Connect, grpc's health
Watch). An interceptor gives a wrapper for each of the two.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc

_ATTRIBUTES = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary",
               (True, True): "stream_stream"}

Behavior = Callable[..., Any]


def wrapped(handler: grpc.RpcMethodHandler, *, stream: Callable[[Behavior], Behavior],
            other: Callable[[Behavior], Behavior], **changes: Any) -> grpc.RpcMethodHandler:
    """`handler` with its behavior replaced by `stream(behavior)` when the behavior yields its
    responses, else by `other(behavior)`; `changes`: other fields to replace (a deserializer)."""
    attribute = _ATTRIBUTES[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, attribute)
    wrap = stream if inspect.isasyncgenfunction(behavior) else other
    return handler._replace(**changes, **{attribute: wrap(behavior)})
