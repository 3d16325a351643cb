"""A client must not reach the server's files: scripts, workspaces, and what error texts quote."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from codelane.v1 import session_pb2
from session_server.config import MAX_SYSTEM_PROMPT_CHARS
from session_server.llm.factory import MAX_CACHED_SCRIPTS
from session_server.llm.script import Script
from session_server.mock_llm.server import start_mock_llm
from tests.session.conftest import RPC_TIMEOUT, call, kind, read_rest, read_until, rpc_error, scripted

SECRET = "hunter2-do-not-leak"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A file of the server's that no client should see: outside every directory it allows."""
    elsewhere = tmp_path.parent / f"{tmp_path.name}-server-secrets"
    elsewhere.mkdir()
    path = elsewhere / ".env"
    path.write_text(f"API_KEY={SECRET}\n")
    return path


async def test_a_client_cannot_name_a_server_file_as_its_script(make_server, workspace, secret_file) -> None:
    client = (await make_server()).client
    for target in (secret_file, "/etc/passwd", "/dev/zero"):
        error = await rpc_error(client.create(workspace, f"scripted:{target}"))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.metadata["field"] == "config.model"
        assert "outside the directories this server allows scripts from" in error.message
        assert SECRET not in error.message and "root:" not in error.message


async def test_without_scripts_dirs_clients_name_no_script_at_all(make_server, workspace, tmp_path) -> None:
    client = (await make_server(scripts_dirs=[])).client
    error = await rpc_error(client.create(workspace, scripted(tmp_path, [{"text": "hi"}])))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "--scripts-dir" in error.message


async def test_a_script_error_never_quotes_the_file(make_server, workspace, tmp_path) -> None:
    client = (await make_server()).client
    for name, content in [("a.yaml", f"{SECRET}\n"), ("b.yaml", f"{SECRET}: [\n"), ("c.yaml", f"{SECRET}: 1\n"),
                          ("d.yaml", f"responses: [{{{SECRET}: x}}]\n")]:
        (tmp_path / name).write_text(content)
        error = await rpc_error(client.create(workspace, f"scripted:{tmp_path / name}"))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert SECRET not in error.message, error.message


