"""gRPC calls as the server sees them: counted and timed by method and status, and (tracing on)
each a server span continuing the caller's W3C trace context from its metadata.

The interceptor comes first in the chain, so a call refused by authentication is counted too. It
wraps each handler once per call; the messages of a stream only pass through the wrapper's loop
(a response stream's) or not at all (the worker hub reads and writes its stream itself).

The server span is made current in the call's task while the servicer runs: a turn started by
SendMessage runs in a task created there, which inherits it, so the turn's `invoke_agent` span is
its child (see session_server.telemetry.TurnObservation). A response stream's span is current only
while its generator computes the next message, not across its yields: grpc.aio abandons a stream
whose call is cancelled while a message is being written, and the event loop's finalizer closes it
later in a task of its own, where a context entered in the call's task cannot be left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from session_server.api.handlers import Behavior, wrapped
from session_server.metrics import ServerMetrics
from session_server.telemetry import Telemetry

# Long-lived streams whose span would only say "connected for hours".
UNTRACED = ("/codelane.v1.WorkerHubService/", "/grpc.health.v1.Health/", "/grpc.reflection.")

_TYPES = {(False, False): "unary", (False, True): "server_stream", (True, False): "client_stream",
          (True, True): "bidi_stream"}


class _Observed:
    """One call: its labels, its span, and how it ended."""

    __slots__ = ("_full", "_labels", "_metrics", "_started", "_telemetry", "span")

    def __init__(self, telemetry: Telemetry, details: grpc.HandlerCallDetails, grpc_type: str) -> None:
        self._full = details.method
        service, _, method = details.method.lstrip("/").partition("/")
        self._telemetry = telemetry
        self._metrics: ServerMetrics = telemetry.metrics
        self._labels = (grpc_type, service, method)
        self._metrics.grpc_started.labels(*self._labels).inc()
        self._started = time.perf_counter()
        self.span = None
        tracing = telemetry.tracing
        if tracing is not None and not details.method.startswith(UNTRACED):
            self.span = tracing.start(
                f"{service}/{method}", kind="server",
                parent=tracing.from_metadata(details.invocation_metadata),
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
            )

    def enter(self) -> object | None:
        """Makes the call's span current in this task (tracing on); the token is for `leave`, in the
        same task."""
        return None if self.span is None else self._telemetry.tracing.attach(self.span)

    def leave(self, token: object | None) -> None:
        if token is not None:
            self._telemetry.tracing.detach(token)

    def end(self, code: grpc.StatusCode) -> None:
        self._metrics.grpc_handled.labels(*self._labels, code.name).inc()
        self._metrics.grpc_handling.labels(*self._labels).observe(time.perf_counter() - self._started)
        if self.span is not None:
            tracing = self._telemetry.tracing
            self.span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                tracing.fail(self.span, code.name, f"{self._full} ended with {code.name}")
            self.span.end()


def _code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()  # set by abort() or set_code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        telemetry = self._telemetry
        grpc_type = _TYPES[(handler.request_streaming, handler.response_streaming)]

        def stream(behavior: Behavior) -> Behavior:
            async def observed_stream(request: Any, context: grpc.aio.ServicerContext):
                call = _Observed(telemetry, details, grpc_type)
                responses = behavior(request, context)
                failure: BaseException | None = None
                try:
                    while True:
                        token = call.enter()
                        try:
                            response = await anext(responses)
                        except StopAsyncIteration:
                            break
                        finally:
                            call.leave(token)
                        yield response
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    # Closed here, not left to the finalizer: its own cleanup (a subscription
                    # dropped) happens before the call is counted as ended.
                    try:
                        await responses.aclose()
                    finally:
                        call.end(_code(context, failure))
                        # The exception's traceback holds this frame, which holds the request:
                        # a cycle kept a refused 60 MiB request alive until the collector ran.
                        failure = None

            return observed_stream

        def other(behavior: Behavior) -> Behavior:
            async def observed(request: Any, context: grpc.aio.ServicerContext):
                call = _Observed(telemetry, details, grpc_type)
                token = call.enter()
                failure: BaseException | None = None
                try:
                    return await behavior(request, context)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    call.leave(token)
                    call.end(_code(context, failure))
                    failure = None  # no cycle through the exception's traceback (see above)

            return observed

        return wrapped(handler, stream=stream, other=other)
