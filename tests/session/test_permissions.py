"""Permission policies end to end: confirmations approved, rejected and timed out, denied calls,
tools withheld from the model, ConfirmToolCall errors, cancellation while waiting, and the
policy shown back by GetSession (also after a restart).

A call to a tool the policy denies outright (a bare `deny` rule) gets a PERMISSION_DENIED result,
not UNKNOWN_TOOL: the tool exists, the policy withholds it, and the model should be told so. The
scripted model does not expose the tool list it received, so withholding is checked through that
result, whose text lists the tools offered.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from codelane.v1 import events_pb2, session_pb2, tools_pb2
from tests.session.conftest import Client, InProcess, call, kind, read_rest, read_until, rpc_error, scripted

DENIED = tools_pb2.ERROR_KIND_PERMISSION_DENIED


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _policy(**fields: Any) -> session_pb2.PermissionPolicy:
    if "confirmation_timeout" in fields:
        fields["confirmation_timeout"] = _duration(fields["confirmation_timeout"])
    return session_pb2.PermissionPolicy(**fields)


def _of_kind(events: list[events_pb2.Event], name: str) -> list[events_pb2.Event]:
    return [e for e in events if kind(e) == name]


async def _tool_results(client: Client, session_id: str) -> dict[str, tools_pb2.ToolResult]:
    history = await client.history(session_id)
    return {m.tool_call_id: m.tool_result for m in history if m.role == session_pb2.MESSAGE_ROLE_TOOL}


async def _bash_results(client: Client, workspace: Path, tmp_path: Path, commands: list[str],
                        policy: session_pb2.PermissionPolicy) -> list[tools_pb2.ToolResult]:
    """The results of `commands`, run as the bash calls of one model response in a session under
    `policy`, in their order."""
    model = scripted(tmp_path, [
        {"text": "", "tool_calls": [call("bash", f"c{i}", command=c) for i, c in enumerate(commands)]},
        {"text": "Done."},
    ])
    session = await client.create(workspace, model, permissions=policy)
    await client.send(session.session_id, "go")
    results = await _tool_results(client, session.session_id)
    return [results[f"c{i}"] for i in range(len(commands))]


async def _confirm(client: Client, session_id: str, call_id: str, approve: bool, reason: str = "") -> None:
    request = session_pb2.ConfirmToolCallRequest(session_id=session_id, call_id=call_id, approve=approve, reason=reason)
    await client.sessions.ConfirmToolCall(request, timeout=10)


async def _start_until_confirmation(
    client: Client, session_id: str
) -> tuple[Any, list[Any], events_pb2.Event]:
    stream = client.send_stream(session_id, "go")
    seen: list[Any] = []
    required = await read_until(stream, lambda r: kind(r.event) == "confirmation_required", seen)
    return stream, seen, required.event


WRITE_THEN_DONE = [
    {"text": "Writing.", "tool_calls": [call("write", "c_write", file_path="out.txt", content="hello\n")]},
    {"text": "Done."},
]


async def test_approved_confirmation_runs_the_call(client: Client, workspace: Path, tmp_path: Path) -> None:
    session = await client.create(
        workspace, scripted(tmp_path, WRITE_THEN_DONE), permissions=_policy(ask=["write(*.txt)"])
    )
    sent = time.time()
    stream, seen, required = await _start_until_confirmation(client, session.session_id)
    asked = time.time()
    asked_at = time.monotonic()
    assert required.confirmation_required.call.call_id == "c_write"
    assert required.confirmation_required.call.tool_name == "write"
    # The default confirmation timeout, 60 s, from when the server asked (the same clock as ours).
    deadline = required.confirmation_required.deadline.ToNanoseconds() / 1e9
    assert sent + 60 - 1e-6 <= deadline <= asked + 60 + 1e-6  # a float of epoch seconds holds microseconds
    assert not (workspace / "out.txt").exists()  # nothing runs before the answer

    answered_at = time.monotonic()
    await _confirm(client, session.session_id, "c_write", True, "looks fine")
    events = [r.event for r in seen + await read_rest(stream)]
    finished_at = time.monotonic()

    [resolved] = _of_kind(events, "confirmation_resolved")
    assert resolved.confirmation_resolved.outcome == events_pb2.CONFIRMATION_OUTCOME_APPROVED
    assert resolved.confirmation_resolved.reason == "looks fine"
    [finished] = _of_kind(events, "tool_call_finished")
    assert not finished.tool_call_finished.result.is_error
    # The wait for the confirmation is queue wait (it spans the time the question was
    # unanswered), not run time (which started after the answer).
    assert finished.tool_call_finished.queue_wait.ToNanoseconds() / 1e9 >= answered_at - asked_at
    assert finished.tool_call_finished.run_time.ToNanoseconds() / 1e9 <= finished_at - answered_at
    order = [kind(e) for e in events]
    assert order.index("confirmation_required") < order.index("confirmation_resolved") < order.index(
        "tool_call_started"
    )
    assert (workspace / "out.txt").read_text() == "hello\n"


async def test_rejected_confirmation_tells_the_model_why(client: Client, workspace: Path, tmp_path: Path) -> None:
    session = await client.create(workspace, scripted(tmp_path, WRITE_THEN_DONE), permissions=_policy(ask=["write"]))
    stream, seen, _ = await _start_until_confirmation(client, session.session_id)
    # A reason past its bound (it is copied into events, the history and the model's context) is
    # refused and answers nothing: the call still waits.
    error = await rpc_error(_confirm(client, session.session_id, "c_write", False, "x" * 16_385))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.metadata == {"field": "reason"}, error
    await _confirm(client, session.session_id, "c_write", False, "use notes/ instead")
    events = [r.event for r in seen + await read_rest(stream)]

    [resolved] = _of_kind(events, "confirmation_resolved")
    assert resolved.confirmation_resolved.outcome == events_pb2.CONFIRMATION_OUTCOME_REJECTED
    assert not _of_kind(events, "tool_call_started")
    result = (await _tool_results(client, session.session_id))["c_write"]
    assert result.is_error and result.error_kind == DENIED
    assert "use notes/ instead" in result.output
    assert "rule ask[0] `write`" in result.output
    assert not (workspace / "out.txt").exists()
    assert kind(events[-1]) == "turn_finished"
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_END_TURN


@pytest.mark.parametrize(
    ("timeout_action", "outcome", "runs"),
    [
        (session_pb2.PERMISSION_ACTION_UNSPECIFIED, events_pb2.CONFIRMATION_OUTCOME_TIMED_OUT_REJECTED, False),
        (session_pb2.PERMISSION_ACTION_DENY, events_pb2.CONFIRMATION_OUTCOME_TIMED_OUT_REJECTED, False),
        (session_pb2.PERMISSION_ACTION_ALLOW, events_pb2.CONFIRMATION_OUTCOME_TIMED_OUT_APPROVED, True),
    ],
    ids=["default-deny", "deny", "allow"],
)
async def test_confirmation_timeout_takes_the_timeout_action(
    client: Client, workspace: Path, tmp_path: Path, timeout_action: int, outcome: int, runs: bool
) -> None:
    policy = _policy(ask=["write"], confirmation_timeout=0.3, timeout_action=timeout_action)
    session = await client.create(workspace, scripted(tmp_path, WRITE_THEN_DONE), permissions=policy)
    started = time.monotonic()
    events = await client.send(session.session_id, "go")
    assert time.monotonic() - started >= 0.3

    [resolved] = _of_kind(events, "confirmation_resolved")
    assert resolved.confirmation_resolved.outcome == outcome
    assert "0.3s" in resolved.confirmation_resolved.reason
    [finished] = _of_kind(events, "tool_call_finished")
    assert finished.tool_call_finished.queue_wait.ToNanoseconds() >= 0.3e9
    result = finished.tool_call_finished.result
    if runs:
        assert not result.is_error
        assert (workspace / "out.txt").exists()
    else:
        assert result.error_kind == DENIED and "within 0.3s" in result.output
        assert not (workspace / "out.txt").exists()
    error = await rpc_error(_confirm(client, session.session_id, "c_write", True))
    assert error.code == grpc.StatusCode.NOT_FOUND


async def test_denied_calls_never_run(client: Client, workspace: Path, tmp_path: Path) -> None:
    calls = [
        call("bash", "c_rm", command="rm a.txt"),
        call("bash", "c_chain", command="echo hi > b.txt && rm a.txt"),
        call("bash", "c_ok", command="echo ok > c.txt"),
        call("read", "c_env", file_path="config/.env"),
    ]
    model = scripted(tmp_path, [{"text": "", "tool_calls": calls}, {"text": "Done."}])
    policy = _policy(deny=["bash(rm *)", "read(**/.env)"])
    session = await client.create(workspace, model, permissions=policy)
    events = await client.send(session.session_id, "go")

    results = await _tool_results(client, session.session_id)
    for call_id in ("c_rm", "c_chain", "c_env"):
        assert results[call_id].error_kind == DENIED, results[call_id]
        assert "permission policy denies this call" in results[call_id].output
    assert "deny[0] `bash(rm *)`" in results["c_rm"].output
    assert "deny[1] `read(**/.env)`" in results["c_env"].output
    assert not results["c_ok"].is_error
    assert (workspace / "a.txt").exists() and not (workspace / "b.txt").exists()
    assert (workspace / "c.txt").exists()
    started = {e.tool_call_started.call.call_id for e in _of_kind(events, "tool_call_started")}
    assert started == {"c_ok"}
    assert not _of_kind(events, "confirmation_required")


async def test_an_allow_rule_does_not_vouch_for_a_substitution_in_a_here_document(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    # bash expands the body of a here-document with an unquoted delimiter, and runs its
    # substitutions; the parser kept the body as text, so `bash(cat *)` vouched for the `rm`.
    commands = ["cat -n <<EOF\n$(rm a.txt)\nEOF", "cat -n <<EOF\n`rm a.txt`\nEOF"]
    policy = _policy(default_action=session_pb2.PERMISSION_ACTION_DENY, allow=["bash(cat *)"])
    results = await _bash_results(client, workspace, tmp_path, commands, policy)
    for command, result in zip(commands, results, strict=True):
        assert result.error_kind == DENIED, command
    assert (workspace / "a.txt").exists()


async def test_a_deny_rule_matches_a_substitution_inside_a_parameter_expansion(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    # The parser keeps `${x:-...}` as text: the `rm` its default runs was no piece of the line.
    commands = ["echo ${x:-$(rm a.txt)}", 'echo "${x:-`rm a.txt`}"', "echo ${x[$(rm a.txt)]}"]
    results = await _bash_results(client, workspace, tmp_path, commands, _policy(deny=["bash(rm *)"]))
    for command, result in zip(commands, results, strict=True):
        assert result.error_kind == DENIED, command
    assert (workspace / "a.txt").exists()


async def test_an_absolute_write_deny_inside_the_workspace_holds(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    (workspace / "secret").mkdir()
    model = scripted(tmp_path, [
        {"text": "", "tool_calls": [call("write", "c_rel", file_path="secret/planted", content="pwned\n"),
                                    call("write", "c_abs", file_path=str(workspace / "secret" / "planted2"),
                                         content="pwned\n")]},
        {"text": "Done."},
    ])
    session = await client.create(workspace, model, permissions=_policy(deny=[f"write({workspace}/secret/**)"]))
    await client.send(session.session_id, "go")
    results = await _tool_results(client, session.session_id)
    assert results["c_rel"].error_kind == DENIED and results["c_abs"].error_kind == DENIED
    assert not (workspace / "secret" / "planted").exists() and not (workspace / "secret" / "planted2").exists()


async def test_a_write_deny_holds_through_a_link_an_earlier_call_of_the_response_made(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    # Every call of a response was decided when the response came, before `ln` ran: out/key was
    # then no link, matched no rule, and the write and delete went through it into secret/.
    (workspace / "secret").mkdir()
    (workspace / "secret" / "key").write_text("ORIGINAL\n")
    model = scripted(tmp_path, [
        {"text": "", "tool_calls": [call("bash", "c_ln", command="ln -s secret out"),
                                    call("write", "c_w", file_path="out/key", content="pwned\n"),
                                    call("delete", "c_d", path="out/key")]},
        {"text": "Done."},
    ])
    session = await client.create(workspace, model, permissions=_policy(deny=["write(secret/**)"]))
    await client.send(session.session_id, "go")
    results = await _tool_results(client, session.session_id)
    assert not results["c_ln"].is_error
    for call_id in ("c_w", "c_d"):
        assert results[call_id].error_kind == DENIED, results[call_id]
        assert "deny[0] `write(secret/**)`" in results[call_id].output
    assert (workspace / "secret" / "key").read_text() == "ORIGINAL\n"


async def test_a_relative_allow_glob_vouches_for_no_path_outside_the_workspace(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    # `**` matches `..` and a leading `/` as well: `write(**/*.log)` vouched for ../x.log and
    # for an absolute path anywhere, where a relative glob names the workspace's paths.
    outside = tmp_path / "outside.log"
    model = scripted(tmp_path, [
        {"text": "", "tool_calls": [call("bash", "c_up", command="echo x > ../outside.log"),
                                    call("bash", "c_abs", command=f"echo x > {outside}"),
                                    call("bash", "c_in", command="echo x > in.log")]},
        {"text": "Done."},
    ])
    policy = _policy(default_action=session_pb2.PERMISSION_ACTION_DENY, allow=["bash(echo *)", "write(**/*.log)"])
    session = await client.create(workspace, model, permissions=policy)
    await client.send(session.session_id, "go")
    results = await _tool_results(client, session.session_id)
    assert results["c_up"].error_kind == DENIED and results["c_abs"].error_kind == DENIED
    assert not results["c_in"].is_error and (workspace / "in.log").exists()
    assert not outside.exists()


async def test_a_deny_of_a_directory_written_with_a_slash_holds(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    (workspace / "secret").mkdir()
    (workspace / "secret" / "key").write_text("TOP-SECRET-KEY\n")
    model = scripted(tmp_path, [
        {"text": "", "tool_calls": [call("read", "c_r", file_path="secret/key"),
                                    call("grep", "c_g", pattern="TOP-SECRET")]},
        {"text": "Done."},
    ])
    session = await client.create(workspace, model, permissions=_policy(deny=["read(secret/)"]))
    await client.send(session.session_id, "go")
    results = await _tool_results(client, session.session_id)
    assert results["c_r"].error_kind == DENIED
    assert "TOP-SECRET-KEY" not in results["c_r"].output and "TOP-SECRET-KEY" not in results["c_g"].output


@pytest.mark.parametrize("default_action", ["deny", "allow"])
async def test_a_glob_word_does_not_read_past_a_read_deny(
    client: Client, workspace: Path, tmp_path: Path, default_action: str
) -> None:
    # The README's allow list (a DENY default), and a deny list alone.
    (workspace / "secret").mkdir()
    (workspace / "secret" / "key").write_text("TOP-SECRET-KEY\n")
    commands = ["cat s*/key", "cat [s]ecret/key", "cat {s,}ecret/key", "grep -r . s*"]
    actions = {"deny": session_pb2.PERMISSION_ACTION_DENY, "allow": session_pb2.PERMISSION_ACTION_ALLOW}
    policy = _policy(default_action=actions[default_action], allow=["bash(cat *)", "bash(grep *)"],
                     deny=["read(secret/**)"])
    results = await _bash_results(client, workspace, tmp_path, commands, policy)
    for command, result in zip(commands, results, strict=True):
        assert "TOP-SECRET-KEY" not in result.output, command
        assert result.error_kind == DENIED, command


async def test_an_ansi_c_quoted_word_does_not_read_past_a_read_deny(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    # bash reads `$'secret/key'` as secret/key; the parser saw a parameter (`$secret/key`), a
    # value known only at run time, which no path rule matched.
    (workspace / "secret").mkdir()
    (workspace / "secret" / "key").write_text("TOP-SECRET-KEY\n")
    commands = ["cat $'secret/key'", "cat <$'secret/key'", "cat $'\\x73ecret'/key", "echo x >$'secret/key'"]
    policy = _policy(deny=["read(secret/**)", "write(secret/**)"])
    results = await _bash_results(client, workspace, tmp_path, commands, policy)
    for command, result in zip(commands, results, strict=True):
        assert "TOP-SECRET-KEY" not in result.output, command
        assert result.error_kind == DENIED, command
    assert (workspace / "secret" / "key").read_text() == "TOP-SECRET-KEY\n"


async def test_a_path_named_from_where_a_cd_leads_does_not_read_past_a_read_deny(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    # `../secret/key` after `cd src` is secret/key; it was matched as named, from the workspace
    # (a path outside it, which no rule named), and the README's allow list ran it.
    (workspace / "secret").mkdir()
    (workspace / "secret" / "key").write_text("TOP-SECRET-KEY\n")
    commands = ["cd src && cat ../secret/key", "cd src && cd .. && cat secret/key", "cd src && cat ../s*/key",
                "builtin cd src && cat ../secret/key"]
    policy = _policy(default_action=session_pb2.PERMISSION_ACTION_DENY, allow=["bash(cat *)", "bash(cd *)"],
                     deny=["read(secret/**)"])
    results = await _bash_results(client, workspace, tmp_path, commands, policy)
    for command, result in zip(commands, results, strict=True):
        assert "TOP-SECRET-KEY" not in result.output, command
        assert result.error_kind == DENIED, command


async def test_a_crafted_rule_on_a_crafted_path_does_not_hold_the_server(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    # Ten `**/` against a model's path of 60 components: about 60^10 tries for a backtracking
    # regex, on the server's event loop. The turn ends only because the rule is matched in time
    # linear in the path (tool_worker/tools/globs.py).
    deep = "/".join(["a"] * 60) + "/y"
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("read", "c_deep", file_path=deep)]},
                                {"text": "Done."}])
    session = await client.create(workspace, model, permissions=_policy(deny=["read(" + "**/" * 10 + "x)"]))
    events = await client.send(session.session_id, "go")
    assert kind(events[-1]) == "turn_finished"
    result = (await _tool_results(client, session.session_id))["c_deep"]
    assert result.is_error and result.error_kind != DENIED, result


async def test_tool_denied_outright_is_withheld_from_the_model(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    model = scripted(tmp_path, [{"text": "", "tool_calls": [call("bash", "c_bash", command="touch x")]}, {"text": "."}])
    session = await client.create(workspace, model, permissions=_policy(deny=["bash"]))
    await client.send(session.session_id, "go")
    result = (await _tool_results(client, session.session_id))["c_bash"]
    assert result.error_kind == DENIED
    assert "denies every bash call, so it is not offered" in result.output
    offered = result.output.split("available tools: ", 1)[1].split(", ")
    assert "bash" not in offered and "write" in offered and "read" in offered
    assert not (workspace / "x").exists()


async def test_deny_default_offers_only_named_tools(client: Client, workspace: Path, tmp_path: Path) -> None:
    calls = [call("read", "c_read", file_path="a.txt"), call("write", "c_write", file_path="w.txt", content="x")]
    model = scripted(tmp_path, [{"text": "", "tool_calls": calls}, {"text": "."}])
    policy = _policy(allow=["read"], default_action=session_pb2.PERMISSION_ACTION_DENY)
    session = await client.create(workspace, model, permissions=policy)
    await client.send(session.session_id, "go")
    results = await _tool_results(client, session.session_id)
    assert not results["c_read"].is_error
    assert results["c_write"].error_kind == DENIED
    assert results["c_write"].output.split("available tools: ", 1)[1] == "read"


async def test_confirm_unknown_call_is_not_found(client: Client, workspace: Path, tmp_path: Path) -> None:
    session = await client.create(workspace, scripted(tmp_path, [{"text": "hi"}]))
    error = await rpc_error(_confirm(client, session.session_id, "c_nope", True))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "CONFIRMATION_NOT_FOUND"
    assert error.metadata == {"session_id": session.session_id, "call_id": "c_nope"}

    error = await rpc_error(_confirm(client, "s_does_not_exist", "c_nope", True))
    assert error.code == grpc.StatusCode.NOT_FOUND and error.reason == "SESSION_NOT_FOUND"
    error = await rpc_error(_confirm(client, session.session_id, "", True))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.metadata == {"field": "call_id"}


async def test_cancel_while_waiting_ends_the_wait(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    server: InProcess = await make_server()
    client = server.client
    # The read of the file the write creates waits behind it.
    calls = [call("write", "c_write", file_path="out.txt", content="x"), call("read", "c_read", file_path="out.txt")]
    model = scripted(tmp_path, [{"text": "", "tool_calls": calls}, {"text": "."}])
    session = await client.create(workspace, model, permissions=_policy(ask=["write"]))
    stream, seen, _ = await _start_until_confirmation(client, session.session_id)
    assert server.server.sessions.confirmations.waiting(session.session_id) == ["c_write"]

    assert await client.cancel(session.session_id)
    events = [r.event for r in seen + await read_rest(stream)]
    assert events[-1].turn_finished.stop_reason == events_pb2.STOP_REASON_CANCELLED
    results = await _tool_results(client, session.session_id)
    assert results["c_write"].error_kind == tools_pb2.ERROR_KIND_CANCELLED
    assert "while waiting for its confirmation; it did not run" in results["c_write"].output
    # Every ConfirmationRequired ends with a ConfirmationResolved: here, CANCELLED, before the
    # call's result.
    [resolved] = _of_kind(events, "confirmation_resolved")
    assert resolved.confirmation_resolved.call_id == "c_write"
    assert resolved.confirmation_resolved.outcome == events_pb2.CONFIRMATION_OUTCOME_CANCELLED
    finished = {e.tool_call_finished.call_id: e.sequence for e in _of_kind(events, "tool_call_finished")}
    assert sorted(finished) == ["c_read", "c_write"] and resolved.sequence < finished["c_write"]
    assert results["c_read"].error_kind == tools_pb2.ERROR_KIND_CANCELLED  # it waited behind the write
    assert "before it started" in results["c_read"].output
    assert server.server.sessions.confirmations.waiting(session.session_id) == []
    error = await rpc_error(_confirm(client, session.session_id, "c_write", True))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert not (workspace / "out.txt").exists()


async def test_policy_is_shown_back_and_survives_a_restart(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    first: InProcess = await make_server()
    policy = _policy(
        allow=["bash(git *)"], deny=["delete"], ask=["write(src/**)"],
        default_action=session_pb2.PERMISSION_ACTION_ASK, confirmation_timeout=5.0,
        timeout_action=session_pb2.PERMISSION_ACTION_ALLOW,
    )
    session = await first.client.create(workspace, scripted(tmp_path, [{"text": "hi"}]), permissions=policy)
    assert session.config.permissions == policy
    assert (await first.client.get(session.session_id)).config.permissions == policy

    await first.server.stop(grace=0.5)
    second: InProcess = await make_server(data_dir=first.server.config.data_dir)
    assert (await second.client.get(session.session_id)).config.permissions == policy


async def test_default_policy_is_filled_in(client: Client, workspace: Path, tmp_path: Path) -> None:
    session = await client.create(workspace, scripted(tmp_path, [{"text": "hi"}]))
    policy = session.config.permissions
    assert list(policy.allow) == list(policy.deny) == list(policy.ask) == []
    assert policy.default_action == session_pb2.PERMISSION_ACTION_ALLOW
    assert policy.timeout_action == session_pb2.PERMISSION_ACTION_DENY
    assert policy.confirmation_timeout.seconds == 60


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (_policy(allow=["bash", "bash("]), "config.permissions.allow[1]"),
        (_policy(deny=["write()"]), "config.permissions.deny[0]"),
        (_policy(ask=["my_plugin(*)"]), "config.permissions.ask[0]"),
        (_policy(timeout_action=session_pb2.PERMISSION_ACTION_ASK), "config.permissions.timeout_action"),
        (_policy(confirmation_timeout=-1.0), "config.permissions.confirmation_timeout"),
        (_policy(default_action=9), "config.permissions.default_action"),
        # Path globs that parsed but failed when matched (re.error; RecursionError in the glob's
        # translation): every call the rule was checked on ended the turn with an INTERNAL error.
        (_policy(deny=["read(src/[z-a].py)"]), "config.permissions.deny[0]"),
        (_policy(allow=["bash", "write(" + "{" * 2000 + "a" + "}" * 2000 + ")"]), "config.permissions.allow[1]"),
        # Each rule is parsed on the event loop (about 2.5 us), at creation and again whenever
        # the session is read: 10 million fit in one request, about 25 s with every client waiting.
        (_policy(ask=["bash"] * 100_000), "config.permissions.ask"),
    ],
    ids=["bad-syntax", "empty-glob", "glob-on-plugin", "ask-on-timeout", "negative-timeout", "unknown-action",
         "bad-range-in-path-glob", "braces-nested-past-the-stack", "too-many-rules"],
)
async def test_bad_policy_is_invalid_naming_the_field(
    client: Client, workspace: Path, tmp_path: Path, policy: session_pb2.PermissionPolicy, field: str
) -> None:
    error = await rpc_error(client.create(workspace, scripted(tmp_path, [{"text": "hi"}]), permissions=policy))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata == {"field": field}
    assert field in error.message
    assert await client.count_sessions() == 0


async def test_approving_the_call_shown_never_runs_another_the_model_gave_its_id(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    # A model repeats a call id across two calls of one response: a read of a secret, then a
    # harmless one. Only the harmless one is approved, by the id it was shown with.
    (workspace / "secret.txt").write_text("TOP-SECRET\n")
    model = scripted(tmp_path, [
        {"text": "", "tool_calls": [call("read", "dup", file_path="secret.txt"),
                                    call("read", "dup", file_path="README.md")]},
        {"text": "Done."},
    ])
    session = await client.create(workspace, model, permissions=session_pb2.PermissionPolicy(ask=["read"]))
    stream = client.send_stream(session.session_id, "go")
    seen: list[Any] = []
    shown: dict[str, str] = {}
    while len(shown) < 2:
        item = await read_until(stream, lambda r: kind(r.event) == "confirmation_required", seen)
        shown[item.event.confirmation_required.call.arguments_json] = item.event.confirmation_required.call.call_id
    assert len(set(shown.values())) == 2, shown  # the repeated id was replaced by one of the server's
    readme = next(call_id for arguments, call_id in shown.items() if "README" in arguments)
    await client.sessions.ConfirmToolCall(
        session_pb2.ConfirmToolCallRequest(session_id=session.session_id, call_id=readme, approve=True), timeout=10)
    await read_until(stream, lambda r: kind(r.event) == "tool_call_finished", seen)
    await client.cancel(session.session_id)
    events = [r.event for r in seen + await read_rest(stream)]
    finished = {e.tool_call_finished.call_id: e.tool_call_finished.result
                for e in _of_kind(events, "tool_call_finished")}
    assert "demo" in finished[readme].output and not finished[readme].is_error
    assert not any("TOP-SECRET" in result.output for result in finished.values())
