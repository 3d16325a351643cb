from __future__ import annotations

import pytest

from session_server.llm.http_errors import ProviderError, model_error, parse_error_body, reason_for


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"error": {"message": "bad", "type": "invalid_request_error", "param": "m", "code": null}}',
            ProviderError("bad", "invalid_request_error"),
        ),
        (
            b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}',
            ProviderError("Overloaded", "overloaded_error"),
        ),
        (
            b'{"object": "error", "message": "too long", "type": "BadRequestError", "code": 400}',
            ProviderError("too long", "BadRequestError", "400"),
        ),
        (b'{"error": "model \\"x\\" not found"}', ProviderError('model "x" not found')),
        (b"<html>502 Bad Gateway</html>", ProviderError("<html>502 Bad Gateway</html>")),
        (b"", ProviderError("no error message")),
    ],
)
def test_parse_error_bodies(body: bytes, expected: ProviderError) -> None:
    assert parse_error_body(body) == expected


@pytest.mark.parametrize(
    ("status", "kind", "reason"),
    [
        (400, "invalid_request_error", "BAD_REQUEST"),
        (422, None, "BAD_REQUEST"),
        (401, "authentication_error", "AUTHENTICATION"),
        (403, None, "PERMISSION"),
        (404, None, "NOT_FOUND"),
        (408, None, "TIMEOUT"),
        (409, None, "SERVER_ERROR"),
        (429, "rate_limit_error", "RATE_LIMITED"),
        (500, "api_error", "SERVER_ERROR"),
        (500, "overloaded_error", "OVERLOADED"),
        (503, None, "OVERLOADED"),
        (529, "overloaded_error", "OVERLOADED"),
        (None, "overloaded_error", "OVERLOADED"),
        (None, "whatever", "STREAM_ERROR"),
    ],
)
def test_reasons(status: int | None, kind: str | None, reason: str) -> None:
    assert reason_for(status, ProviderError("m", kind)) == reason


def test_message_names_status_and_request_and_hides_the_key() -> None:
    error = model_error(
        "OpenAI",
        ProviderError(
            "Incorrect API key provided: sk-secret-123.", "invalid_request_error", "invalid_api_key"
        ),
        status=401,
        secret="sk-secret-123",
        key_env="OPENAI_API_KEY",
        request_id="req_1",
    )
    assert error.reason == "AUTHENTICATION" and error.status == 401
    message = str(error)
    assert "sk-secret-123" not in message
    assert "401" in message and "req_1" in message and "OPENAI_API_KEY" in message


def test_quota_message_says_to_check_billing() -> None:
    error = model_error(
        "OpenAI",
        ProviderError("quota", "insufficient_quota", "insufficient_quota"),
        status=429,
        secret=None,
        key_env="K",
    )
    assert error.reason == "RATE_LIMITED" and "billing" in str(error)