async def test_a_fifo_script_is_refused_without_blocking_the_server(make_server, workspace, tmp_path) -> None:
    client = (await make_server()).client
    os.mkfifo(tmp_path / "fifo.yaml")
    # Nothing ever writes to the FIFO: an open that waited for a writer would never return.
    error = await rpc_error(client.create(workspace, f"scripted:{tmp_path / 'fifo.yaml'}"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "not a regular file" in error.message
    assert await client.count_sessions() == 0  # and the server still answers


async def test_the_script_cache_and_the_providers_stay_bounded(make_server, workspace, tmp_path, monkeypatch) -> None:
    server = await make_server()
    for i in range(MAX_CACHED_SCRIPTS + 8):
        await server.client.create(workspace, scripted(tmp_path, [{"text": "hi"}], name=f"s{i}.yaml"))
    assert len(server.server.sessions.models.scripts) <= MAX_CACHED_SCRIPTS

    runner, url = await start_mock_llm(Script.from_data({"responses": [{"text": "hi"}]}))
    monkeypatch.setenv("OPENAI_BASE_URL", f"{url}/v1")
    try:
        for i in range(20):
            session = await server.client.create(workspace, f"openai:model-{i}")
            events = await server.client.send(session.session_id, "hi")
            assert kind(events[-1]) == "turn_finished"
    finally:
        await runner.cleanup()
    # One HTTP client serves every model name of its provider.
    assert server.server.sessions.models.provider_count() <= 2


async def test_sessions_open_only_workspaces_under_the_roots(make_server, tmp_path) -> None:
    root = tmp_path / "allowed"
    (root / "project").mkdir(parents=True)
    os.symlink("/etc", root / "project" / "etc-link")
    client = (await make_server(workspace_roots=[root])).client
    model = scripted(tmp_path, [{"text": "hi"}])
    assert (await client.create(root / "project", model)).workspace == str((root / "project").resolve())
    for outside in ("/etc", str(root / "project" / "etc-link"), str(root / ".." / "data-0"), str(tmp_path)):
        error = await rpc_error(client.create(outside, model))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.metadata["field"] == "workspace"
        assert "--workspace-root" in error.message


async def test_a_session_outside_the_new_roots_runs_no_more_turns(make_server, tmp_path, workspace) -> None:
    first = await make_server()
    session = await first.client.create(workspace, scripted(tmp_path, [{"text": "hi"}]))
    await first.client.close()
    await first.server.stop(grace=0.5)
    narrowed = await make_server(data_dir=first.server.config.data_dir, workspace_roots=[tmp_path / "elsewhere"])
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    error = await rpc_error(narrowed.client.send(session.session_id, "hello"))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "WORKSPACE_NOT_ALLOWED"


async def test_the_data_directory_is_no_sessions_workspace(make_server, tmp_path) -> None:
    # It holds every session's history: tools keep out of it inside a workspace, but a workspace
    # in it would have handed them the store.
    server = await make_server()
    data_dir = server.server.config.data_dir
    (data_dir / "inside").mkdir()
    os.symlink(data_dir, tmp_path / "link-to-data")
    model = scripted(tmp_path, [{"text": "hi"}])
    for refused in (data_dir, data_dir / "inside", tmp_path / "link-to-data"):
        error = await rpc_error(server.client.create(refused, model))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.metadata["field"] == "workspace"
        assert "data directory" in error.message
    assert await server.client.count_sessions() == 0


async def test_a_session_whose_workspace_became_the_data_directorys_runs_no_more_turns(make_server, tmp_path) -> None:
    project = tmp_path / "outer" / "project"
    project.mkdir(parents=True)
    first = await make_server()
    session = await first.client.create(project, scripted(tmp_path, [{"text": "hi"}]))
    await first.client.close()
    await first.server.stop(grace=0.5)
    for stored in first.server.config.data_dir.iterdir():
        if stored.name.startswith("codelane.db"):
            stored.rename(tmp_path / "outer" / stored.name)
    moved = await make_server(data_dir=tmp_path / "outer")
    error = await rpc_error(moved.client.send(session.session_id, "hello"))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "WORKSPACE_NOT_ALLOWED"
    assert "data directory" in error.message


def _replace_with_link(directory: Path, target: Path) -> None:
    """What a command of a session on the directory above does (mv project old; ln -s TARGET project)."""
    directory.rename(directory.with_name(directory.name + "-old"))
    os.symlink(target, directory)


@pytest.mark.parametrize("target, named", [
    (lambda server: server.config.data_dir, "data directory"),
    # The server's own /proc entry: its environment holds its keys. Refused as a new session
    # there is.
    (lambda server: Path(f"/proc/{os.getpid()}"), "/proc"),
], ids=["data-dir", "proc"])
async def test_a_workspace_replaced_by_a_link_to_what_no_session_works_in_runs_no_more_turns(
    make_server, tmp_path, target, named
) -> None:
    # Another session, on the directory above, may swap the workspace for a symlink: the session's
    # tools and commands would then have had the store, read and write (no --workspace-root here).
    project = tmp_path / "outer" / "project"
    project.mkdir(parents=True)
    server = await make_server()
    model = scripted(tmp_path, [{"tool_calls": [call("list_files", "c_list", path=".")]}, {"text": "done"}])
    session = await server.client.create(project, model)
    _replace_with_link(project, target(server.server))
    error = await rpc_error(server.client.send(session.session_id, "hello"))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "WORKSPACE_NOT_ALLOWED"
    assert named in error.message


async def test_a_workspace_replaced_during_a_turn_is_not_worked_in(make_server, tmp_path) -> None:
    # The swap comes while the turn waits (here for a confirmation; a model's answer would do):
    # the calls after it must not run in what the workspace's path now leads to.
    project = tmp_path / "outer" / "project"
    project.mkdir(parents=True)
    server = await make_server()
    model = scripted(tmp_path, [{"tool_calls": [call("list_files", "c_list", path=".")]}, {"text": "done"}])
    session = await server.client.create(
        project, model, permissions=session_pb2.PermissionPolicy(ask=["list_files"])
    )
    stream = server.client.send_stream(session.session_id, "go")
    seen: list = []
    await read_until(stream, lambda r: kind(r.event) == "confirmation_required", seen)
    _replace_with_link(project, server.server.config.data_dir)
    confirm = session_pb2.ConfirmToolCallRequest(session_id=session.session_id, call_id="c_list", approve=True)
    await server.client.sessions.ConfirmToolCall(confirm, timeout=RPC_TIMEOUT)
    events = [r.event for r in seen + await read_rest(stream)]
    [finished] = [e.tool_call_finished for e in events if kind(e) == "tool_call_finished"]
    assert finished.result.is_error and "codelane.db" not in finished.result.output, finished.result
    assert "no longer" in finished.result.output


async def test_a_huge_prompt_is_refused_and_changes_nothing(client, workspace, tmp_path) -> None:
    session = await client.create(workspace, scripted(tmp_path, [{"text": "hi"}]))
    error = await rpc_error(client.send(session.session_id, "x" * (2 * 1024 * 1024)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.metadata["field"] == "text"
    assert "at most" in error.message
    assert (await client.get(session.session_id)).last_sequence == 0
    request = session_pb2.GetMessagesRequest(session_id=session.session_id)
    assert not (await client.sessions.GetMessages(request, timeout=RPC_TIMEOUT)).messages


async def test_bulky_sessions_are_refused_and_listing_stays_possible(client, workspace, tmp_path) -> None:
    # Two sessions with a 34 MiB system prompt each made every ListSessions fail (the page went
    # over gRPC's 64 MiB limit), for every client; one just under 64 MiB was stored although its
    # CreateSession failed (the echoed session did not fit).
    model = scripted(tmp_path, [{"text": "hi"}])
    honest = await client.create(workspace, model)
    bulky = {
        "config.system_prompt": {"system_prompt": "p" * (MAX_SYSTEM_PROMPT_CHARS + 1)},
        "config": {"permissions": session_pb2.PermissionPolicy(deny=[f"read({i}{'a' * 1100})" for i in range(1000)])},
    }
    attempts = {field: client.create(workspace, model, **config) for field, config in bulky.items()}
    attempts["labels"] = client.sessions.CreateSession(session_pb2.CreateSessionRequest(
        workspace=str(workspace), config=session_pb2.SessionConfig(model=model),
        labels={f"k{i}": "v" * 1000 for i in range(70)}), timeout=RPC_TIMEOUT)
    for field, attempt in attempts.items():
        error = await rpc_error(attempt)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.metadata == {"field": field}, error
        assert "at most" in error.message
    assert await client.count_sessions() == 1
    listed = await client.sessions.ListSessions(session_pb2.ListSessionsRequest(), timeout=RPC_TIMEOUT)
    assert [s.session_id for s in listed.sessions] == [honest.session_id]


async def test_what_a_client_sent_is_quoted_cut_in_errors(client, workspace, tmp_path) -> None:
    # A status travels in trailers: one quoting a 20,000-character token or id went past what
    # clients accept and ended with RESOURCE_EXHAUSTED instead of its own code.
    session = await client.create(workspace, scripted(tmp_path, [{"text": "hi"}]))
    sessions = client.sessions
    attempts = {
        "messages_long_token": (sessions.GetMessages(session_pb2.GetMessagesRequest(
            session_id=session.session_id, page_token="x" * 20_000), timeout=RPC_TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT),
        "messages_huge_offset": (sessions.GetMessages(session_pb2.GetMessagesRequest(
            session_id=session.session_id, page_token="9" * 25), timeout=RPC_TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT),
        "list_long_token": (sessions.ListSessions(session_pb2.ListSessionsRequest(page_token="x" * 20_000),
                                                  timeout=RPC_TIMEOUT), grpc.StatusCode.INVALID_ARGUMENT),
        "get_long_id": (sessions.GetSession(session_pb2.GetSessionRequest(session_id="s" * 20_000),
                                            timeout=RPC_TIMEOUT), grpc.StatusCode.NOT_FOUND),
    }
    for name, (attempt, code) in attempts.items():
        error = await rpc_error(attempt)
        assert error.code == code, (name, error)
        assert len(error.message.encode()) <= 1024, (name, error.message)
        # A bad ListSessions token is quoted by its start only (session_server.paging), so nothing is cut.
        assert ("bytes cut" in error.message) == (name in ("messages_long_token", "get_long_id")), (name, error.message)
        assert all(len(value) <= 128 for value in error.metadata.values()), name
