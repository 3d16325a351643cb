"""The Anthropic Messages wire format as the mock speaks it: streams, whole responses, errors and
the API's history checks."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from session_server.llm.script import ScriptedResponse, split_words
from session_server.mock_llm.frames import Frame, event_frame, fragments, token_count

ERRORS: dict[str, tuple[int, dict[str, Any]]] = {
    "429": (
        429,
        {
            "type": "rate_limit_error",
            "message": "Number of request tokens has exceeded your rate limit "
            "(mock). Please try again later.",
        },
    ),
    "quota": (
        400,
        {
            "type": "invalid_request_error",
            "message": "Your credit balance is too low to access the "
            "Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
        },
    ),
    "500": (500, {"type": "api_error", "message": "Internal server error"}),
    "529": (529, {"type": "overloaded_error", "message": "Overloaded"}),
}


def error_body(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def validate(body: Any, headers: Mapping[str, str]) -> str | None:
    """The API's 400 checks that matter to a client: a message, or None when valid."""
    if not headers.get("anthropic-version"):
        return "anthropic-version: header is required"
    if not isinstance(body, Mapping):
        return "There was an error parsing the body of your request."
    if not body.get("model"):
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: Field required"
    previous_uses: set[str] = set()
    for i, message in enumerate(messages):
        blocks = _blocks(message.get("content"))
        texts = [b.get("text") for b in blocks if b.get("type") == "text"]
        for k, block in enumerate(blocks):
            if block.get("type") == "text" and not block.get("text"):
                return f"messages.{i}.content.{k}.text: text content blocks must be non-empty"
            if block.get("type") == "tool_result" and block.get("is_error") and not block.get("content"):
                return f"messages.{i}.content.{k}.tool_result: content cannot be empty if `is_error` is true"
        # Whitespace-only text passes only beside text that is not (as the API answers).
        if texts and not any(isinstance(t, str) and t.strip() for t in texts):
            return "messages: text content blocks must contain non-whitespace text"
        uses = {b.get("id") for b in blocks if b.get("type") == "tool_use"}
        results = [b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"]
        for k, result in enumerate(results):
            if result not in previous_uses:
                return (
                    f"messages.{i}.content.{k}: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{result}. Each `tool_result` block must have a corresponding `tool_use` block in the "
                    "previous message."
                )
        missing = previous_uses - set(results)
        if missing:
            return (
                f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                f"{', '.join(sorted(missing))}. Each `tool_use` block must have a corresponding "
                "`tool_result` block in the next message."
            )
        previous_uses = uses
    return None


def _blocks(content: Any) -> list[Mapping[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content if isinstance(b, Mapping)] if isinstance(content, list) else []


def stream_frames(
    response: ScriptedResponse, *, model: str, request_id: str, prompt_tokens: int, cut: bool = False
) -> list[Frame]:
    """`cut`: the output token limit ended the response (see `cut_at_token_limit`)."""
    message = _message(response, model, request_id, prompt_tokens, content=[], output_tokens=1)
    message["stop_reason"] = None
    frames = [event_frame({"type": "message_start", "message": message}), event_frame({"type": "ping"})]
    index = 0
    if response.text:
        frames.append(
            event_frame(
                {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
            )
        )
        frames += [
            event_frame(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": word},
                },
                token_count(word),
            )
            for word in split_words(response.text)
        ]
        frames.append(event_frame({"type": "content_block_stop", "index": index}))
        index += 1
    for call in response.tool_calls:
        frames.append(
            event_frame(
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "tool_use", "id": call.call_id, "name": call.name, "input": {}},
                },
                token_count(call.name),
            )
        )
        # Like the real API, the first input delta is empty.
        frames += [
            event_frame(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": part},
                },
                token_count(part),
            )
            for part in ["", *fragments(call.arguments_json)]
        ]
        frames.append(event_frame({"type": "content_block_stop", "index": index}))
        index += 1
    frames.append(
        event_frame(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens" if cut else _stop_reason(response), "stop_sequence": None},
                "usage": {"output_tokens": output_tokens(response)},
            },
            final=True,
        )
    )
    frames.append(event_frame({"type": "message_stop"}, final=True))
    return frames


def error_frame() -> Frame:
    return event_frame(error_body("Overloaded", "overloaded_error"))


def malformed_frame() -> Frame:
    """A content_block_delta whose delta is a string where an object belongs."""
    return event_frame({"type": "content_block_delta", "index": 0, "delta": "x"})


def message_body(
    response: ScriptedResponse, *, model: str, request_id: str, prompt_tokens: int
) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": response.text}] if response.text else []
    content += [
        {"type": "tool_use", "id": c.call_id, "name": c.name, "input": _input(c.arguments_json)}
        for c in response.tool_calls
    ]
    return _message(response, model, request_id, prompt_tokens, content, output_tokens(response))


def output_tokens(response: ScriptedResponse) -> int:
    return token_count(response.text) + sum(
        token_count(c.name + c.arguments_json) for c in response.tool_calls
    )


def _message(
    response: ScriptedResponse,
    model: str,
    request_id: str,
    prompt_tokens: int,
    content: list[Any],
    output_tokens: int,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(response),
        "stop_sequence": None,
        "usage": {
            "input_tokens": prompt_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
        },
    }


def _stop_reason(response: ScriptedResponse) -> str:
    return "tool_use" if response.tool_calls else "end_turn"


def _input(arguments_json: str) -> Any:
    try:
        return json.loads(arguments_json)
    except ValueError:
        return {}
