"""Permission policies without a server: rule syntax, subjects per tool, glob semantics, precedence,
which tools are offered, persistence, and the settings validation that names the bad field."""

from __future__ import annotations

import json

import pytest

from session_server.config import (
    InvalidArgument,
    LaneMode,
    PermissionsRequest,
    SessionSettings,
    SettingsRequest,
    build_policy,
    build_settings,
)
from session_server.permissions import Action, PermissionPolicy, PolicyError, Rule

WS = "/work/ws"


def decide(policy: PermissionPolicy, tool: str, **arguments) -> Action:
    return policy.decide(tool, arguments, WS).action


# -- rule syntax -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tool", "glob"),
    [
        ("bash", "bash", None),
        ("  bash  ", "bash", None),
        ("bash(git *)", "bash", "git *"),
        ("bash(echo (hi))", "bash", "echo (hi)"),
        ("write(src/**)", "write", "src/**"),
        ("write(src/)", "write", "src/**"),  # a directory: it and everything in it
        ("read(./a/../b//c/**/)", "read", "b/c/**"),
        ("read(./)", "read", "**"),
        ("read(/work/ws/../ws/secret/)", "read", "/work/ws/secret/**"),
        ("my_plugin", "my_plugin", None),
    ],
)
def test_rule_parses(text: str, tool: str, glob: str | None) -> None:
    rule = Rule.parse(text, "allow[0]")
    assert (rule.tool, rule.glob, rule.source) == (tool, glob, "allow[0]")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "is not a rule"),
        ("bash(", "is not a rule"),
        ("bash(git *) now", "is not a rule"),
        ("9bash", "is not a rule"),
        ("bash()", "empty glob"),
        ("bash(  )", "empty glob"),
        ("my_plugin(x*)", "no argument a glob can match"),
    ],
)
def test_bad_rule_is_refused_by_its_field(text: str, says: str) -> None:
    with pytest.raises(PolicyError, match=says) as caught:
        PermissionPolicy.parse(allow=["bash"], deny=["read", text])
    assert caught.value.field == "deny[1]"


def test_timeout_action_must_be_allow_or_deny() -> None:
    with pytest.raises(PolicyError) as caught:
        PermissionPolicy.parse(timeout_action="ask")
    assert caught.value.field == "timeout_action"
    with pytest.raises(PolicyError) as caught:
        PermissionPolicy.parse(default_action="maybe")
    assert caught.value.field == "default_action"


# -- subjects and globs ------------------------------------------------------------------------


def test_default_policy_allows_everything() -> None:
    policy = PermissionPolicy()
    assert policy.allows_everything
    assert decide(policy, "bash", command="rm -rf /") is Action.ALLOW
    assert policy.offers("bash")


def test_command_star_matches_anything_including_slashes() -> None:
    policy = PermissionPolicy.parse(deny=["bash(cat /etc/*)"], default_action="ask")
    assert decide(policy, "bash", command="cat /etc/ssl/certs/x.pem") is Action.DENY
    assert decide(policy, "bash", command="cat ./etc/x") is Action.ASK


def test_allow_covers_a_compound_command_only_when_every_segment_is_allowed() -> None:
    policy = PermissionPolicy.parse(allow=["bash(git *)", "bash(ls*)"], default_action="ask")
    assert decide(policy, "bash", command="git status") is Action.ALLOW
    assert decide(policy, "bash", command="git status && ls -la") is Action.ALLOW
    assert decide(policy, "bash", command="git status && rm -rf build") is Action.ASK
    assert decide(policy, "bash", command="git status; rm -rf build") is Action.ASK
    assert decide(policy, "bash", command="git log | sh") is Action.ASK
    assert decide(policy, "bash", command="git log\nrm x") is Action.ASK
    # A substituted command cannot be vouched for by a glob.
    assert decide(policy, "bash", command="git log $(rm -rf build)") is Action.ASK
    assert decide(policy, "bash", command="git log `rm -rf build`") is Action.ASK


def test_deny_matches_any_segment_of_a_command() -> None:
    policy = PermissionPolicy.parse(allow=["bash"], deny=["bash(rm *)"])
    assert decide(policy, "bash", command="ls && rm -rf build") is Action.DENY
    assert decide(policy, "bash", command="ls || rm x") is Action.DENY
    assert decide(policy, "bash", command="ls; echo rm") is Action.ALLOW


