"""A model request's body through orjson must be what httpx's `json=` sends: the same bytes (a
float's spelling aside: the same value), and the same failure for what cannot be sent."""

from __future__ import annotations

import json

import httpx
import pytest

from session_server.llm import wire_json

BODIES = [
    {"model": "m", "stream": True, "messages": [{"role": "user", "content": "héllo wörld ✓ 😀"}]},
    {"control": "tab\there\nnew\rline\x00nul\x1funit\x7fdel", "quote": 'a "b" \\ c', "slash": "</script>"},
    {"numbers": [0, -1, 2**63 - 1, -(2**63)], "flags": [True, False, None]},
    {"nested": {"deep": [[{"a": []}], {}], "empty": ""}, "tools": [{"type": "function", "parameters": {}}]},
    {"big": 2**70, "text": "past 64 bits: orjson refuses, the standard library writes it"},
]


@pytest.mark.parametrize("body", BODIES)
def test_a_request_body_is_the_bytes_httpx_would_send(body) -> None:
    assert wire_json.encode_body(body) == httpx.Request("POST", "http://model/", json=body).content


def test_a_float_may_be_spelled_differently_but_has_the_same_value() -> None:
    body = {"temperature": 0.7, "numbers": [1.5, 1e-07, 123456789.125, 1e300, -0.0]}
    sent = httpx.Request("POST", "http://model/", json=body).content
    assert json.loads(wire_json.encode_body(body)) == json.loads(sent) == body


def test_a_body_httpx_cannot_send_fails_as_it_does() -> None:
    body = {"text": "lone \ud800 surrogate"}
    with pytest.raises(UnicodeEncodeError):
        httpx.Request("POST", "http://model/", json=body)
    with pytest.raises(UnicodeEncodeError):
        wire_json.encode_body(body)
