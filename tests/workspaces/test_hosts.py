"""Workers on other hosts (network and mount namespaces, tests/hosts.py): they cannot see the
server's workspace, and still answer every Query call from a synced copy, fresh after every
change. Needs root and iproute2; skipped with the reason elsewhere."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from pathlib import Path

import pytest

from codelane.v1 import admin_pb2, workspace_pb2
from session_server.server import CodelaneServer, ServerConfig
from tests.hosts import TestHost, test_host
from tests.pool.conftest import wait_for
from tests.session.conftest import Client, kind, scripted

__all__ = ["test_host"]

TOKEN = "worker-secret"
QUERY_TOOLS = {"read", "grep", "glob", "list_files", "search", "ls"}


async def start_server(tmp_path: Path, host: TestHost, model: str, **overrides) -> CodelaneServer:
    config = ServerConfig(
        listen="127.0.0.1:0", extra_listen=[f"{host.server_address}:0"], data_dir=tmp_path / "data",
        worker_token=TOKEN, local_workers=0, local_fallback=False, model=model,
        # The product's 6 s: a worker busy syncing megabytes on a loaded machine is not lost
        # (the test that cuts the link asks for less, to see the loss soon).
        heartbeat_interval=0.3, heartbeat_timeout=6.0, no_worker_wait=5.0,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    server = CodelaneServer(config)
    await server.start()
    return server


def spawn_remote(host: TestHost, server: CodelaneServer, hide: Path, cache: Path, worker_id: str = "remote-1",
                 extra: tuple[str, ...] = ()):
    return host.spawn_worker(
        ["--connect", f"{host.server_address}:{server.ports[1]}", "--token", TOKEN, "--id", worker_id,
         "--slots", "4", "--cache-dir", str(cache), *extra],
        hide=hide,
    )


def finished(events) -> list:
    """The calls' ToolCallFinished, in model order (events come in completion order): exactly one
    per call the model asked for, and the turn's stream ends with its TurnFinished."""
    order = [c.call_id for e in events if kind(e) == "model_responded" for c in e.model_responded.tool_calls]
    done = [e.tool_call_finished for e in events if kind(e) == "tool_call_finished"]
    assert events and kind(events[-1]) == "turn_finished", [kind(e) for e in events]
    assert sorted(f.call_id for f in done) == sorted(order), [(kind(e), e.sequence) for e in events]
    return sorted(done, key=lambda f: order.index(f.call_id))


def make_workspace(ws: Path) -> None:
    (ws / "src").mkdir(parents=True)
    (ws / "src" / "main.py").write_text("def main():\n    return load_config()\n")
    (ws / "src" / "config.py").write_text("def load_config():\n    return {'debug': False}\n")
    (ws / "README.md").write_text("# project\nRun main.\n")


