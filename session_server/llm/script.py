"""A model script: the responses a scripted model (in-process or the mock HTTP server) replays.

The response for a request is chosen by how many assistant messages its history already holds,
so one script serves any number of sessions at once without state. Format (YAML or JSON):

    responses:
      - text: "Looking around."
        tool_calls:
          - {name: grep, arguments: {pattern: "def ", path: "."}}
          - {name: read, arguments_raw: '{"file_path": '}   # invalid JSON, on purpose
      - text: "Done."

Errors name the file, the entry and the field, and never quote what the file holds: a client that
names a file as a script must learn nothing of its content from the answer.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from session_server.llm.base import ChatMessage, ModelToolCall

# A script is a test fixture or a benchmark, not a corpus: a bigger file is refused unread.
MAX_SCRIPT_BYTES = 16 * 1024 * 1024
# O_NONBLOCK: opening a FIFO must not wait for a writer; it changes nothing for a regular file.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)

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
        """Read a YAML (or JSON) script file (a regular file of at most MAX_SCRIPT_BYTES)."""
        with open_script(path) as handle:
            return cls.parse(read_script(handle, path), str(path))

    @classmethod
    def parse(cls, raw: bytes, source: str) -> Script:
        """A script from the bytes of its file; `source` names it in errors."""
        try:
            data = yaml.safe_load(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ScriptError(f"{source}: not UTF-8 text") from None
        except yaml.MarkedYAMLError as exc:
            # The position only: the parser's own message quotes the offending text.
            mark = exc.problem_mark
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ScriptError(f"{source}: not valid YAML or JSON{where}") from None
        except yaml.YAMLError:
            raise ScriptError(f"{source}: not valid YAML or JSON") from None
        return cls.from_data(data, source=source)

    @classmethod
    def from_data(cls, data: Any, source: str = "<script>") -> Script:
        """Build a script from already-parsed data (the same shape as the file)."""
        if not isinstance(data, Mapping):
            raise ScriptError(f"{source}: expected a mapping with a 'responses' list, got {_kind(data)}")
        unknown = set(data) - {"responses"}
        if unknown:
            raise ScriptError(f"{source}: {_keys(unknown)} at the top level; only 'responses' is allowed")
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


def open_script(path: str | Path):
    """Opens a script file for reading without ever blocking: only a regular file will do.

    Raises ScriptError saying what is wrong (missing, unreadable, a FIFO or a device, a
    directory); the caller reads it with `read_script`.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise ScriptError(f"script file not found: {path}") from None
    except OSError as exc:
        raise ScriptError(f"cannot read script file {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
            raise ScriptError(f"script file {path} is {what}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_script(handle, path: str | Path) -> bytes:
    """The bytes of an opened script, refused past MAX_SCRIPT_BYTES without reading the rest."""
    raw = handle.read(MAX_SCRIPT_BYTES + 1)
    if len(raw) > MAX_SCRIPT_BYTES:
        raise ScriptError(f"script file {path} is larger than {MAX_SCRIPT_BYTES} bytes")
    return raw


def estimate_tokens(text: str) -> int:
    """A deterministic token count (about four characters a token), for scripted usage."""
    return tokens_in_characters(len(text))


def tokens_in_characters(count: int) -> int:
    """estimate_tokens of a text `count` characters long."""
    return math.ceil(count / 4)


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
        raise ScriptError(f"{where}: {_keys(unknown)}; allowed: {sorted(allowed)}")


def _keys(unknown: set[Any]) -> str:
    return "1 unknown key" if len(unknown) == 1 else f"{len(unknown)} unknown keys"


def _kind(value: Any) -> str:
    """The type of a value, never the value: it is the file's content."""
    return "nothing" if value is None else type(value).__name__