@pytest.mark.parametrize("line", [
    "time rm a", "time -p rm a", "command rm a", "builtin rm a", "exec rm a", "exec -a x rm a", "nohup rm a",
    "env rm a", "env -i FOO=1 rm a", "env -u HOME rm a", "/usr/bin/env rm a", "nice -n 5 rm a", "nice -5 rm a",
    "timeout 5 rm a", "timeout -s KILL 5s rm a", "env nice time rm a", "sudo=1 time rm a",
])
def test_deny_sees_the_command_a_wrapper_runs(line: str) -> None:
    # Spelled with `time` (shell syntax) or a program that runs the rest, rm ran under deny bash(rm *).
    policy = PermissionPolicy.parse(deny=["bash(rm *)"], ask=["bash(git push *)"])
    assert decide(policy, "bash", command=line) is Action.DENY
    assert decide(policy, "bash", command=line.replace("rm a", "git push origin")) is Action.ASK
    assert decide(policy, "bash", command=line.replace("rm a", "ls a")) is Action.ALLOW


def test_execute_argv_is_matched_as_a_command_line() -> None:
    policy = PermissionPolicy.parse(allow=["execute(pytest *)"], default_action="deny")
    assert decide(policy, "execute", argv=["pytest", "-q", "tests/a b.py"]) is Action.ALLOW
    assert decide(policy, "execute", argv=["python", "-c", "1"]) is Action.DENY


def test_path_star_stays_in_a_segment_and_double_star_crosses() -> None:
    policy = PermissionPolicy.parse(allow=["write(src/*.py)", "edit(src/**)"], default_action="deny")
    assert decide(policy, "write", file_path="src/a.py") is Action.ALLOW
    assert decide(policy, "write", file_path="src/pkg/a.py") is Action.DENY
    assert decide(policy, "edit", file_path="src/pkg/deep/a.py") is Action.ALLOW
    assert decide(policy, "edit", file_path="src") is Action.ALLOW  # `src/**` covers the directory itself
    assert decide(policy, "edit", file_path="srcx/a.py") is Action.DENY


def test_double_star_slash_matches_zero_or_more_directories() -> None:
    policy = PermissionPolicy.parse(deny=["read(**/*.env)", "read(secrets/**/key)"])
    assert decide(policy, "read", file_path=".env") is Action.DENY
    assert decide(policy, "read", file_path="deploy/prod/.env") is Action.DENY
    assert decide(policy, "read", file_path="secrets/key") is Action.DENY
    assert decide(policy, "read", file_path="secrets/a/b/key") is Action.DENY
    assert decide(policy, "read", file_path="env.txt") is Action.ALLOW


def test_paths_are_normalised_before_matching() -> None:
    policy = PermissionPolicy.parse(deny=["write(secrets/**)"], allow=["write(./src/**)"], default_action="ask")
    assert decide(policy, "write", file_path="src/../secrets/k") is Action.DENY
    assert decide(policy, "write", file_path="./secrets//k") is Action.DENY
    assert decide(policy, "write", file_path=f"{WS}/secrets/k") is Action.DENY
    assert decide(policy, "write", file_path=f"{WS}/src/a.py") is Action.ALLOW
    assert decide(policy, "write", file_path="/elsewhere/src/a.py") is Action.ASK


def test_absolute_rule_matches_paths_outside_the_workspace() -> None:
    policy = PermissionPolicy.parse(deny=["read(/etc/**)"])
    assert decide(policy, "read", file_path="/etc/passwd") is Action.DENY
    assert decide(policy, "read", file_path="etc/passwd") is Action.ALLOW


def test_move_and_copy_check_both_paths() -> None:
    policy = PermissionPolicy.parse(allow=["move(src/**)", "copy(src/**)"], deny=["move(secrets/**)"],
                                    default_action="ask")
    assert decide(policy, "move", source="src/a", destination="src/b") is Action.ALLOW
    assert decide(policy, "move", source="src/a", destination="lib/b") is Action.ASK
    assert decide(policy, "move", source="src/a", destination="secrets/b") is Action.DENY
    assert decide(policy, "copy", source="lib/a", destination="src/b") is Action.ASK


@pytest.mark.parametrize(
    ("tool", "arguments", "rule"),
    [
        ("read", {"file_path": "docs/a.md"}, "read(docs/**)"),
        ("read", {"path": "docs/a.md"}, "read(docs/**)"),
        ("edit", {"file_path": "docs/a.md", "old_string": "a", "new_string": "b"}, "edit(docs/*)"),
        ("delete", {"path": "docs/a.md"}, "delete(docs/*.md)"),
        ("ls", {}, "ls(.)"),
        ("list_files", {"path": "docs"}, "list_files(docs)"),
        ("grep", {"pattern": "password", "path": "src"}, "grep(*pass*)"),
        ("glob", {"pattern": "**/*.py"}, "glob(**/*.py)"),
        ("search", {"query": "retry policy"}, "search(retry *)"),
    ],
)
def test_subject_table(tool: str, arguments: dict, rule: str) -> None:
    policy = PermissionPolicy.parse(deny=[rule])
    assert policy.decide(tool, arguments, WS).action is Action.DENY


