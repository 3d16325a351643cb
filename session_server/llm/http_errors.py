"""Turning a provider's error (an HTTP error response or an error event mid-stream) into a
ModelError with a machine-readable reason and a message a person can act on."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from session_server.llm.base import CUT, ModelError

# Error `type`s (or `code`s), for mid-stream error events, which come without a status code.
_REASON_BY_TYPE = {
    "overloaded_error": "OVERLOADED",
    "rate_limit_error": "RATE_LIMITED",
    "insufficient_quota": "RATE_LIMITED",
    "authentication_error": "AUTHENTICATION",
    "permission_error": "PERMISSION",
    "not_found_error": "NOT_FOUND",
    "invalid_request_error": "BAD_REQUEST",
    "api_error": "SERVER_ERROR",
    "server_error": "SERVER_ERROR",
}

_REASON_BY_STATUS = {
    401: "AUTHENTICATION",
    403: "PERMISSION",
    404: "NOT_FOUND",
    408: "TIMEOUT",
    429: "RATE_LIMITED",
    503: "OVERLOADED",
    529: "OVERLOADED",
}

_HINTS = {
    "AUTHENTICATION": "check the API key{key_env}",
    "PERMISSION": "the API key may lack access to this model or endpoint",
    "NOT_FOUND": "check the model name and the base URL",
    "RATE_LIMITED": "wait and try again, or lower the server's limit on concurrent LLM requests",
    "OVERLOADED": "the provider is overloaded; try again later",
    "SERVER_ERROR": "the provider failed; try again later",
    "TIMEOUT": "the provider did not answer in time; try again later",
}

_MAX_MESSAGE = 500
# A key's start shorter than this, before a cut, is left: "sk-" tells nobody anything.
_MIN_KEY_START = 4


@dataclass(frozen=True)
class ProviderError:
    """What a provider's error body said."""

    message: str
    type: str | None = None
    code: str | None = None


def parse_error_body(body: bytes | str) -> ProviderError:
    """Read the OpenAI (`{"error":{...}}`), Anthropic (`{"type":"error","error":{...}}`), vLLM
    (`{"object":"error","message":...}`) or plain-text error shapes."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." deeper than the parser goes
        return ProviderError(_cut(text.strip()) or "no error message")
    return parse_error_payload(payload) if isinstance(payload, Mapping) else ProviderError(_cut(text))


def parse_error_payload(payload: Mapping[str, Any]) -> ProviderError:
    error: Any = payload.get("error", payload)
    if isinstance(error, str):  # Ollama: {"error": "model not found"}
        return ProviderError(_cut(error))
    if not isinstance(error, Mapping):
        return ProviderError(_cut(json.dumps(payload)))
    message = error.get("message") or payload.get("detail") or json.dumps(payload)
    return ProviderError(
        _cut(str(message)), _str_or_none(error.get("type")), _str_or_none(error.get("code"))
    )


def reason_for(status: int | None, error: ProviderError) -> str:
    """The ModelError reason: from the status code, except that an overloaded error type wins
    (Anthropic sends it with 529 and sometimes with 500); mid-stream errors go by type alone."""
    by_type = _REASON_BY_TYPE.get(error.type or "") or _REASON_BY_TYPE.get(error.code or "")
    if status is None:
        return by_type or "STREAM_ERROR"
    if by_type == "OVERLOADED":
        return by_type
    if status in _REASON_BY_STATUS:
        return _REASON_BY_STATUS[status]
    # 409 (a conflict on the provider's side) is retried like a 5xx, and reported like one.
    return "SERVER_ERROR" if status >= 500 or status == 409 else "BAD_REQUEST"


def model_error(
    provider: str,
    error: ProviderError,
    *,
    status: int | None,
    secret: str | None = None,
    key_env: str = "",
    request_id: str | None = None,
    note: str = "",
) -> ModelError:
    """A ModelError whose message never contains `secret` (the API key)."""
    reason = reason_for(status, error)
    where = f"{provider} API error {status}" if status is not None else f"{provider} stream error"
    detail = error.code or error.type
    parts = [f"{where}{f' ({detail})' if detail else ''}: {error.message}"]
    if request_id:
        parts.append(f"request id {request_id}")
    if note:
        parts.append(note)
    hint = (
        "the account is out of quota; check its billing"
        if "insufficient_quota" in (error.code, error.type)
        else _HINTS.get(reason, "")
    )
    if hint:
        parts.append(hint.format(key_env=f" ({key_env})" if key_env else ""))
    return ModelError(reason, redact("; ".join(parts), secret), status)


def redact(text: str, secret: str | None) -> str:
    if not secret:
        return text
    text = text.replace(secret, "[redacted]")
    # A key the provider echoed across the cut of its message: its first characters, then CUT.
    for length in range(len(secret) - 1, _MIN_KEY_START - 1, -1):
        text = text.replace(secret[:length] + CUT, "[redacted]" + CUT)
    return text


def _cut(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + CUT


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