async def test_a_worker_on_another_host_cannot_stat_the_workspace_and_runs_every_query_call(
    test_host: TestHost, tmp_path: Path
) -> None:
    ws = tmp_path / "server" / "ws"
    make_workspace(ws)
    model = scripted(tmp_path, [
        {"tool_calls": [
            {"name": "read", "arguments": {"file_path": "src/main.py"}},
            {"name": "grep", "arguments": {"pattern": "load_config", "output_mode": "content"}},
            {"name": "glob", "arguments": {"pattern": "**/*.py"}},
            {"name": "list_files", "arguments": {}},
        ]},
        {"tool_calls": [
            {"name": "edit", "arguments": {"file_path": "src/config.py", "old_string": "False", "new_string": "True"}},
            {"name": "read", "arguments": {"file_path": f"{ws}/src/config.py"}},
            {"name": "bash", "arguments": {"command": "mkdir -p deep/er && echo fresh > deep/er/new.txt"}},
            {"name": "grep", "arguments": {"pattern": "fresh", "output_mode": "content"}},
        ]},
        {"text": "done"},
    ])
    server = await start_server(tmp_path, test_host, model)
    client = Client(f"127.0.0.1:{server.port}")
    try:
        worker = spawn_remote(test_host, server, hide=tmp_path / "server", cache=tmp_path / "cache")
        await client.wait_workers("remote-1")
        assert not test_host.sees(worker, ws), "the worker's host must not see the server's workspace"
        assert test_host.sees(worker, tmp_path)  # the control: stat itself works in there
        session = await client.create(ws)
        events = await client.send(session.session_id, "look around, then change things")
        results = {f.call_id: f for f in finished(events)}
        queries = [f for f in finished(events) if f.tool_name in QUERY_TOOLS]
        assert len(queries) == 6 and all(f.result.worker_id == "remote-1" for f in queries), queries
        assert not any(f.result.is_error for f in results.values()), [f.result.output for f in results.values()]
        outputs = [f.result.output for f in queries]
        assert "return load_config()" in outputs[0]
        assert "src/config.py:1:def load_config():" in outputs[1]
        assert set(outputs[2].splitlines()) == {"src/main.py", "src/config.py"}
        assert "'debug': True" in outputs[4]  # the read right after the edit sees it
        assert "deep/er/new.txt:1:fresh" in outputs[5]  # and the grep after bash sees bash's file
        listed = await client.admin.ListWorkers(admin_pb2.ListWorkersRequest())
        held = {w.workspace: w for w in listed.workers[0].workspaces}[str(ws)]
        current = await server.snapshots.of(str(ws)).current()
        assert held.mode == workspace_pb2.WORKSPACE_MODE_SYNCED and held.root_digest.hash == current.digest.hash
    finally:
        await client.close()
        await server.stop(grace=0.5)


# -- read-your-writes ----------------------------------------------------------------------------


def random_turns(seed: int, count: int) -> list[dict]:
    """`count` turns, each a response of changes (edit, write, bash) then lookups, and "ok"."""
    rng = random.Random(seed)
    files: dict[str, str] = {"a.txt": "alpha TOKEN0\n", "d/b.txt": "beta\n"}
    token = 1
    responses: list[dict] = []
    for _ in range(count):
        calls = []
        for _ in range(rng.randint(1, 3)):
            action = rng.choice(["write", "edit", "bash_append", "bash_new", "bash_rm", "bash_mv"])
            if action == "write" or not files:
                path = rng.choice([*files, f"d{rng.randint(0, 3)}/n{rng.randint(0, 20)}.txt"])
                files[path] = f"written TOKEN{token}\n"
                calls.append({"name": "write", "arguments": {"file_path": path, "content": files[path]}})
            elif action == "edit" and any("TOKEN" in text for text in files.values()):
                path = rng.choice([p for p, text in files.items() if "TOKEN" in text])
                old = files[path][files[path].index("TOKEN"):].split()[0]
                files[path] = files[path].replace(old, f"EDITED{token}", 1)
                calls.append({"name": "edit", "arguments": {"file_path": path, "old_string": old,
                                                            "new_string": f"EDITED{token}"}})
            elif action == "bash_append":
                path = rng.choice(list(files))
                files[path] += f"appended TOKEN{token}\n"
                calls.append({"name": "bash", "arguments": {"command": f"echo 'appended TOKEN{token}' >> {path}"}})
            elif action == "bash_new":
                path = f"deep/x{rng.randint(0, 5)}/y/z{rng.randint(0, 9)}.txt"
                files[path] = f"bash TOKEN{token}\n"
                calls.append({"name": "bash", "arguments": {
                    "command": f"mkdir -p {path.rsplit('/', 1)[0]} && echo 'bash TOKEN{token}' > {path}"}})
            elif action == "bash_rm" and len(files) > 2:
                path = rng.choice(list(files))
                del files[path]
                calls.append({"name": "bash", "arguments": {"command": f"rm {path}"}})
            elif action == "bash_mv" and len(files) > 1:
                source = rng.choice(list(files))
                target = f"moved/m{token}.txt"
                files[target] = files.pop(source)
                calls.append({"name": "bash", "arguments": {
                    "command": f"mkdir -p moved && mv {source} {target}"}})
            token += 1
        for _ in range(rng.randint(1, 4)):
            lookup = rng.choice(["read", "grep", "glob", "list_files", "search", "read_missing"])
            if lookup == "read" and files:
                calls.append({"name": "read", "arguments": {"file_path": rng.choice(list(files))}})
            elif lookup == "grep":
                calls.append({"name": "grep", "arguments": {"pattern": f"TOKEN{rng.randint(0, token)}|EDITED",
                                                            "output_mode": "content"}})
            elif lookup == "glob":
                calls.append({"name": "glob", "arguments": {"pattern": "**/*.txt"}})
            elif lookup == "list_files":
                calls.append({"name": "list_files", "arguments": {}})
            elif lookup == "search":
                calls.append({"name": "search", "arguments": {"query": f"token{rng.randint(0, token)} edited"}})
            else:
                calls.append({"name": "read", "arguments": {"file_path": f"gone{rng.randint(0, 3)}.txt"}})
        responses += [{"tool_calls": calls}, {"text": "ok"}]
    return responses


