"""Shared fixtures: a small workspace and a way to call a tool the way the worker does."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tool_worker.registry import ToolRegistry
from tool_worker.tools.base import ToolResult

Call = Callable[..., Awaitable[ToolResult]]


@pytest.fixture(scope="session")
def registry() -> ToolRegistry:
    return ToolRegistry.builtin()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "build").mkdir()
    (root / ".gitignore").write_text("build/\n*.log\n")
    (root / "src" / "app.py").write_text("def load_config(path):\n    return path\n\n# TODO: cache it\n")
    (root / "src" / "pkg" / "util.py").write_text("def helper():\n    return load_config('x')\n")
    (root / "src" / "pkg" / "web.js").write_text("export function loadConfig() { return 1; }\n")
    (root / "build" / "out.py").write_text("load_config = 'ignored'\n")
    (root / "debug.log").write_text("load_config in a log\n")
    (root / "README.md").write_text("# Demo\n")
    return root


@pytest.fixture
def call(registry: ToolRegistry, workspace: Path) -> Call:
    """call("grep", pattern="x") runs the tool on `workspace` through the registry."""

    async def run(name: str, **arguments: Any) -> ToolResult:
        return await registry.execute(name, workspace, json.dumps(arguments))

    return run
