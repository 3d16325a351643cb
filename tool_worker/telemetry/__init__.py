"""Observability shared by the session server and the tool worker: log context and JSON logs
(`logs`), the /metrics and gRPC health endpoints (`endpoints`), and OpenTelemetry tracing
(`tracing`, imported only when tracing is on, so a process that does not trace never loads it)."""
