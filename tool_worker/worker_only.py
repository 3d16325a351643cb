"""Tools that only workers offer, and what to start so that one does.

The session server never runs these itself (their module has no `TOOLS`, see
`tool_worker.plugins`), so when no connected worker offers one, a model's call of it ends with an
error that names what to start, rather than "unknown tool".
"""

from __future__ import annotations

from tool_worker import semantic

_START_HINTS: dict[str, str] = {semantic.TOOL_NAME: semantic.START_HINT}


def worker_only_hint(tool_name: str) -> str | None:
    """What to start to offer `tool_name`, for a tool only workers offer; None for any other."""
    return _START_HINTS.get(tool_name)
