"""The escape suite: model-issued bash calls that try to leave the sandbox, through a real server.

Each attempt must be denied with a result that says so, and leave nothing behind. The same
commands on a server started with `--sandbox off --allow-unsandboxed` succeed: the sandbox, not
the test's setup, is what stops them.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from codelane.v1 import tools_pb2
from tests.polling import poll_until
from tests.sandbox.conftest import FAKE_OPENAI_KEY, Host, Listener, bash
from tests.session.conftest import Processes, kind, scripted


def _attempts(host: Host, port: int) -> list[dict[str, Any]]:
    outside = host.outside
    return [
        bash("write_absolute", f"echo pwned > {outside}/absolute.txt"),
        bash("write_dotdot", f"echo pwned > {os.path.relpath(outside, host.workspace)}/dotdot.txt"),
        bash("write_symlink", f"ln -s {outside} escape-link && echo pwned > escape-link/symlink.txt"),
        bash("write_after_cd_root", f"cd / && echo pwned > {outside.relative_to('/')}/cd-root.txt"),
        bash("git_hook", "printf '#!/bin/sh\\necho pwned\\n' > .git/hooks/pre-commit"),
        bash("git_config", "echo '[core] hooksPath = /tmp' >> .git/config"),
        bash("read_data_dir", f"head -c 15 {host.data_dir}/codelane.db"),
        bash("read_denied_file", f"cat {host.secret}"),
        bash("server_secret", "env; printenv OPENAI_API_KEY"),
        bash("connect_localhost", f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"),
        # As root, the kernel's files need no capability, only the owner's write bit: a core
        # pattern piped to a workspace script ran it as the host's root, outside every namespace.
        # (The probe writes back the value it read; `test -w` writes nothing.)
        bash("kernel_files", "for f in /proc/sys/kernel/hostname /proc/sysrq-trigger /proc/sys/vm/drop_caches; do "
                             "test -w $f && echo writable: $f; done; "
                             "cat /proc/sys/kernel/core_pattern > /proc/sys/kernel/core_pattern"),
        # git would take its config and hooks from the directory this names: planted, then run by
        # the user's next git command, on the host.
        bash("git_commondir", "echo ../planted > .git/commondir && echo written"),
        # Last: a .git of the command's choosing in place of the repository's.
        bash("git_dir_replaced", "mv .git .git-old && mkdir .git && echo replaced"),
    ]


_WRITES = {
    "write_absolute": "absolute.txt",
    "write_dotdot": "dotdot.txt",
    "write_symlink": "symlink.txt",
    "write_after_cd_root": "cd-root.txt",
}


async def test_escapes_are_denied(start_host: Any, listener: Listener, tmp_path: Path) -> None:
    host: Host = await start_host()
    results = await host.run(tmp_path, _attempts(host, listener.port))
    for call_id, result in results.items():
        assert result.is_error, f"{call_id} was not denied: {result.output}"
        assert json.loads(result.metadata_json)["sandbox"] == "workspace-write", call_id

    for call_id, name in _WRITES.items():
        assert "Read-only file system" in results[call_id].output, (call_id, results[call_id].output)
        assert not (host.outside / name).exists(), call_id
    assert "Read-only file system" in results["git_hook"].output
    assert not (host.workspace / ".git" / "hooks" / "pre-commit").exists()
    assert "Read-only file system" in results["git_config"].output
    assert (host.workspace / ".git" / "config").read_text() == "[core]\n"

    assert "Permission denied" in results["read_data_dir"].output
    assert "SQLite" not in results["read_data_dir"].output
    assert "Permission denied" in results["read_denied_file"].output
    assert host.secret_text not in results["read_denied_file"].output

    env = results["server_secret"].output
    assert FAKE_OPENAI_KEY not in env and "OPENAI_API_KEY" not in env
    assert "PATH=" in env and "HOME=" in env  # a built environment, not an empty one

    assert "connected" not in results["connect_localhost"].output
    assert "writable:" not in results["kernel_files"].output, results["kernel_files"].output
    assert listener.accepted == 0

    commondir = results["git_commondir"]
    assert commondir.error_kind == tools_pb2.ERROR_KIND_PERMISSION_DENIED, commondir
    assert "written" in commondir.output and ".git/commondir removed" in commondir.output
    assert not (host.workspace / ".git" / "commondir").exists()
    assert "Device or resource busy" in results["git_dir_replaced"].output
    assert (host.workspace / ".git" / "config").read_text() == "[core]\n" and not (host.workspace / ".git-old").exists()


async def test_the_same_commands_succeed_without_the_sandbox(
    start_host: Any, listener: Listener, tmp_path: Path
) -> None:
    host: Host = await start_host(off=True)
    results = await host.run(tmp_path, _attempts(host, listener.port))
    for call_id, result in results.items():
        assert not result.is_error, f"{call_id} failed without a sandbox: {result.output}"
        # Every result of an unconfined call says so.
        assert json.loads(result.metadata_json)["sandbox"] == "off", call_id

    for name in _WRITES.values():
        assert (host.outside / name).read_text() == "pwned\n", name
    moved = host.workspace / ".git-old"  # the last attempt moved the repository's .git here
    assert (moved / "hooks" / "pre-commit").exists()
    assert "hooksPath" in (moved / "config").read_text()
    assert results["read_data_dir"].output.startswith("SQLite format 3")
    assert host.secret_text in results["read_denied_file"].output
    assert FAKE_OPENAI_KEY in results["server_secret"].output
    assert "connected" in results["connect_localhost"].output
    assert listener.accepted == 1
    assert (moved / "commondir").read_text() == "../planted\n"
    assert results["git_dir_replaced"].output == "replaced"


async def test_read_only_mode_denies_workspace_writes_and_file_tools(start_host: Any, tmp_path: Path) -> None:
    host: Host = await start_host()
    calls = [
        bash("write_in_workspace", "echo changed > README.md"),
        bash("write_private_tmp", "echo scratch > /tmp/scratch && cat /tmp/scratch"),
        {"name": "write", "id": "write_tool", "arguments": {"file_path": "new.txt", "content": "x"}},
    ]
    from codelane.v1 import session_pb2

    read_only = session_pb2.SandboxPolicy(mode=session_pb2.SANDBOX_MODE_READ_ONLY)
    results = await host.run(tmp_path, calls, sandbox=read_only)
    assert "Read-only file system" in results["write_in_workspace"].output
    assert (host.workspace / "README.md").read_text() == "# workspace\n"
    assert not results["write_private_tmp"].is_error and results["write_private_tmp"].output == "scratch"
    assert results["write_tool"].error_kind == tools_pb2.ERROR_KIND_PERMISSION_DENIED
    assert "read-only" in results["write_tool"].output and not (host.workspace / "new.txt").exists()


async def test_file_tools_refuse_protected_paths(start_host: Any, tmp_path: Path) -> None:
    host: Host = await start_host(args=("--sandbox-protect", "deploy/*.key"))
    (host.workspace / "deploy").mkdir()
    (host.workspace / "deploy" / "prod.key").write_text("key\n")
    calls = [
        {"name": "write", "id": "hook", "arguments": {"file_path": ".git/hooks/pre-commit", "content": "x"}},
        {"name": "edit", "id": "config", "arguments": {"file_path": ".git/config", "old_string": "[core]",
                                                        "new_string": "[core]\n\thooksPath = /tmp"}},
        {"name": "delete", "id": "git_dir", "arguments": {"path": ".git", "recursive": True}},
        {"name": "move", "id": "away", "arguments": {"source": ".git/hooks", "destination": "hooks-old"}},
        {"name": "copy", "id": "over", "arguments": {"source": "README.md", "destination": ".git/config",
                                                      "overwrite": True}},
        {"name": "write", "id": "operator", "arguments": {"file_path": "deploy/prod.key", "content": "x"}},
        {"name": "write", "id": "allowed", "arguments": {"file_path": ".git/info-note", "content": "fine"}},
        {"name": "write", "id": "new_submodule", "arguments": {"file_path": ".git/modules/lib/hooks/post-checkout",
                                                               "content": "x"}},
        {"name": "write", "id": "commondir", "arguments": {"file_path": ".git/commondir", "content": "../planted"}},
    ]
    results = await host.run(tmp_path, calls)
    for call_id in ("hook", "config", "git_dir", "away", "over", "operator", "new_submodule", "commondir"):
        assert results[call_id].error_kind == tools_pb2.ERROR_KIND_PERMISSION_DENIED, (call_id, results[call_id])
        assert "protected" in results[call_id].output, call_id
    assert not results["allowed"].is_error
    assert not (host.workspace / ".git" / "hooks" / "pre-commit").exists()
    assert (host.workspace / ".git" / "config").read_text() == "[core]\n"
    assert (host.workspace / ".git" / "hooks").is_dir() and not (host.workspace / "hooks-old").exists()
    assert (host.workspace / "deploy" / "prod.key").read_text() == "key\n"
    assert not (host.workspace / ".git" / "commondir").exists()


async def test_a_repository_one_call_makes_is_protected_in_the_next(start_host: Any, tmp_path: Path) -> None:
    # The next call's sandbox is built once the previous call has ended, so it sees the new .git.
    host: Host = await start_host()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    model_calls = [bash("init", "git init -q && ls .git/hooks | head -1"),
                   bash("hook", "echo 'echo pwned' > .git/hooks/pre-commit"),
                   # What is in .git stays the command's to change (commits), not .git itself.
                   bash("commit", "git -c user.name=a -c user.email=a@b commit -q --allow-empty -m x && "
                                  "git log --oneline | wc -l"),
                   bash("remove", "rm -rf .git")]
    from tests.session.conftest import kind, scripted

    model = scripted(tmp_path, [{"text": "Init.", "tool_calls": model_calls[:1]},
                                {"text": "Hook.", "tool_calls": model_calls[1:]}, {"text": "Done."}], name="git.yaml")
    session = await host.client.create(fresh, model)
    events = await host.client.send(session.session_id, "go", within=60)
    results = {e.tool_call_finished.call_id: e.tool_call_finished.result for e in events
               if kind(e) == "tool_call_finished"}
    assert not results["init"].is_error, results["init"]
    assert "Read-only file system" in results["hook"].output
    assert not (fresh / ".git" / "hooks" / "pre-commit").exists()
    assert results["commit"].output == "1", results["commit"]
    assert "Device or resource busy" in results["remove"].output
    assert (fresh / ".git" / "config").exists() and (fresh / ".git" / "hooks").is_dir()


async def test_what_appears_between_two_calls_is_covered_in_the_second(start_host: Any, tmp_path: Path) -> None:
    # A session's next sandbox is built as soon as a call ends, and waits for the next call: a
    # denied file or a repository made in the meantime (by the user, hours later) was neither
    # hidden nor protected in it, where a sandbox built at the call's start covered both.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    host: Host = await start_host(args=("--sandbox-deny-read", str(fresh / "later.key")))
    model = scripted(tmp_path, [
        {"text": "First.", "tool_calls": [bash("first", "echo first")]}, {"text": "Done."},
        {"text": "Second.", "tool_calls": [bash("read", "cat later.key"),
                                           bash("hook", "echo 'echo pwned' > .git/hooks/pre-commit")]},
        {"text": "Done."},
    ], name="between.yaml")
    session = await host.client.create(fresh, model)
    events = await host.client.send(session.session_id, "go", within=60)
    assert kind(events[-1]) == "turn_finished"
    (fresh / "later.key").write_text(host.secret_text)
    (fresh / ".git" / "hooks").mkdir(parents=True)  # as `git init` leaves it
    (fresh / ".git" / "config").write_text("[core]\n")
    events = await host.client.send(session.session_id, "again", within=60)
    results = {e.tool_call_finished.call_id: e.tool_call_finished.result for e in events
               if kind(e) == "tool_call_finished"}
    assert host.secret_text not in results["read"].output and "Permission denied" in results["read"].output
    assert "Read-only file system" in results["hook"].output, results["hook"]
    assert not (fresh / ".git" / "hooks" / "pre-commit").exists()


def _sandbox_waiting_in(directory: Path) -> bool:
    """Whether a sandbox's shell waits for its command's argv in `directory`."""
    for entry in os.scandir("/proc"):
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if b"mapfile" in f.read() and os.readlink(f"/proc/{entry.name}/cwd") == str(directory):
                    return True
        except OSError:
            continue
    return False


async def test_a_workspace_made_anew_between_two_calls_is_the_one_the_second_sees(
    start_host: Any, tmp_path: Path
) -> None:
    # The sandbox built ahead bound the directory there was: removed and made again (a fresh
    # clone), the next command ran in the removed one, saw none of its files and wrote nowhere.
    host: Host = await start_host()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    model = scripted(tmp_path, [
        {"text": "First.", "tool_calls": [bash("first", "echo first")]}, {"text": "Done."},
        {"text": "Second.", "tool_calls": [bash("second", "cat new.txt && echo made > made.txt")]}, {"text": "Done."},
    ], name="anew.yaml")
    session = await host.client.create(fresh, model)
    events = await host.client.send(session.session_id, "go", within=60)
    assert kind(events[-1]) == "turn_finished"
    await poll_until(lambda: _sandbox_waiting_in(fresh), what="the next call's sandbox to be built")
    shutil.rmtree(fresh)
    fresh.mkdir()
    (fresh / "new.txt").write_text("new\n")
    events = await host.client.send(session.session_id, "again", within=60)
    results = {e.tool_call_finished.call_id: e.tool_call_finished.result for e in events
               if kind(e) == "tool_call_finished"}
    assert results["second"].output == "new" and not results["second"].is_error, results["second"]
    assert (fresh / "made.txt").read_text() == "made\n"


async def test_a_git_dir_made_anew_between_two_calls_is_protected_in_the_second(
    start_host: Any, tmp_path: Path
) -> None:
    # Removed on the host, .git lost its mounts in the sandbox waiting for the next call, and the
    # .git made in its place could take the freed inode (same identity): its hooks were writable.
    host: Host = await start_host()
    git = host.workspace / ".git"
    model = scripted(tmp_path, [
        {"text": "First.", "tool_calls": [bash("first", "echo first")]}, {"text": "Done."},
        {"text": "Second.", "tool_calls": [bash("hook", "echo 'echo pwned' > .git/hooks/pre-commit")]},
        {"text": "Done."},
    ], name="git-anew.yaml")
    session = await host.client.create(host.workspace, model)
    events = await host.client.send(session.session_id, "go", within=60)
    assert kind(events[-1]) == "turn_finished"
    await poll_until(lambda: _sandbox_waiting_in(host.workspace), what="the next call's sandbox to be built")
    shutil.rmtree(git)
    (git / "hooks").mkdir(parents=True)
    (git / "config").write_text("[core]\n")
    events = await host.client.send(session.session_id, "again", within=60)
    results = {e.tool_call_finished.call_id: e.tool_call_finished.result for e in events
               if kind(e) == "tool_call_finished"}
    assert "Read-only file system" in results["hook"].output, results["hook"]
    assert not (git / "hooks" / "pre-commit").exists()


async def test_a_submodules_git_dir_cannot_be_redirected_either(start_host: Any, tmp_path: Path) -> None:
    # git status recurses into submodules, and reads each one's commondir as it reads the
    # repository's: a planted .git/modules/lib/commondir ran its fsmonitor on the host.
    host: Host = await start_host()
    module = host.workspace / ".git" / "modules" / "lib"
    (module / "hooks").mkdir(parents=True)
    (module / "config").write_text("[core]\n")
    calls = [
        bash("command", "echo ../../../planted > .git/modules/lib/commondir && echo written"),
        {"name": "write", "id": "tool", "arguments": {"file_path": ".git/modules/lib/config.worktree",
                                                       "content": "[core]\n\tfsmonitor = evil\n"}},
    ]
    results = await host.run(tmp_path, calls)
    assert results["command"].error_kind == tools_pb2.ERROR_KIND_PERMISSION_DENIED, results["command"]
    assert ".git/modules/lib/commondir removed" in results["command"].output
    assert results["tool"].error_kind == tools_pb2.ERROR_KIND_PERMISSION_DENIED, results["tool"]
    assert not (module / "commondir").exists() and not (module / "config.worktree").exists()


async def test_a_denied_or_protected_path_does_not_move_with_a_directory_above_it(
    start_host: Any, tmp_path: Path
) -> None:
    # Mounts hide a denied path and guard a protected one, and renaming a directory above a mount
    # point takes the mount along: after `mv deploy d2` the credentials lay at d2/, where the deny
    # list, which names paths, no longer reached them (the next command and read printed them).
    host: Host = await start_host(args=("--sandbox-deny-read", str(tmp_path / "ws-0" / "deploy" / "keys" / "prod.key")))
    keys = host.workspace / "deploy" / "keys"
    keys.mkdir(parents=True)
    (keys / "prod.key").write_text(host.secret_text)
    module = host.workspace / ".git" / "modules" / "lib"
    (module / "hooks").mkdir(parents=True)
    (module / "config").write_text("[core]\n")
    calls = [
        bash("parent", "mv deploy/keys k2 && echo moved"),
        bash("grandparent", "mv deploy d2 && echo moved"),
        bash("modules", "mv .git/modules .git/m2 && echo moved"),
        bash("read", "cat d2/keys/prod.key k2/prod.key deploy/keys/prod.key"),
        {"name": "read", "id": "tool", "arguments": {"file_path": "d2/keys/prod.key"}},
    ]
    results = await host.run(tmp_path, calls)
    for name in ("parent", "grandparent", "modules"):
        # A mount point is not renamed (EBUSY, or EXDEV and mv's copy, which the stand-in stops).
        assert results[name].is_error and "moved" not in results[name].output, results[name]
    for name in ("read", "tool"):
        assert host.secret_text not in results[name].output, results[name]
    assert (keys / "prod.key").exists() and (module / "config").exists()


async def test_the_codelane_clients_own_credentials_are_denied(processes: Processes, tmp_path: Path) -> None:
    # ~/.ssh, ~/.aws and ~/.config/gcloud were denied, but not the config file of codelane's own
    # CLI, whose profiles hold the tokens of the servers its user talks to (this one among them).
    home = Path.home() / ".cache" / "codelane-sandbox-tests" / uuid.uuid4().hex  # outside /tmp
    config = home / ".config" / "codelane" / "config.toml"
    config.parent.mkdir(parents=True)
    token = f"token-{uuid.uuid4().hex}"
    config.write_text(f'[profiles.prod]\nserver = "codelane.internal:50051"\ntoken = "{token}"\n')
    workspace = tmp_path / "ws"
    workspace.mkdir()
    try:
        server = await processes.start_server(tmp_path / "data", local_workers=0, env={"HOME": str(home)})
        assert server.client is not None
        model = scripted(tmp_path, [{"tool_calls": [bash("cat", f"cat {config}")]}, {"text": "Done."}])
        session = await server.client.create(workspace, model)
        events = await server.client.send(session.session_id, "go", within=60)
        [result] = [e.tool_call_finished.result for e in events if kind(e) == "tool_call_finished"]
        assert result.is_error and token not in result.output, result
        assert "Permission denied" in result.output, result
    finally:
        shutil.rmtree(home, ignore_errors=True)
