"""What a tool worker lends the tool modules it loads.

A tool module (`codelane worker --tools MODULE`) exposes either

- `TOOLS: list[Tool]`: tools that run anywhere. The session server loads these modules too
  (`codelane server --worker-tools`), to run their Query tools itself when no worker can; or
- `load_tools(host: ToolHost) -> list[Tool]`: tools that need what only a worker process has
  (a model in memory, a cache directory, an accelerator). Only workers call it, once, before
  they say Hello; it returns no tools when what they need is missing (and logs why), so a worker
  never offers a tool it cannot run. The session server never calls it, so it never loads what
  such tools load.

A tool's `run` returns a `ToolResult` (a str output, an `ErrorKind` or None, a 32-bit exit code,
metadata JSON can write): anything else ends the call with an INTERNAL error saying what was
wrong with it, wherever the tool ran. `run` is a coroutine on the worker's (or the server's) event
loop: it must not block it (blocking work goes to `asyncio.to_thread`: a loop held past the hub's
heartbeat timeout loses the worker, and its calls are sent to another), and it must let
`asyncio.CancelledError` through (the hub's Cancel and the call's deadline cancel it; a run that
swallows it keeps its slot busy for good).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ToolHost:
    """The worker as a `load_tools` function sees it."""

    # A directory the worker's tools may keep caches in (`--cache-dir`), shared by its tools:
    # each takes a subdirectory named after itself.
    cache_dir: Path
    # The worker's labels: the operator's (`--labels`), plus those tools add with `add_labels`.
    labels: dict[str, str] = field(default_factory=dict)
    # Labels the operator requires per tool name (`--require TOOL:KEY=VALUE`).
    required_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def add_labels(self, labels: Mapping[str, str]) -> None:
        """Labels the worker reports about itself (an accelerator, say); the operator's win.
        ValueError for a label that is not a str key and value, both printable: a value not a str
        made the worker's Hello fail to encode (a traceback, at every start). Unlike `--labels`,
        a value may hold spaces (a device's name)."""
        for key, value in labels.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"label {key!r}: {value!r} is not a str key and a str value")
            if not key or not key.isprintable() or not value.isprintable():
                raise ValueError(f"label {key!r}: {value!r} is empty or holds a control character")
        for key, value in labels.items():
            self.labels.setdefault(key, value)

    def unmet_requirements(self, tool_name: str) -> dict[str, str]:
        """The labels required for `tool_name` that this worker does not carry (as required)."""
        required = self.required_labels.get(tool_name, {})
        return {key: value for key, value in required.items() if self.labels.get(key) != value}
