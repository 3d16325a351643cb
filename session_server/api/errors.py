"""gRPC errors with a google.rpc.Status carrying an ErrorInfo (reason + metadata), and a RetryInfo
when the client should come back after a delay."""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "codelane.dev"

# A status travels in trailers, which clients refuse past 8-16 KiB: a message quoting a client's
# 20,000-character page token or session id ended the call with RESOURCE_EXHAUSTED ("Stream
# removed") instead of its own code. The message goes twice (grpc-message, percent-encoded, and
# the Status details, base64), so what a client sent is cut to these, in UTF-8 bytes.
MAX_MESSAGE_BYTES = 1024
MAX_METADATA_VALUE_BYTES = 128


def bounded(text: str, limit: int) -> str:
    """`text`, or its start and end around a note of what was cut, within `limit` UTF-8 bytes
    (the end is kept: it is where a message says what to do)."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    note = b" [... bytes cut ...] "
    head = (limit - len(note)) * 3 // 5
    tail = limit - len(note) - head
    return (data[:head] + note + data[len(data) - tail:]).decode("utf-8", "ignore")


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
    message = bounded(message, MAX_MESSAGE_BYTES)
    metadata = {key: bounded(value, MAX_METADATA_VALUE_BYTES) for key, value in metadata.items()}
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
