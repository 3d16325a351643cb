"""A worker-only tool plugin for the registry tests: `load_tools(host)`, no TOOLS."""

from __future__ import annotations

from typing import Any

from tool_worker.plugins import ToolHost
from tool_worker.tools.base import Lane, Tool, ToolContext, ToolResult, ToolSpec


def load_tools(host: ToolHost) -> list[Tool]:
    """Offers `whereami` unless the operator asked for a label this worker lacks."""
    host.add_labels({"accelerator": "cpu", "zone": "from-plugin"})
    if host.unmet_requirements("whereami"):
        return []
    cache = host.cache_dir / "whereami"

    async def run(_ctx: ToolContext, _args: dict[str, Any]) -> ToolResult:
        return ToolResult(output=str(cache))

    spec = ToolSpec("whereami", "Says where its cache is.", {"type": "object"}, Lane.QUERY, True)
    return [Tool(spec=spec, run=run)]
