"""docs/protocol.md's table of ErrorInfo reasons is the server's, both ways: every `abort(...)` in
session_server (reason, status code, metadata keys) is in the table, and every row of the table
is something the server emits."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from session_server.api import hub

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "protocol.md"
# abort(context, code, message, reason, retry_after=None, **metadata): retry_after adds a RetryInfo.
NOT_METADATA = {"retry_after"}

Emitted = dict[tuple[str, str], set[str]]


def emitted_by_the_code() -> Emitted:
    """{(reason, code name): metadata keys} over every abort() call of session_server."""
    found: Emitted = {}
    for path in sorted((REPO / "session_server").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "abort"
                    and len(node.args) >= 4):
                continue
            keys = {k.arg for k in node.keywords if k.arg is not None} - NOT_METADATA
            assert all(k.arg is not None for k in node.keywords), f"{path}:{node.lineno}: **metadata: list its keys"
            for reason, code in _reasons_and_codes(node, path):
                found.setdefault((reason, code), set()).update(keys)
    return found


def _reasons_and_codes(node: ast.Call, path: Path) -> list[tuple[str, str]]:
    code, reason = node.args[1], node.args[3]
    if isinstance(reason, ast.Constant) and isinstance(code, ast.Attribute):
        return [(reason.value, code.attr)]
    # The hub ends a worker's stream with the status of the fault that closed it.
    if ast.unparse(reason) == "link.fault.value" and ast.unparse(code) == "_FAULT_STATUS[link.fault]":
        return [(fault.value, status.name) for fault, status in hub._FAULT_STATUS.items()]
    raise AssertionError(f"{path}:{node.lineno}: abort() with a reason or code this test cannot read: "
                         f"{ast.unparse(node)}; use literals (or teach this test the new form)")


def documented() -> Emitted:
    """{(reason, code): metadata keys} from the table under "## Errors"."""
    section = DOCS.read_text(encoding="utf-8").split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows: Emitted = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            reason = cells[0].strip("`")
            assert (reason, cells[1]) not in rows, f"{reason} {cells[1]} is in the table twice"
            rows[(reason, cells[1])] = set(re.findall(r"`([a-z_]+)`", cells[2]))
    return rows


def test_every_error_reason_the_server_emits_is_in_the_table_and_back() -> None:
    code, docs = emitted_by_the_code(), documented()
    assert len(code) >= 15  # the walk found the servicers' aborts
    assert set(code) - set(docs) == set(), "emitted but not in docs/protocol.md's table"
    assert set(docs) - set(code) == set(), "in docs/protocol.md's table but never emitted"
    for key, keys in code.items():
        assert docs[key] == keys, f"{key}: metadata keys {sorted(keys)} in the code, {sorted(docs[key])} in the table"


def test_every_reason_has_one_status_code() -> None:
    codes: dict[str, set[str]] = {}
    for reason, code in emitted_by_the_code():
        codes.setdefault(reason, set()).add(code)
    assert {reason: c for reason, c in codes.items() if len(c) > 1} == {}
