"""codelane: a runtime for coding agents that fans tool calls out across machines.

The `codelane` package holds the Python SDK and the generated stubs of the codelane.v1 contract
(`codelane.v1`). The server lives in `session_server`, the tools and worker in `tool_worker`.

    from codelane import Client            # the async SDK (codelane.client)
    from codelane.sync import Client       # the same API, blocking (codelane.sync)

The names below are imported on first use, so `import codelane` stays cheap (no gRPC, no
protobuf) for the CLI and for tools that only want the version.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing would double this module's cost

__version__ = "0.1.0"

__all__ = [
    "CallRetried",
    "CaughtUp",
    "Client",
    "CodelaneError",
    "ConfirmationRequired",
    "ConfirmationResolved",
    "ErrorOccurred",
    "Event",
    "ExternalTask",
    "ExternalTaskCompleted",
    "ExternalTaskPending",
    "LaneStats",
    "Message",
    "ModelResponded",
    "ServerInfo",
    "Session",
    "SessionInfo",
    "TextDelta",
    "ToolCall",
    "ToolCallFinished",
    "ToolCallStarted",
    "ToolInfo",
    "ToolResult",
    "TurnFinished",
    "TurnStarted",
    "Usage",
    "WorkerInfo",
    "WorkerLost",
    "__version__",
]
# The async SDK's names; the others are event types from codelane.events.
_CLIENT_NAMES = {"Client", "Session", "CodelaneError", "SessionInfo", "Message", "WorkerInfo", "LaneStats",
                 "ServerInfo", "ToolInfo"}
_LAZY: dict[str, str] = {
    name: "codelane.client" if name in _CLIENT_NAMES else "codelane.events" for name in __all__ if name != "__version__"
}

if TYPE_CHECKING:
    from codelane.client import (
        Client,
        CodelaneError,
        LaneStats,
        Message,
        ServerInfo,
        Session,
        SessionInfo,
        ToolInfo,
        WorkerInfo,
    )
    from codelane.events import (
        CallRetried,
        CaughtUp,
        ConfirmationRequired,
        ConfirmationResolved,
        ErrorOccurred,
        Event,
        ExternalTask,
        ExternalTaskCompleted,
        ExternalTaskPending,
        ModelResponded,
        TextDelta,
        ToolCall,
        ToolCallFinished,
        ToolCallStarted,
        ToolResult,
        TurnFinished,
        TurnStarted,
        Usage,
        WorkerLost,
    )


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'codelane' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
