"""gRPC errors with a google.rpc.Status carrying an ErrorInfo (reason + metadata), and a RetryInfo
when the client should come back after a delay."""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "codelane.dev"


async def abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    reason: str,
    retry_after: float | None = None,
    **metadata: str,
) -> NoReturn:
    """Ends the call with `code`, a message for a person, and ErrorInfo for a program (and
    RetryInfo with `retry_after` seconds, when given)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    details = [any_pb2.Any()]
    details[0].Pack(info)
    if retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(any_pb2.Any())
        details[1].Pack(retry)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort_with_status raises")
