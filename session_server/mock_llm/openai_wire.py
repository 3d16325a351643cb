"""The OpenAI Chat Completions wire format as the mock speaks it: streams (with optional quirks of
OpenAI-compatible servers), whole responses, errors, and the API's history checks."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from session_server.llm.base import ModelToolCall
from session_server.llm.script import ScriptedResponse, split_words
from session_server.mock_llm.frames import Frame, data_frame, fragments, token_count

ERRORS: dict[str, tuple[int, dict[str, Any]]] = {
    "429": (
        429,
        {
            "message": "Rate limit reached for requests (mock). Please try again later.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        },
    ),
    "quota": (
        429,
        {
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        },
    ),
    "500": (
        500,
        {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        },
    ),
    "529": (
        529,
        {
            "message": "The engine is currently overloaded, please try again later.",
            "type": "server_error",
            "param": None,
            "code": None,
        },
    ),
}
MID_STREAM_ERROR = {
    "message": "The server had an error while processing your request. Sorry about that!",
    "type": "server_error",
    "param": None,
    "code": None,
}


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def validate(body: Any) -> tuple[str, str | None] | None:
    """The API's 400 checks that matter to a client: (message, param), or None when valid."""
    if not isinstance(body, Mapping):
        return "We could not parse the JSON body of your request.", None
    if not body.get("model"):
        return "you must provide a model parameter", "model"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' is a required property and must be a non-empty array", "messages"
    if "parallel_tool_calls" in body and not body.get("tools"):
        return (
            "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed when 'tools' "
            "are specified.",
            "parallel_tool_calls",
        )
    pending: set[str] = set()
    answerable: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role == "tool":
            if message.get("tool_call_id") not in answerable:
                return (
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message "
                    "with 'tool_calls'.",
                    f"messages.[{i}].role",
                )
            pending.discard(message["tool_call_id"])
            continue
        if pending:
            return _unanswered(pending, i)
        answerable = set()
        if role == "assistant" and message.get("tool_calls"):
            answerable = {call.get("id") for call in message["tool_calls"]}
            pending = set(answerable)
    return _unanswered(pending, len(messages)) if pending else None


def _unanswered(pending: set[str], index: int) -> tuple[str, str]:
    return (
        "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
        "'tool_call_id'. The following tool_call_ids did not have response messages: "
        f"{', '.join(sorted(pending))}",
        f"messages.[{index}].role",
    )


def stream_frames(
    response: ScriptedResponse,
    *,
    model: str,
    request_id: str,
    prompt_tokens: int,
    include_usage: bool,
    quirks: frozenset[str],
    cut: bool = False,
) -> list[Frame]:
    """`cut`: the output token limit ended the response (see `cut_at_token_limit`)."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        return body

    frames = [data_frame(chunk({"role": "assistant", "content": ""}))]
    frames += [data_frame(chunk({"content": word}), token_count(word)) for word in split_words(response.text)]
    for index, call in enumerate(response.tool_calls):
        frames += [
            data_frame(chunk({"tool_calls": [delta]}), token_count(json.dumps(delta)))
            for delta in _call_deltas(index, call, quirks)
        ]
    finish = "tool_calls" if response.tool_calls and "finish_stop" not in quirks else "stop"
    if cut:
        finish = "length"
    frames.append(data_frame(chunk({}, finish), final=True))
    if include_usage:
        frames.append(
            data_frame(
                {
                    "id": request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_mock",
                    "choices": [],
                    "usage": usage(prompt_tokens, response),
                },
                final=True,
            )
        )
    frames.append(data_frame("[DONE]", final=True))
    return frames


def _call_deltas(index: int, call: ModelToolCall, quirks: frozenset[str]) -> list[dict[str, Any]]:
    if "whole_arguments" in quirks:
        deltas = [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json},
            }
        ]
    else:
        deltas = [{"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": ""}}]
        deltas += [{"function": {"arguments": part}} for part in fragments(call.arguments_json)]
    for delta in deltas:
        if "missing_index" not in quirks:
            delta["index"] = index
        if "no_ids" in quirks:
            delta.pop("id", None)
        if "repeated_name" in quirks:
            delta["function"]["name"] = call.name
    return deltas


def error_frame() -> Frame:
    return data_frame({"error": MID_STREAM_ERROR})


def malformed_frame() -> Frame:
    """A chunk whose choice is a string where an object belongs."""
    return data_frame({"id": "chatcmpl-malformed", "object": "chat.completion.chunk", "choices": ["x"]})


def completion_body(
    response: ScriptedResponse, *, model: str, request_id: str, prompt_tokens: int
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": response.text or None, "refusal": None}
    if response.tool_calls:
        message["tool_calls"] = [
            {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
            for c in response.tool_calls
        ]
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_mock",
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls" if response.tool_calls else "stop",
            }
        ],
        "usage": usage(prompt_tokens, response),
    }


def usage(prompt_tokens: int, response: ScriptedResponse) -> dict[str, Any]:
    completion = token_count(response.text) + sum(
        token_count(c.name + c.arguments_json) for c in response.tool_calls
    )
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
