"""The mock server's own options: pacing, validation, fault counting and the CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from session_server.mock_llm import MockOptions, main
from tests.llm.conftest import SCRIPT_DATA, MockFactory

USER = [{"role": "user", "content": "hi"}]


async def post(http: httpx.AsyncClient, url: str, body: dict[str, object], **headers: str) -> httpx.Response:
    return await http.post(url, json=body, headers=headers)


async def test_latency_delays_the_first_token(mock_llm: MockFactory, http: httpx.AsyncClient) -> None:
    _, url = await mock_llm(latency=0.1)
    started = time.monotonic()
    async with http.stream(
        "POST", f"{url}/v1/chat/completions", json={"model": "m", "messages": USER, "stream": True}
    ) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines() if line]
    assert time.monotonic() - started >= 0.1
    assert lines[-1] == "data: [DONE]"


async def test_token_rate_paces_the_stream(mock_llm: MockFactory, http: httpx.AsyncClient) -> None:
    _, url = await mock_llm(token_rate=200.0)
    started = time.monotonic()
    response = await post(
        http,
        f"{url}/v1/messages",
        {"model": "m", "max_tokens": 10, "messages": USER, "stream": True},
        **{"anthropic-version": "2023-06-01"},
    )
    assert response.status_code == 200 and "event: message_stop" in response.text
    # About 20 output tokens at 200 tokens/s.
    assert time.monotonic() - started >= 0.08


async def test_fault_hits_only_the_first_requests(mock_llm: MockFactory, http: httpx.AsyncClient) -> None:
    _, url = await mock_llm(fault="500", fault_count=2)
    statuses = [
        (await post(http, f"{url}/v1/chat/completions", {"model": "m", "messages": USER})).status_code
        for _ in range(3)
    ]
    assert statuses == [500, 500, 200]


async def test_429_carries_retry_after_headers(mock_llm: MockFactory, http: httpx.AsyncClient) -> None:
    _, url = await mock_llm(fault="429", retry_after=2)
    response = await post(http, f"{url}/v1/chat/completions", {"model": "m", "messages": USER})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2" and response.headers["retry-after-ms"] == "2000"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": USER}, "model"),
        ({"model": "m", "messages": USER, "parallel_tool_calls": True}, "parallel_tool_calls"),
        (
            {"model": "m", "messages": [*USER, {"role": "tool", "tool_call_id": "x", "content": "r"}]},
            "messages.[1].role",
        ),
    ],
)
async def test_openai_validation(
    mock_llm: MockFactory, http: httpx.AsyncClient, body: dict[str, object], param: str
) -> None:
    _, url = await mock_llm()
    response = await post(http, f"{url}/v1/chat/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        ({"model": "m", "max_tokens": 5, "messages": USER}, {}, "anthropic-version"),
        ({"model": "m", "messages": USER}, {"anthropic-version": "2023-06-01"}, "max_tokens"),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}],
            },
            {"anthropic-version": "2023-06-01"},
            "non-empty",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    *USER,
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "text", "text": "\n\n"},
                            {"type": "tool_use", "id": "t1", "name": "ls", "input": {}},
                        ],
                    },
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]},
                ],
            },
            {"anthropic-version": "2023-06-01"},
            "non-whitespace text",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    *USER,
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "ls", "input": {}}]},
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "", "is_error": True}],
                    },
                ],
            },
            {"anthropic-version": "2023-06-01"},
            "content cannot be empty if `is_error` is true",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "zz", "content": "r"}],
                    }
                ],
            },
            {"anthropic-version": "2023-06-01"},
            "unexpected `tool_use_id`",
        ),
    ],
)
async def test_anthropic_validation(
    mock_llm: MockFactory,
    http: httpx.AsyncClient,
    body: dict[str, object],
    headers: dict[str, str],
    message: str,
) -> None:
    _, url = await mock_llm()
    response = await post(http, f"{url}/v1/messages", body, **headers)
    assert response.status_code == 400
    payload = response.json()
    assert payload["type"] == "error" and message in payload["error"]["message"]


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown quirks"):
        MockOptions(quirks=frozenset({"nope"}))
    with pytest.raises(ValueError, match="unknown fault"):
        MockOptions(fault="418")
    with pytest.raises(ValueError, match="negative"):
        MockOptions(latency=-1)


def test_cli_rejects_a_missing_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--script", str(tmp_path / "none.yaml")]) == 2
    assert "script file not found" in capsys.readouterr().err


def test_cli_serves_and_prints_its_url(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(__import__("json").dumps(SCRIPT_DATA))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "session_server.mock_llm",
            "--script",
            str(script),
            "--port",
            "0",
            "--quirk",
            "no_ids",
            "--quirk",
            "finish_stop",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("mock-llm listening on http://127.0.0.1:")
        url = line.split()[3]
        response = httpx.post(
            f"{url}/v1/chat/completions", json={"model": "m", "messages": USER, "stream": True}
        )
        assert '"finish_reason": "stop"' in response.text and '"id": "call_' not in response.text
    finally:
        process.terminate()
        process.wait(timeout=5)