def normalized(finished_call) -> tuple[str, str, bool]:
    output = finished_call.result.output
    if finished_call.tool_name == "glob":
        # glob lists the newest first; two files written within one tick of the filesystem
        # clock tie differently from run to run. What must match is which files it sees.
        output = "\n".join(sorted(output.splitlines()))
    return finished_call.tool_name, output, finished_call.result.is_error


async def run_turns(tmp_path: Path, ws: Path, model: str, host: TestHost | None, turns: int) -> list:
    if host is None:
        server = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data-local",
                                             local_workers=0, model=model))
        await server.start()
    else:
        server = await start_server(tmp_path, host, model)
    client = Client(f"127.0.0.1:{server.port}")
    try:
        if host is not None:
            spawn_remote(host, server, hide=ws.parent, cache=tmp_path / "cache")
            await client.wait_workers("remote-1")
        session = await client.create(ws)
        outcome = []
        for turn in range(turns):
            events = await client.send(session.session_id, f"turn {turn}", within=60)
            calls = finished(events)
            expected = "remote-1" if host is not None else "local"
            for call in calls:
                if call.tool_name in QUERY_TOOLS:
                    assert call.result.worker_id == expected, (turn, call)
            outcome.append([normalized(c) for c in calls])
        return outcome
    finally:
        await client.close()
        await server.stop(grace=0.5)


async def test_read_your_writes_over_200_random_turns_synced_equals_in_process(
    test_host: TestHost, tmp_path: Path
) -> None:
    turns = 200
    model = scripted(tmp_path, random_turns(seed=14, count=turns))
    runs = {}
    for name, host in (("in_process", None), ("synced", test_host)):
        ws = tmp_path / name / "ws"
        ws.mkdir(parents=True)
        (ws / "d").mkdir()
        (ws / "a.txt").write_text("alpha TOKEN0\n")
        (ws / "d" / "b.txt").write_text("beta\n")
        runs[name] = await run_turns(tmp_path / name, ws, model, host, turns)
    stale = [
        (turn, a, b) for turn, (left, right) in enumerate(zip(runs["in_process"], runs["synced"], strict=True))
        for a, b in zip(left, right, strict=True) if a != b
    ]
    assert stale == [], f"{len(stale)} results differ, first: {stale[:3]}"
    errors = sum(1 for turn in runs["synced"] for tool, _, is_error in turn if is_error and tool != "read")
    assert errors == 0


# -- faults --------------------------------------------------------------------------------------


def big_workspace(ws: Path, files: int, size: int) -> None:
    rng = random.Random(7)
    for i in range(files):
        path = ws / f"d{i % 20}" / f"f{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    (ws / "marker.txt").write_text("the marker\n")


async def dispatch_read(server: CodelaneServer, ws: Path, file_path: str, deadline: float = 60.0):
    from session_server.pool import QueryCall
    from tool_worker.merkle import SnapshotRef

    current = await server.snapshots.of(str(ws)).current()
    return await server.pool.dispatch(QueryCall(
        session_id="s", call_id="c", tool_name="read", workspace=str(ws), timeout=deadline,
        arguments_json=json.dumps({"file_path": file_path}),
        snapshot=SnapshotRef(str(ws), current.digest, current.times_digest),
    ))


