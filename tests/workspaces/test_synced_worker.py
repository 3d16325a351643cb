"""A worker that cannot use the server's path (outside its --root) runs every Query tool on a
synced copy, and answers exactly what the tool answers on the server itself."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from session_server.pool import QueryCall
from tests.pool.conftest import wait_for
from tool_worker.merkle import Digest, SnapshotRef
from tool_worker.registry import ToolRegistry
from tool_worker.tools.base import ErrorKind


def make_workspace(root: Path) -> None:
    (root / "src" / "app").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "src" / "app" / "main.py").write_text("def load_config(path):\n    return open(path).read()\n")
    (root / "src" / "app" / "util.py").write_text("import os\n\ndef helper():\n    return os.getcwd()\n")
    (root / "docs" / "guide.md").write_text("# Guide\nCall load_config to read the config.\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / ".gitignore").write_text("build/\n")
    (root / "build").mkdir()
    (root / "build" / "out.txt").write_text("ignored\n")
    (root / "ünï.txt").write_text("unicode name\n")
    # Distinct modification times: glob lists the newest first.
    for i, path in enumerate(sorted(p for p in root.rglob("*") if p.is_file())):
        os.utime(path, ns=(1_600_000_000_000_000_000 + i * 1_000_000_007,) * 2)


def calls(ws: Path) -> list[tuple[str, dict]]:
    absolute = str(ws)
    return [
        ("read", {"file_path": "src/app/main.py"}),
        ("read", {"file_path": f"{absolute}/docs/guide.md"}),
        ("read", {"file_path": f"{absolute}/missing.txt"}),
        ("read", {"file_path": "/etc/hostname"}),
        ("glob", {"pattern": "**/*.py"}),
        ("glob", {"pattern": "*", "path": f"{absolute}/src"}),
        ("grep", {"pattern": "load_config"}),
        ("grep", {"pattern": "load_config", "output_mode": "content", "path": absolute}),
        ("grep", {"pattern": "o", "output_mode": "count", "path": f"{absolute}/src/app"}),
        ("grep", {"pattern": "os", "path": f"{absolute}/src/app/util.py", "output_mode": "content"}),
        ("ls", {}),
        ("ls", {"path": f"{absolute}/src/app"}),
        ("list_files", {}),
        ("list_files", {"path": f"{absolute}/src", "max_depth": 1}),
        ("search", {"query": "load config"}),
    ]


async def test_every_query_tool_answers_on_a_copy_as_on_the_server(make_server, workers, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    make_workspace(ws)
    (tmp_path / "root").mkdir()
    server = await make_server()
    workers.spawn(server.port, "w1", roots=(str(tmp_path / "root"),))
    await wait_for(lambda: server.pool.workers(), what="the worker")
    current = await server.snapshots.of(str(ws)).current()
    snapshot = SnapshotRef(str(ws), current.digest, current.times_digest)
    registry = ToolRegistry.builtin()
    for tool, arguments in calls(ws):
        expected = await registry.execute(tool, ws, json.dumps(arguments))
        got = await asyncio.wait_for(server.pool.dispatch(QueryCall(
            session_id="s", call_id="c", tool_name=tool, arguments_json=json.dumps(arguments), workspace=str(ws),
            snapshot=snapshot,
        )), 30)
        assert got.worker_id == "w1"
        assert (got.output, got.is_error, got.error_kind, got.truncated, got.metadata) == (
            expected.output, expected.is_error, expected.error_kind, expected.truncated, expected.metadata
        ), f"{tool} {arguments}"
    held = server.pool.worker("w1").workspaces[str(ws)]
    assert held.mode == "synced" and held.digest == current.digest


async def test_a_snapshot_the_workspace_outran_is_snapshot_changed_and_the_worker_stays_usable(
    make_server, workers, tmp_path: Path
) -> None:
    # The file changes after the snapshot naming it was taken (an Execute call on it ran beside the
    # Query call): the server's CAS no longer holds that blob, so the worker cannot present the
    # snapshot. It says so with SNAPSHOT_CHANGED (the server then sends the call again on a newer
    # snapshot), not as a fault of its own: a newer snapshot syncs and runs.
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.txt").write_text("first\n")
    (tmp_path / "root").mkdir()
    server = await make_server()
    workers.spawn(server.port, "w1", roots=(str(tmp_path / "root"),))
    await wait_for(lambda: server.pool.workers(), what="the worker")
    snapshots = server.snapshots.of(str(ws))
    stale = await snapshots.current()
    (ws / "a.txt").write_text("second, longer\n")

    def read(current) -> QueryCall:
        return QueryCall(session_id="s", call_id="c", tool_name="read", arguments_json='{"file_path": "a.txt"}',
                         workspace=str(ws), snapshot=SnapshotRef(str(ws), current.digest, current.times_digest))

    result = await asyncio.wait_for(server.pool.dispatch(read(stale)), 30)
    assert result.error_kind is ErrorKind.SNAPSHOT_CHANGED, result
    assert "changed after the snapshot" in result.output and "second" not in result.output
    assert server.pool.worker("w1").workspaces[str(ws)].mode != "unavailable"

    snapshots.changed()
    fresh = await snapshots.current()
    result = await asyncio.wait_for(server.pool.dispatch(read(fresh)), 30)
    assert not result.is_error and "second, longer" in result.output


SECRET = "codelane-test-secret-7f3a9c"


def make_denied_workspace(ws: Path) -> list[Path]:
    """A workspace holding two paths the operator denies: a file and a directory."""
    (ws / "src").mkdir(parents=True)
    (ws / "src" / "main.py").write_text("print('hello')\n")
    (ws / "deploy").mkdir()
    (ws / "deploy" / "credentials.txt").write_text(f"TOKEN={SECRET}\n")
    (ws / "private").mkdir()
    (ws / "private" / "key.pem").write_text(f"KEY={SECRET}\n")
    return [ws / "deploy" / "credentials.txt", ws / "private"]


def files_holding(root: str, needle: bytes) -> list[str]:
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if not os.path.islink(path) and needle in Path(path).read_bytes():
                found.append(path)
    return found


async def test_the_operators_deny_list_never_travels_to_a_synced_worker(make_server, workers, tmp_path: Path) -> None:
    # The tools on a worker refused the operator's denied paths, but the snapshot named them, so
    # a worker on another host received their bytes (and so would an external CAS).
    ws = tmp_path / "ws"
    denied = make_denied_workspace(ws)
    (tmp_path / "root").mkdir()
    server = await make_server(sandbox_deny_read=denied)
    workers.spawn(server.port, "w1", roots=(str(tmp_path / "root"),))
    await wait_for(lambda: server.pool.workers(), what="the worker")
    current = await server.snapshots.of(str(ws)).current()
    result = await asyncio.wait_for(server.pool.dispatch(QueryCall(
        session_id="s", call_id="c", tool_name="list_files", arguments_json="{}", workspace=str(ws),
        snapshot=current.ref,
    )), 30)
    assert not result.is_error and "main.py" in result.output, result
    assert "credentials.txt" not in result.output and "key.pem" not in result.output, result.output
    assert server.pool.worker("w1").workspaces[str(ws)].mode == "synced"
    assert files_holding(workers.cache_root, SECRET.encode()) == []
    secret_digests = [Digest.of(path.read_bytes()) for path in (denied[0], ws / "private" / "key.pem")]
    assert await server.content.read_many(secret_digests) == [None, None]
    assert current.ref.exclude == ("deploy/credentials.txt", "private")


def make_latin1_directory(ws: Path) -> Path:
    """A directory of `ws` whose name is not UTF-8, holding the secret."""
    odd = Path(os.fsdecode(bytes(ws) + b"/latin1-\xe9"))
    odd.mkdir()
    (odd / "key.pem").write_text(f"KEY={SECRET}\n")
    return odd


async def test_a_denied_path_whose_name_is_not_utf8_is_no_exclusion_pattern(make_server, workers,
                                                                            tmp_path: Path) -> None:
    # WorkspaceSnapshot.exclude is a proto string, which must be UTF-8: a --sandbox-deny-read path
    # of the workspace named in other bytes made every Assign of the workspace unencodable.
    # Rule 1 leaves such a name out of every snapshot already, with all under it.
    ws = tmp_path / "ws"
    denied = make_denied_workspace(ws)
    odd = make_latin1_directory(ws)
    (tmp_path / "root").mkdir()
    server = await make_server(sandbox_deny_read=[*denied, odd])
    workers.spawn(server.port, "w1", roots=(str(tmp_path / "root"),))
    await wait_for(lambda: server.pool.workers(), what="the worker")
    current = await server.snapshots.of(str(ws)).current()
    assert current.ref.exclude == ("deploy/credentials.txt", "private")
    result = await asyncio.wait_for(server.pool.dispatch(QueryCall(
        session_id="s", call_id="c", tool_name="list_files", arguments_json="{}", workspace=str(ws),
        snapshot=current.ref,
    )), 30)
    assert not result.is_error and "main.py" in result.output, result
    assert "key.pem" not in result.output
    assert files_holding(workers.cache_root, SECRET.encode()) == []


async def test_a_worker_on_the_shared_filesystem_applies_the_workspaces_own_exclusions(
    make_server, workers, tmp_path: Path
) -> None:
    # Its own digest of the server's path must leave out what the server's left out, or it
    # never proves it shares the workspace (it syncs a copy instead).
    ws = tmp_path / "ws"
    denied = make_denied_workspace(ws)
    server = await make_server(sandbox_deny_read=denied)
    workers.spawn(server.port, "w1", roots=(str(ws),))
    await wait_for(lambda: server.pool.workers(), what="the worker")
    current = await server.snapshots.of(str(ws)).current()
    result = await asyncio.wait_for(server.pool.dispatch(QueryCall(
        session_id="s", call_id="c", tool_name="read", arguments_json='{"file_path": "src/main.py"}',
        workspace=str(ws), snapshot=current.ref,
    )), 30)
    assert not result.is_error and "hello" in result.output, result
    held = server.pool.worker("w1").workspaces[str(ws)]
    assert (held.mode, held.digest) == ("shared", current.digest)
