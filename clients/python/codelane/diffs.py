"""Short diffs of the file changes a turn made, for people watching it: what an `edit` replaced
with what, and the start of what a `write` wrote. Worked out from the call's arguments alone."""

from __future__ import annotations

import difflib

from codelane.events import ToolCall
from codelane.terminal import safe_text

DIFF_LINES = 12  # lines of a diff shown; the rest is counted
LINE_CHARS = 160


def _cut(line: str) -> str:
    return line if len(line) <= LINE_CHARS else line[: LINE_CHARS - 1] + "…"


def _shortened(lines: list[str]) -> list[str]:
    if len(lines) <= DIFF_LINES:
        return lines
    return [*lines[:DIFF_LINES], f"… {len(lines) - DIFF_LINES} more line(s)"]


def call_diff(call: ToolCall) -> list[str]:
    """The diff of a successful `edit` or `write`: a heading, then lines starting with "-", "+" or
    " " (context); [] for other tools, or arguments of the wrong shape. Safe to print on a
    terminal (`terminal.safe_text`): the arguments are decoded here, escape sequences included."""
    return [safe_text(line) for line in _call_diff(call)]


def _call_diff(call: ToolCall) -> list[str]:
    args = call.arguments
    path = args.get("file_path")
    if not isinstance(path, str):
        return []
    if call.tool_name == "edit":
        old, new = args.get("old_string"), args.get("new_string")
        if not isinstance(old, str) or not isinstance(new, str):
            return []
        body = [
            line for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=2)
            if not line.startswith(("---", "+++", "@@"))
        ]
        every = " (every occurrence)" if args.get("replace_all") else ""
        return [f"edit {path}{every}:", *_shortened([_cut(line) for line in body])]
    if call.tool_name == "write":
        content = args.get("content")
        if not isinstance(content, str):
            return []
        lines = content.splitlines()
        return [f"write {path} ({len(lines)} line(s)):", *_shortened([_cut("+" + line) for line in lines])]
    return []
