"""OpenTelemetry tracing of one process, exported over OTLP/gRPC.

Imported only when tracing is on (see `config.start_tracing`): code on the call path holds a
`Tracing` or None and checks for None, so a process that does not trace never loads
OpenTelemetry and pays one comparison per call.

Each `Tracing` has its own `TracerProvider` (never the global one), so a server and a client in
one process (tests, the embedded server) keep their spans apart. Spans leave in batches from the
SDK's exporter thread; `shutdown()` sends what is left.

Trace context crosses processes in the W3C format (`traceparent`, `tracestate`): in gRPC
metadata for an RPC, and inside messages (`codelane.v1.TraceContext`) where metadata cannot carry
one per unit of work.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from codelane import __version__

_KINDS = {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER, "client": SpanKind.CLIENT}
_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """A tracer for one service (`codelane-server`, `codelane-worker`) and its exporter.

    `endpoint` None: the exporter reads the standard OTEL_EXPORTER_OTLP_* variables itself.
    """

    def __init__(self, service_name: str, *, endpoint: str | None = None, instance_id: str = "") -> None:
        attributes = {"service.version": __version__, "service.instance.id": instance_id or uuid.uuid4().hex}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = service_name
        self._provider = TracerProvider(resource=Resource.create(attributes))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self._provider.get_tracer("codelane", __version__)

    def start(
        self,
        name: str,
        *,
        kind: str = "internal",
        parent: Span | otel_context.Context | None = None,
        attributes: Mapping[str, Any] | None = None,
        start_time_ns: int | None = None,
    ) -> Span:
        """A started span (end it with `end()`). `parent` None: the current context's span."""
        if isinstance(parent, Span):
            parent = trace.set_span_in_context(parent)
        return self.tracer.start_span(
            name, context=parent, kind=_KINDS[kind], attributes=attributes, start_time=start_time_ns
        )

    @staticmethod
    def fail(span: Span, error_type: str, message: str) -> None:
        """Marks the span failed: status ERROR with `message`, and `error.type`."""
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, message))

    @staticmethod
    def attach(span: Span) -> object:
        """Makes `span` the current one in this task's context; returns the token for `detach`."""
        return otel_context.attach(trace.set_span_in_context(span))

    @staticmethod
    def detach(token: object) -> None:
        otel_context.detach(token)

    @staticmethod
    def trace_id(span: Span) -> str:
        """The span's trace id as 32 hex digits (what logs carry)."""
        return format(span.get_span_context().trace_id, "032x")

    @staticmethod
    def carrier(span: Span) -> tuple[str, str]:
        """The W3C (traceparent, tracestate) naming `span` as the parent of remote work."""
        headers: dict[str, str] = {}
        _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))
        return headers.get("traceparent", ""), headers.get("tracestate", "")

    @staticmethod
    def remote_parent(traceparent: str, tracestate: str = "") -> otel_context.Context:
        """The context a W3C traceparent names; an empty one (a new trace) when it is not valid."""
        carrier = {"traceparent": traceparent}
        if tracestate:
            carrier["tracestate"] = tracestate
        return _PROPAGATOR.extract(carrier)

    @staticmethod
    def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
        """The caller's context from gRPC metadata (`traceparent`, `tracestate`)."""
        carrier = {key: value for key, value in metadata or () if key in ("traceparent", "tracestate")
                   and isinstance(value, str)}
        return _PROPAGATOR.extract(carrier)

    def shutdown(self) -> None:
        """Exports what is left and stops the exporter (bounded by the SDK's export timeout)."""
        self._provider.shutdown()