def test_glob_rules_never_match_a_call_without_its_argument() -> None:
    policy = PermissionPolicy.parse(deny=["write(**)"], default_action="ask")
    assert decide(policy, "write", content="x") is Action.ASK


# -- precedence --------------------------------------------------------------------------------


def test_deny_beats_allow_beats_ask_beats_default() -> None:
    policy = PermissionPolicy.parse(
        allow=["bash(git *)", "bash(make *)"], deny=["bash(git push*)"], ask=["bash(git *)", "bash(npm *)"],
        default_action="deny",
    )
    assert decide(policy, "bash", command="git push origin main") is Action.DENY
    assert decide(policy, "bash", command="git status") is Action.ALLOW  # allow beats ask
    assert decide(policy, "bash", command="npm install") is Action.ASK
    assert decide(policy, "bash", command="curl x") is Action.DENY  # default


def test_decision_names_the_rule() -> None:
    policy = PermissionPolicy.parse(allow=["read"], deny=["bash(rm *)"])
    decision = policy.decide("bash", {"command": "rm -rf x"}, WS)
    assert decision.rule is not None and decision.rule.source == "deny[0]"
    assert decision.describe() == "rule deny[0] `bash(rm *)`"
    assert policy.decide("write", {"file_path": "a"}, WS).describe() == "the policy's default action is allow"


def test_rules_apply_only_to_their_tool() -> None:
    policy = PermissionPolicy.parse(deny=["bash"])
    assert decide(policy, "bash", command="ls") is Action.DENY
    assert decide(policy, "execute", argv=["ls"]) is Action.ALLOW


# -- offered tools ----------------------------------------------------------------------------


def test_tools_denied_outright_are_not_offered() -> None:
    policy = PermissionPolicy.parse(deny=["bash", "write(secrets/**)"])
    assert not policy.offers("bash")
    assert policy.offers("write")  # only some writes are denied
    assert policy.offers("read")


def test_with_a_deny_default_only_tools_named_by_allow_or_ask_are_offered() -> None:
    policy = PermissionPolicy.parse(allow=["read"], ask=["bash(git *)"], deny=["read"], default_action="deny")
    assert not policy.offers("read")  # deny beats allow
    assert policy.offers("bash")
    assert not policy.offers("write")


# -- settings ---------------------------------------------------------------------------------


def test_policy_survives_the_settings_round_trip() -> None:
    request = PermissionsRequest(
        allow=["bash(git *)"], deny=["delete"], ask=["write(src/**)"], default_action="ask",
        confirmation_timeout=5.0, timeout_action="allow",
    )
    settings = SessionSettings(model="scripted:x", permissions=build_policy(request), execute_mode=LaneMode.EXTERNAL,
                               query_mode=LaneMode.HYBRID, external_task_timeout=42.0)
    stored = json.loads(json.dumps(settings.to_dict()))
    back = SessionSettings.from_dict(stored)
    assert back == settings
    assert back.permissions.timeout_action is Action.ALLOW
    assert back.execute_mode is LaneMode.EXTERNAL
    assert stored["permissions"]["deny"] == ["delete"]


def test_settings_written_before_policies_existed_still_load() -> None:
    settings = SessionSettings.from_dict({"model": "scripted:x", "max_turns": 3})
    assert settings.permissions.allows_everything
    assert settings.execute_mode is LaneMode.INTERNAL


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (PermissionsRequest(allow=["bash", "bash("]), "config.permissions.allow[1]"),
        (PermissionsRequest(deny=["x()"]), "config.permissions.deny[0]"),
        (PermissionsRequest(ask=["read", "write", "nope(*)"]), "config.permissions.ask[2]"),
        (PermissionsRequest(timeout_action="ask"), "config.permissions.timeout_action"),
        (PermissionsRequest(default_action="7"), "config.permissions.default_action"),
        (PermissionsRequest(confirmation_timeout=0.0), "config.permissions.confirmation_timeout"),
        (PermissionsRequest(confirmation_timeout=90_000.0), "config.permissions.confirmation_timeout"),
    ],
)
def test_build_settings_names_the_bad_permission_field(request_: PermissionsRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        build_settings(SettingsRequest(model="openai:gpt-4o-mini", permissions=request_), "")
    assert caught.value.field == field


def test_external_task_timeout_is_bounded() -> None:
    with pytest.raises(InvalidArgument) as caught:
        build_settings(SettingsRequest(model="openai:gpt-4o-mini", external_task_timeout=-1.0), "")
    assert caught.value.field == "config.queue.external_task_timeout"
    settings = build_settings(SettingsRequest(model="openai:gpt-4o-mini"), "")
    assert settings.external_task_timeout == 600.0
    assert settings.permissions.confirmation_timeout == 60.0
    assert settings.permissions.timeout_action is Action.DENY
    assert settings.permissions.default_action is Action.ALLOW
