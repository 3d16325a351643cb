"""A model script: the responses a scripted model (in-process or the mock HTTP server) replays.

The response for a request is chosen by how many assistant messages its history already holds,
so one script serves any number of sessions at once without state. Format (YAML or JSON):

    responses:
      - text: "Looking around."
        tool_calls:
          - {name: grep, arguments: {pattern: "def ", path: "."}}
          - {name: read, arguments_raw: '{"file_path": '}   # invalid JSON, on purpose
      - text: "Done."
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from session_server.llm.base import ChatMessage, ModelToolCall

_RESPONSE_KEYS = {"text", "tool_calls"}
_CALL_KEYS = {"name", "arguments", "arguments_raw", "id"}


class ScriptError(ValueError):
    """The script file is missing or malformed; the message names the file, entry and field."""


@dataclass(frozen=True)
class ScriptedResponse:
    text: str
    tool_calls: tuple[ModelToolCall, ...] = ()


@dataclass(frozen=True)
class Script:
    responses: tuple[ScriptedResponse, ...]
    source: str = "<script>"

    @classmethod
    def load(cls, path: str | Path) -> Script:
        """Read a YAML (or JSON) script file."""
        path = Path(path)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ScriptError(f"script file not found: {path}") from None
        except OSError as exc:
            raise ScriptError(f"cannot read script file {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ScriptError(f"{path}: not valid YAML or JSON: {exc}") from None
        return cls.from_data(data, source=str(path))

    @classmethod
    def from_data(cls, data: Any, source: str = "<script>") -> Script:
        """Build a script from already-parsed data (the same shape as the file)."""
        if not isinstance(data, Mapping):
            raise ScriptError(f"{source}: expected a mapping with a 'responses' list, got {_kind(data)}")
        unknown = set(data) - {"responses"}
        if unknown:
            raise ScriptError(
                f"{source}: unknown top-level keys {sorted(map(str, unknown))}; only 'responses' is allowed"
            )
        entries = data.get("responses")
        if not isinstance(entries, list):
            raise ScriptError(f"{source}: 'responses' must be a list, got {_kind(entries)}")
        responses = tuple(_parse_response(entry, step, source) for step, entry in enumerate(entries))
        return cls(responses, source)

    def response_at(self, step: int) -> ScriptedResponse:
        """The response for the request that follows `step` assistant messages."""
        if step < len(self.responses):
            return self.responses[step]
        return ScriptedResponse(
            f"The script is exhausted: it has {len(self.responses)} responses and this is request {step + 1}."
        )

    def response_for(self, messages: Sequence[ChatMessage]) -> ScriptedResponse:
        """The response for a request with this history."""
        return self.response_at(sum(1 for m in messages if m.role == "assistant"))


def estimate_tokens(text: str) -> int:
    """A deterministic token count (about four characters a token), for scripted usage."""
    return math.ceil(len(text) / 4)


def split_words(text: str) -> list[str]:
    """Split text into word-sized pieces (trailing whitespace kept) that join back to `text`."""
    return re.findall(r"\s*\S+\s*|\s+", text)


def _parse_response(entry: Any, step: int, source: str) -> ScriptedResponse:
    where = f"{source}: responses[{step}]"
    if not isinstance(entry, Mapping):
        raise ScriptError(f"{where}: expected a mapping with 'text' and/or 'tool_calls', got {_kind(entry)}")
    _reject_unknown(entry, _RESPONSE_KEYS, where)
    text = entry.get("text", "")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ScriptError(f"{where}.text: expected a string, got {_kind(text)}")
    calls = entry.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ScriptError(f"{where}.tool_calls: expected a list, got {_kind(calls)}")
    return ScriptedResponse(
        text,
        tuple(
            _parse_call(call, step, index, f"{where}.tool_calls[{index}]") for index, call in enumerate(calls)
        ),
    )


def _parse_call(call: Any, step: int, index: int, where: str) -> ModelToolCall:
    if not isinstance(call, Mapping):
        raise ScriptError(f"{where}: expected a mapping with 'name' and 'arguments', got {_kind(call)}")
    _reject_unknown(call, _CALL_KEYS, where)
    name = call.get("name")
    if not isinstance(name, str) or not name:
        raise ScriptError(f"{where}.name: expected a non-empty string, got {_kind(name)}")
    if "arguments" in call and "arguments_raw" in call:
        raise ScriptError(f"{where}: give either 'arguments' or 'arguments_raw', not both")
    if "arguments_raw" in call:
        arguments = call["arguments_raw"]
        if not isinstance(arguments, str):
            raise ScriptError(f"{where}.arguments_raw: expected a string, got {_kind(arguments)}")
    else:
        value = call.get("arguments") or {}
        if not isinstance(value, Mapping):
            raise ScriptError(f"{where}.arguments: expected a mapping, got {_kind(value)}")
        arguments = json.dumps(value)
    call_id = call.get("id", f"call_{step}_{index}")
    if not isinstance(call_id, str) or not call_id:
        raise ScriptError(f"{where}.id: expected a non-empty string, got {_kind(call_id)}")
    return ModelToolCall(call_id, name, arguments)


def _reject_unknown(entry: Mapping[Any, Any], allowed: set[str], where: str) -> None:
    unknown = set(entry) - allowed
    if unknown:
        raise ScriptError(f"{where}: unknown keys {sorted(map(str, unknown))}; allowed: {sorted(allowed)}")


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]
