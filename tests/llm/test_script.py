from __future__ import annotations

import json
from pathlib import Path

import pytest

from session_server.llm.base import ChatMessage, ModelToolCall
from session_server.llm.script import Script, ScriptError


def write(tmp_path: Path, text: str, name: str = "script.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loads_yaml_with_generated_and_given_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
responses:
  - text: "Looking around."
    tool_calls:
      - {name: grep, arguments: {pattern: "def ", path: "."}}
      - {name: read, id: my_id, arguments_raw: '{"file_path": '}
  - text: "Done."
""",
    )
    script = Script.load(path)
    first, second = script.responses
    assert first.text == "Looking around."
    assert first.tool_calls == (
        ModelToolCall("call_0_0", "grep", json.dumps({"pattern": "def ", "path": "."})),
        ModelToolCall("my_id", "read", '{"file_path": '),
    )
    assert second.text == "Done." and second.tool_calls == ()


def test_loads_json(tmp_path: Path) -> None:
    data = {"responses": [{"tool_calls": [{"name": "ls"}]}]}
    script = Script.load(write(tmp_path, json.dumps(data), "s.json"))
    assert script.responses[0].text == ""
    assert script.responses[0].tool_calls[0].arguments_json == "{}"


def test_response_chosen_by_assistant_count_then_exhausted(tmp_path: Path) -> None:
    script = Script.from_data({"responses": [{"text": "one"}, {"text": "two"}]})
    user = ChatMessage("user", "hi")
    assistant = ChatMessage("assistant", "x")
    assert script.response_for([user]).text == "one"
    assert script.response_for([user, assistant, ChatMessage("tool", "r"), user]).text == "two"
    exhausted = script.response_for([user, assistant, user, assistant, user])
    assert "exhausted" in exhausted.text and exhausted.tool_calls == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "expected a mapping"),
        ("- a\n- b\n", "expected a mapping"),
        ("responses: 3\n", "'responses' must be a list"),
        ("responses: []\nextra: 1\n", "1 unknown key at the top level"),
        ("responses: [7]\n", "responses[0]: expected a mapping"),
        ("responses: [{text: 5}]\n", "responses[0].text: expected a string"),
        ("responses: [{txt: hi}]\n", "responses[0]: 1 unknown key; allowed: ['text', 'tool_calls']"),
        ("responses: [{text: a}, {tool_calls: {name: x}}]\n", "responses[1].tool_calls: expected a list"),
        (
            "responses: [{tool_calls: [{arguments: {}}]}]\n",
            "responses[0].tool_calls[0].name: expected a non-empty",
        ),
        (
            "responses: [{tool_calls: [{name: x, arguments: [1]}]}]\n",
            "tool_calls[0].arguments: expected a mapping",
        ),
        (
            "responses: [{tool_calls: [{name: x, arguments_raw: 3}]}]\n",
            "tool_calls[0].arguments_raw: expected a str",
        ),
        ("responses: [{tool_calls: [{name: x, arguments: {}, arguments_raw: '{}'}]}]\n", "not both"),
        ("responses: [{tool_calls: [{name: x, id: ''}]}]\n", "tool_calls[0].id: expected a non-empty string"),
        ("responses: [{text: 'unclosed\n", "not valid YAML"),
    ],
)
def test_errors_name_the_entry_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ScriptError) as error:
        Script.load(path)
    assert expected in str(error.value)
    assert str(path) in str(error.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScriptError, match="script file not found"):
        Script.load(tmp_path / "nope.yaml")
