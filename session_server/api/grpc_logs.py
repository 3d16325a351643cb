"""What grpc.aio logs about a client that leaves a response stream, said as what it is.

When a client cancels (or drops) a server-streaming call while grpc.aio writes one of its
messages, the write fails in gRPC's core, and grpc.aio logs `ExecuteBatchError raised in core by
servicer method [...]` at ERROR with a traceback: the write happens in gRPC's own code, after the
handler yielded the message, where no handler can catch it. It is the client's doing and the call
has ended; a client that opens and cancels streams could fill the log with tracebacks. This
filter turns each into one INFO line, and lets every other record of that logger through as is.
"""

from __future__ import annotations

import logging

from grpc._cython import cygrpc

GRPC_LOGGER = "grpc._cython.cygrpc"
_SIGN = "ExecuteBatchError raised in core by servicer method"


class ClientLeftFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, cygrpc.ExecuteBatchError) or _SIGN not in record.getMessage():
            return True
        # The logger's level let an ERROR through; the INFO line it becomes must pass the same test.
        if not logging.getLogger(GRPC_LOGGER).isEnabledFor(logging.INFO):
            return False
        method = record.getMessage().partition(_SIGN)[2].strip(" []")
        record.msg, record.args = "a client left while its stream was being written (%s): the call ended", (method,)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
        return True


def install() -> None:
    """Adds the filter to gRPC's logger, once per process."""
    logger = logging.getLogger(GRPC_LOGGER)
    if not any(isinstance(f, ClientLeftFilter) for f in logger.filters):
        logger.addFilter(ClientLeftFilter())