def holding(server: CodelaneServer, worker_id: str, ws: Path):
    worker = server.pool.worker(worker_id)
    return None if worker is None else worker.workspaces.get(str(ws))


async def test_the_link_going_down_mid_sync_never_leaves_a_partial_tree_in_use(
    test_host: TestHost, tmp_path: Path
) -> None:
    ws = tmp_path / "server" / "ws"
    big_workspace(ws, files=400, size=100_000)  # 40 MB: long enough to cut in the middle
    server = await start_server(tmp_path, test_host, model="", heartbeat_timeout=2.0)
    try:
        spawn_remote(test_host, server, hide=tmp_path / "server", cache=tmp_path / "cache")
        await wait_for(lambda: server.pool.worker("remote-1") is not None, what="the worker")
        call = asyncio.create_task(dispatch_read(server, ws, "marker.txt"))
        await wait_for(lambda: (h := holding(server, "remote-1", ws)) is not None and h.mode == "syncing",
                       what="the sync to start")
        test_host.link_down()
        # The hub loses the worker (heartbeat timeout); the call, idempotent, waits for a worker.
        await wait_for(lambda: server.pool.worker("remote-1") is None, within=20, what="the worker to be lost")
        test_host.link_up()
        result = await asyncio.wait_for(call, 60)
        # Either the retry completed on the reconnected worker, or the call ended with a clear error.
        assert (not result.is_error and "the marker" in result.output) or "worker" in result.output, result.output
        # In the second case the worker is still in its reconnection backoff (up to 10 s, past the
        # hub's 5 s wait for one): a call now would find no worker at all.
        await wait_for(lambda: server.pool.worker("remote-1") is not None, within=60, what="the worker to reconnect")
        again = await dispatch_read(server, ws, "d3/f3.bin")
        assert not again.is_error and again.worker_id == "remote-1" and "binary file (100000 bytes)" in again.output
        assert holding(server, "remote-1", ws).mode == "synced"
    finally:
        await server.stop(grace=0.5)


async def test_latency_and_loss_on_the_link_still_give_the_right_tree(test_host: TestHost, tmp_path: Path) -> None:
    reason = test_host.netem("delay 20ms 5ms loss 2%")
    if reason is not None:
        pytest.skip(reason)
    ws = tmp_path / "server" / "ws"
    big_workspace(ws, files=200, size=20_000)
    server = await start_server(tmp_path, test_host, model="")
    try:
        spawn_remote(test_host, server, hide=tmp_path / "server", cache=tmp_path / "cache")
        await wait_for(lambda: server.pool.worker("remote-1") is not None, within=30, what="the worker")
        result = await dispatch_read(server, ws, "marker.txt")
        assert not result.is_error and "the marker" in result.output
        (ws / "marker.txt").write_text("changed under latency\n")
        server.snapshots.of(str(ws)).changed()
        result = await dispatch_read(server, ws, "marker.txt")
        assert "changed under latency" in result.output
    finally:
        await server.stop(grace=0.5)


async def test_a_corrupted_blob_in_the_cache_is_refetched_never_used(test_host: TestHost, tmp_path: Path) -> None:
    ws = tmp_path / "server" / "ws"
    make_workspace(ws)
    server = await start_server(tmp_path, test_host, model="")
    cache = tmp_path / "cache"
    try:
        worker = spawn_remote(test_host, server, hide=tmp_path / "server", cache=cache)
        await wait_for(lambda: server.pool.worker("remote-1") is not None, what="the worker")
        original = (ws / "src" / "config.py").read_text()
        first = await dispatch_read(server, ws, "src/config.py")
        assert "load_config" in first.output
        # The tree moves on: the old version of config.py goes into the worker's blob store...
        (ws / "src" / "config.py").write_text("def load_config():\n    return {}\n")
        server.snapshots.of(str(ws)).changed()
        assert "return {}" in (await dispatch_read(server, ws, "src/config.py")).output
        blobs = list((cache / "workspaces" / "0" / "blobs").rglob("*"))  # the first worker takes slot 0
        stored = [b for b in blobs if b.is_file()]
        assert stored, "the replaced version is kept in the blob store"
        for blob in stored:  # ...where a bad disk flips its bytes
            blob.write_bytes(b"X" * blob.stat().st_size)
        # Going back to the first content needs that blob: it is found corrupt and fetched again.
        (ws / "src" / "config.py").write_text(original)
        server.snapshots.of(str(ws)).changed()
        back = await dispatch_read(server, ws, "src/config.py")
        assert not back.is_error and "'debug': False" in back.output and "XXXX" not in back.output
        worker.kill()
        worker.wait()
        log = worker.stderr.read().decode()
        assert "corrupt" in log and "fetched again" in log
    finally:
        await server.stop(grace=0.5)


