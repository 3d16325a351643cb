"""A call the store fails ends with UNAVAILABLE and ErrorInfo STORE_UNAVAILABLE: one place for every
service, rather than a try in every method.

SQLite raises sqlite3.Error when the server's store cannot take a write (a read-only file, a full
disk, an I/O error, a lock held too long). Left to grpc, such a call ended UNKNOWN, without an
ErrorInfo and with a traceback in the log per call; here it gets a status saying what failed and
what to do, and the log one line. The domain raises `store.StoreUnavailable` itself where it
refuses what the store cannot record now (a turn over events still waiting to be stored).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc

from session_server.api.errors import abort
from session_server.api.handlers import Behavior, wrapped
from session_server.store import StoreUnavailable, store_unavailable

log = logging.getLogger("codelane.store")



async def _unavailable(context: grpc.aio.ServicerContext, method: str,
                       exc: sqlite3.Error | StoreUnavailable) -> NoReturn:
    if isinstance(exc, sqlite3.Error):
        failure, exc = exc, store_unavailable(exc)
        log.error("%s failed: the store failed: %s (%s)", method, failure, exc.error_name or type(failure).__name__)
    await abort(context, grpc.StatusCode.UNAVAILABLE, str(exc), "STORE_UNAVAILABLE", sqlite_error=exc.error_name)


class StoreFailureInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method

        def stream(behavior: Behavior) -> Behavior:
            async def guarded_stream(request: Any, context: grpc.aio.ServicerContext):
                responses = behavior(request, context)
                try:
                    async for response in responses:
                        yield response
                except (sqlite3.Error, StoreUnavailable) as exc:
                    await _unavailable(context, method, exc)
                finally:
                    # Closed here, not left to the finalizer: its cleanup (a subscription
                    # dropped) happens while the call is still open.
                    await responses.aclose()

            return guarded_stream

        def other(behavior: Behavior) -> Behavior:
            async def guarded(request: Any, context: grpc.aio.ServicerContext):
                try:
                    return await behavior(request, context)
                except (sqlite3.Error, StoreUnavailable) as exc:
                    await _unavailable(context, method, exc)

            return guarded

        return wrapped(handler, stream=stream, other=other)
