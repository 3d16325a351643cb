"""Side endpoints of a server or worker process: Prometheus `/metrics` over HTTP, and a plaintext
gRPC port that serves only the standard health service (for probes that speak neither the
service's TLS nor its token, such as a kubelet's gRPC probe).

`/metrics` is served from the process's event loop, not from a thread: the collectors read live
domain state (the worker pool, the event bus), which only the loop's thread may touch.
"""

from __future__ import annotations

import logging
import socket

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from grpc_health.v1 import health, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from tool_worker.telemetry.config import split_address

# What aiohttp logs of the requests to /metrics (a collector that fails, with its traceback).
HTTP_LOGGER = "codelane.metrics.http"


class BadRequestFilter(logging.Filter):
    """aiohttp logs each request it cannot parse (bytes that are not HTTP, a header past its
    limit) as "Error handling request" at ERROR with a traceback: anyone who reaches the metrics
    port, which has no token, wrote an ERROR per connection into the log. It answered 400 and the
    process is fine: one DEBUG line. Every other record passes as is."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        # The record passed the logger's level as an ERROR; as a DEBUG line it must pass it too.
        if not logging.getLogger(HTTP_LOGGER).isEnabledFor(logging.DEBUG):
            return False
        record.msg, record.args = "a request to the metrics port that is not HTTP (%s): answered %d", (
            error.message, error.code)
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        return True


def _http_logger() -> logging.Logger:
    logger = logging.getLogger(HTTP_LOGGER)
    if not any(isinstance(f, BadRequestFilter) for f in logger.filters):
        logger.addFilter(BadRequestFilter())
    return logger


class MetricsEndpoint:
    """`GET /metrics` for one registry. `await start()` returns the bound port."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        self._host, self._port = split_address(listen)
        self._registry = registry
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, logger=_http_logger())
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"cannot serve metrics on {self._host}:{self._port}: {exc.strerror or exc}") from None
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self.port

    async def _metrics(self, request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self._registry), headers={"Content-Type": content_type})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def serve_health(listen: str, servicer: health.aio.HealthServicer) -> tuple[grpc.aio.Server, int]:
    """A plaintext gRPC server on `listen` with only `servicer`; returns it and its port."""
    host, port = split_address(listen)
    # gRPC logs its own lines before it fails to bind, and this gRPC raises RuntimeError where
    # older ones returned 0 (a traceback): a busy or foreign address is found first, in one line.
    refuse_unbindable(host, port, f"cannot serve gRPC health on {listen}")
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot serve gRPC health on {listen}: the address is in use or not available on this host")
    await server.start()
    return server, port


def bind_errors(host: str, port: int) -> tuple[int, list[OSError]]:
    """Binds each address `host:port` resolves to, the way gRPC will bind it, and lets go: how many
    addresses there are, and the errors of those that would not bind. Raises socket.gaierror for
    a host that does not resolve."""
    addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    errors = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                errors.append(exc)
    return len(addresses), errors


def refuse_unbindable(host: str, port: int, what: str) -> None:
    """Raises OSError (`what`: why) when `host:port` cannot be bound, binding it as gRPC will."""
    try:
        _, errors = bind_errors(host, port)
    except socket.gaierror as exc:
        raise OSError(f"{what}: {exc.strerror}") from None
    if errors:
        raise OSError(f"{what}: {errors[0].strerror or errors[0]}")
