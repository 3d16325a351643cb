"""Whether a process traces, and the listen addresses of its side endpoints. Imports nothing heavy:
OpenTelemetry is loaded only by `start_tracing`, and only when tracing is on."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tool_worker.telemetry.tracing import Tracing

# The standard variables (OpenTelemetry's exporter spec), in the order they take precedence.
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def tracing_endpoint(flag: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """Where spans go: `--otlp-endpoint`, else the standard variables; None means tracing is off
    (also when OTEL_SDK_DISABLED=true)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if flag:
        return flag
    return next((env[name] for name in ENDPOINT_VARIABLES if env.get(name)), None)


def start_tracing(flag: str | None, service_name: str, instance_id: str = "") -> Tracing | None:
    """A `Tracing` exporting to the configured endpoint, or None when tracing is off."""
    endpoint = tracing_endpoint(flag)
    if endpoint is None:
        return None
    from tool_worker.telemetry.tracing import Tracing

    # Without the flag the exporter reads the variables itself (headers, certificates, insecure).
    return Tracing(service_name, endpoint=flag or None, instance_id=instance_id)


def split_address(listen: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port); ValueError when it is not one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{listen!r} is not HOST:PORT (e.g. 0.0.0.0:9464, or 127.0.0.1:0 for any free port)")
    return host.strip("[]"), int(port)