async def test_a_full_cache_disk_is_a_clear_error_and_never_a_partial_tree(test_host: TestHost, tmp_path: Path) -> None:
    ws = tmp_path / "server" / "ws"
    big_workspace(ws, files=30, size=100_000)  # 3 MB into a 1 MB cache disk
    small = tmp_path / "small-cache"
    small.mkdir()
    server = await start_server(tmp_path, test_host, model="")
    try:
        test_host.spawn_worker(
            ["--connect", f"{test_host.server_address}:{server.ports[1]}", "--token", TOKEN, "--id", "remote-1",
             "--cache-dir", str(small)],
            hide=tmp_path / "server", tmpfs={small: "1m"},
        )
        await wait_for(lambda: server.pool.worker("remote-1") is not None, what="the worker")
        result = await dispatch_read(server, ws, "marker.txt")
        assert result.is_error and "cache disk is full" in result.output, result.output
        await wait_for(lambda: holding(server, "remote-1", ws).mode == "unavailable", what="the report")
        assert "full" in holding(server, "remote-1", ws).reason
        # Make room on the server side instead: a snapshot that fits syncs, and reads right.
        shutil.rmtree(ws)
        ws.mkdir()
        (ws / "marker.txt").write_text("small now\n")
        server.snapshots.of(str(ws)).changed()
        result = await dispatch_read(server, ws, "marker.txt")
        assert not result.is_error and "small now" in result.output
    finally:
        await server.stop(grace=0.5)


async def test_a_cache_disk_sized_for_cache_size_never_fills_with_old_versions(
    test_host: TestHost, tmp_path: Path
) -> None:
    # A 12 MiB disk under --cache-size 10MB: the old versions an edit moves into the blob store
    # took the room the next workspace needed, and since the store was trimmed only after a sync
    # that succeeded, every later sync hit the full disk. The store gets what the trees leave.
    a, b = tmp_path / "server" / "a", tmp_path / "server" / "b"
    big_workspace(a, files=5, size=1_000_000)
    big_workspace(b, files=4, size=1_000_000)
    small = tmp_path / "small-cache"
    small.mkdir()
    server = await start_server(tmp_path, test_host, model="")
    try:
        test_host.spawn_worker(
            ["--connect", f"{test_host.server_address}:{server.ports[1]}", "--token", TOKEN, "--id", "remote-1",
             "--cache-dir", str(small), "--cache-size", "10MB"],
            hide=tmp_path / "server", tmpfs={small: "12m"},
        )
        await wait_for(lambda: server.pool.worker("remote-1") is not None, what="the worker")
        result = await dispatch_read(server, a, "marker.txt")
        assert not result.is_error, result.output
        big_workspace(a, files=5, size=1_000_000)  # the same seed: marker and sizes alike, bytes not
        for path in a.rglob("*.bin"):
            path.write_bytes(bytes(reversed(path.read_bytes())))
        server.snapshots.of(str(a)).changed()
        result = await dispatch_read(server, a, "marker.txt")
        assert not result.is_error, result.output
        # 5 MB of a and 4 MB of b fit under 10 MB; the 5 MB of old versions do not beside them.
        result = await dispatch_read(server, b, "marker.txt")
        assert not result.is_error and "the marker" in result.output, result.output
        assert holding(server, "remote-1", b).mode == "synced"
    finally:
        await server.stop(grace=0.5)
