"""OpenAIProvider against the mock LLM over real HTTP on 127.0.0.1, in every quirk and fault mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web

from session_server.llm.anthropic import AnthropicProvider
from session_server.llm.base import ModelError, ModelResponse, ModelToolCall, TextChunk, ToolCallReady
from session_server.llm.openai import OpenAIProvider, request_body, to_openai_messages
from session_server.llm.retry import RetryPolicy
from session_server.llm.script import Script
from session_server.mock_llm import QUIRKS
from tests.llm.conftest import MockFactory, ModelServer, SleepRecorder, collect, first_request, second_request


@pytest.fixture
def provider(model_http: aiohttp.ClientSession) -> Callable[[str, RetryPolicy], OpenAIProvider]:
    def make(url: str, policy: RetryPolicy) -> OpenAIProvider:
        return OpenAIProvider(f"{url}/v1", "sk-test-secret", client=model_http, retry_policy=policy)

    return make


Make = Callable[[str, RetryPolicy], OpenAIProvider]


def calls_of(items: list[object]) -> list[tuple[str, dict[str, object]]]:
    response = items[-1]
    assert isinstance(response, ModelResponse)
    return [(c.name, json.loads(c.arguments_json)) for c in response.tool_calls]


EXPECTED_CALLS = [("grep", {"pattern": "def ", "path": "."}), ("read", {"file_path": "README.md"})]


async def test_streams_text_calls_and_usage(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm()
    items = await collect(provider(url, fast_policy).stream(first_request()))
    text = "".join(i.text for i in items if isinstance(i, TextChunk))
    ready = [i for i in items if isinstance(i, ToolCallReady)]
    response = items[-1]
    assert isinstance(response, ModelResponse)
    assert text == response.text == "Looking around."
    assert response.tool_calls == [
        ModelToolCall("call_0_0", "grep", '{"pattern": "def ", "path": "."}'),
        ModelToolCall("call_0_1", "read", '{"file_path": "README.md"}'),
    ]
    assert [r.call for r in ready] == response.tool_calls and [r.index for r in ready] == [0, 1]
    assert response.stop_reason == "tool_use"
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    sent = mock.requests[0]
    assert sent.headers["Authorization"] == "Bearer sk-test-secret"
    assert sent.body["stream"] is True and sent.body["stream_options"] == {"include_usage": True}
    assert sent.body["parallel_tool_calls"] is True and sent.body["tools"][0]["function"]["name"] == "grep"


async def test_follow_up_with_tool_results_passes_history_validation(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm()
    items = await collect(provider(url, fast_policy).stream(second_request()))
    response = items[-1]
    assert isinstance(response, ModelResponse)
    assert response.text == "All done, nothing else to change." and response.stop_reason == "end_turn"
    roles = [m["role"] for m in mock.requests[0].body["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool"]


@pytest.mark.parametrize(
    "quirks",
    [[q] for q in QUIRKS] + [["whole_arguments", "missing_index", "no_ids"], ["repeated_name", "no_ids"]],
    ids=lambda q: "+".join(q),
)
async def test_every_quirk_yields_the_same_calls(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy, quirks: list[str]
) -> None:
    _, url = await mock_llm(quirks=quirks)
    items = await collect(provider(url, fast_policy).stream(first_request()))
    assert calls_of(items) == EXPECTED_CALLS
    response = items[-1]
    assert isinstance(response, ModelResponse) and response.stop_reason == "tool_use"
    assert [i.call for i in items if isinstance(i, ToolCallReady)] == response.tool_calls
    ids = [c.call_id for c in response.tool_calls]
    assert len(set(ids)) == 2 and all(ids)


async def test_429_then_success_honours_retry_after(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy, sleeps: SleepRecorder
) -> None:
    mock, url = await mock_llm(fault="429", fault_count=1, retry_after=0.05)
    items = await collect(provider(url, fast_policy).stream(first_request()))
    assert calls_of(items) == EXPECTED_CALLS
    assert len(mock.requests) == 2 and sleeps.delays == [0.05]


async def test_retry_after_is_really_waited(provider: Make, mock_llm: MockFactory) -> None:
    _, url = await mock_llm(fault="429", fault_count=1, retry_after=0.1)
    started = time.monotonic()
    await collect(provider(url, RetryPolicy(base_delay=0.001)).stream(first_request()))
    assert time.monotonic() - started >= 0.1


async def test_429_beyond_the_retry_budget(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm(fault="429", fault_count=5, retry_after=0.01)
    with pytest.raises(ModelError) as error:
        await collect(provider(url, fast_policy).stream(first_request()))
    assert error.value.reason == "RATE_LIMITED" and error.value.status == 429
    assert "after 2 retries" in str(error.value) and "req_mock_3" in str(error.value)
    assert len(mock.requests) == 3


async def test_insufficient_quota_is_not_retried(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm(fault="quota")
    with pytest.raises(ModelError) as error:
        await collect(provider(url, fast_policy).stream(first_request()))
    assert error.value.reason == "RATE_LIMITED" and "billing" in str(error.value)
    assert len(mock.requests) == 1


async def test_500_is_retried_with_backoff(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy, sleeps: SleepRecorder
) -> None:
    mock, url = await mock_llm(fault="500", fault_count=2)
    items = await collect(provider(url, fast_policy).stream(first_request()))
    assert calls_of(items) == EXPECTED_CALLS
    assert len(mock.requests) == 3
    assert 0.00075 <= sleeps.delays[0] <= 0.001 and 0.0015 <= sleeps.delays[1] <= 0.002


async def test_500_every_time_is_a_server_error(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm(fault="500", fault_count=0)
    with pytest.raises(ModelError) as error:
        await collect(provider(url, fast_policy).stream(first_request()))
    assert error.value.reason == "SERVER_ERROR" and len(mock.requests) == 3


async def test_max_retries_zero(mock_llm: MockFactory, model_http: aiohttp.ClientSession) -> None:
    mock, url = await mock_llm(fault="500")
    with pytest.raises(ModelError):
        await collect(OpenAIProvider(f"{url}/v1", None, client=model_http, max_retries=0).stream(first_request()))
    assert len(mock.requests) == 1 and "Authorization" not in mock.requests[0].headers


async def test_error_mid_stream_after_output_is_not_retried(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm(fault="error_mid_stream")
    items = []
    with pytest.raises(ModelError) as error:
        async for item in provider(url, fast_policy).stream(first_request()):
            items.append(item)
    assert items == [TextChunk("Looking ")]
    assert error.value.reason == "SERVER_ERROR" and "stream error" in str(error.value)
    assert len(mock.requests) == 1


async def test_error_mid_stream_before_output_is_not_retried_either(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    # Errors inside a 200 stream are final, as in the official SDKs, even with nothing yielded yet.
    tools_only = Script.from_data({"responses": [{"tool_calls": [{"name": "ls"}]}]})
    mock, url = await mock_llm(tools_only, fault="error_mid_stream")
    with pytest.raises(ModelError):
        await collect(provider(url, fast_policy).stream(first_request()))
    assert len(mock.requests) == 1


async def test_cut_stream_with_complete_calls_is_accepted(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    _, url = await mock_llm(fault="cut_stream")
    items = await collect(provider(url, fast_policy).stream(first_request()))
    assert calls_of(items) == EXPECTED_CALLS
    response = items[-1]
    assert isinstance(response, ModelResponse) and response.usage.input_tokens == 0


async def test_cut_stream_with_text_only_is_an_error(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm(fault="cut_stream")
    with pytest.raises(ModelError) as error:
        await collect(provider(url, fast_policy).stream(second_request()))
    assert error.value.reason == "STREAM_ERROR" and len(mock.requests) == 1


async def test_history_without_tool_results_is_a_400(
    provider: Make, mock_llm: MockFactory, fast_policy: RetryPolicy
) -> None:
    mock, url = await mock_llm()
    request = second_request()
    broken = type(request)(request.model, request.system, request.messages[:3], request.tools)
    with pytest.raises(ModelError) as error:
        await collect(provider(url, fast_policy).stream(broken))
    assert error.value.reason == "BAD_REQUEST" and error.value.status == 400
    assert "call_0_1" in str(error.value) and len(mock.requests) == 1


async def test_connection_refused_is_retried_then_reported(
    provider: Make, fast_policy: RetryPolicy, sleeps: SleepRecorder
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ModelError) as error:
        await collect(provider(f"http://127.0.0.1:{port}", fast_policy).stream(first_request()))
    assert error.value.reason == "CONNECTION" and len(sleeps.delays) == 2
    assert "sk-test-secret" not in str(error.value)


async def test_slow_first_token_times_out(mock_llm: MockFactory, fast_policy: RetryPolicy) -> None:
    mock, url = await mock_llm(latency=1.0)
    llm = OpenAIProvider(f"{url}/v1", None, timeout=aiohttp.ClientTimeout(sock_read=0.05), retry_policy=fast_policy)
    with pytest.raises(ModelError) as error:
        await collect(llm.stream(first_request()))
    await llm.aclose()
    assert error.value.reason == "TIMEOUT" and len(mock.requests) == 3


async def test_a_stream_that_stalls_after_output_is_a_stream_error(
    model_server: ModelServer, fast_policy: RetryPolicy
) -> None:
    requests = []

    async def handler(request: web.Request) -> web.StreamResponse:
        requests.append(request)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n')
        await asyncio.Event().wait()  # silent until the client gives up
        return response

    url = await model_server(handler)
    llm = OpenAIProvider(f"{url}/v1", None, timeout=aiohttp.ClientTimeout(sock_read=0.2), retry_policy=fast_policy)
    items = []
    with pytest.raises(ModelError) as error:
        async for item in llm.stream(first_request()):
            items.append(item)
    await llm.aclose()
    assert items == [TextChunk("Hi")] and len(requests) == 1
    assert error.value.reason == "STREAM_ERROR" and "timed out" in str(error.value)


async def test_requests_go_through_the_proxy_the_environment_names(
    model_server: ModelServer, fast_policy: RetryPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY is honoured as by httpx and the SDKs: the request goes to the proxy, which
    is asked for the model's URL."""
    asked = []

    async def proxy(request: web.Request) -> web.Response:
        asked.append((request.headers["Host"], request.path))
        chunk = {"choices": [{"index": 0, "delta": {"content": "via proxy"}, "finish_reason": "stop"}]}
        body = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
        return web.Response(body=body.encode(), content_type="text/event-stream")

    proxy_url = await model_server(proxy)
    for name in ("HTTP_PROXY", "http_proxy"):  # the lower-case one wins where both are set
        monkeypatch.setenv(name, proxy_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    llm = OpenAIProvider("http://model.invalid/v1", None, retry_policy=fast_policy)
    response = (await collect(llm.stream(first_request())))[-1]
    await llm.aclose()
    assert isinstance(response, ModelResponse) and response.text == "via proxy"
    assert asked == [("model.invalid", "/v1/chat/completions")]


async def test_key_never_appears_in_error_messages(
    model_server: ModelServer, model_http: aiohttp.ClientSession, fast_policy: RetryPolicy
) -> None:
    async def handler(request: web.Request) -> web.Response:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        error = {"message": f"Incorrect API key provided: {key}", "type": "invalid_request_error"}
        return web.json_response({"error": {**error, "code": "invalid_api_key"}}, status=401)

    url = await model_server(handler)
    llm = OpenAIProvider(f"{url}/v1", "sk-test-secret", client=model_http, retry_policy=fast_policy)
    with pytest.raises(ModelError) as error:
        await collect(llm.stream(first_request()))
    assert error.value.reason == "AUTHENTICATION"
    assert "sk-test-secret" not in str(error.value) and "[redacted]" in str(error.value)


async def test_broken_connection_after_output_is_not_retried(
    model_server: ModelServer, model_http: aiohttp.ClientSession, fast_policy: RetryPolicy
) -> None:
    requests = []

    async def handler(request: web.Request) -> web.StreamResponse:
        requests.append(request)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n')
        # The connection drops in the middle of the chunked body.
        request.transport.close()
        return response

    url = await model_server(handler)
    items = []
    with pytest.raises(ModelError) as error:
        async for item in OpenAIProvider(f"{url}/v1", None, client=model_http, retry_policy=fast_policy).stream(
            first_request()
        ):
            items.append(item)
    assert items == [TextChunk("Hi")] and error.value.reason == "STREAM_ERROR" and len(requests) == 1


def test_request_body_without_tools_omits_parallel_tool_calls() -> None:
    request = first_request()
    body = request_body(type(request)(request.model, "", request.messages, []))
    assert "tools" not in body and "parallel_tool_calls" not in body
    assert body["messages"][0]["role"] == "user" and body["max_completion_tokens"] == request.max_tokens


def test_history_conversion() -> None:
    messages = to_openai_messages("sys", second_request().messages)
    assert messages[0] == {"role": "system", "content": "sys"}
    assert messages[2]["tool_calls"][1] == {
        "id": "call_0_1",
        "type": "function",
        "function": {"name": "read", "arguments": '{"file_path": "README.md"}'},
    }
    assert messages[4] == {"role": "tool", "tool_call_id": "call_0_1", "content": "no such file"}


async def test_unescaped_line_separators_in_text_arrive_whole(
    model_server: ModelServer, model_http: aiohttp.ClientSession, fast_policy: RetryPolicy
) -> None:
    """Servers send JSON's non-ASCII raw; U+2028, U+2029 and U+0085 are text, not line ends (a
    line reader that splits like `str.splitlines`, as httpx's does, broke the chunk's JSON)."""
    text = "a\u2028b\u2029c\u0085d"

    async def handler(request: web.Request) -> web.Response:
        chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}]}
        body = f"data: {json.dumps(chunk, ensure_ascii=False)}\n\ndata: [DONE]\n\n"
        return web.Response(body=body.encode(), content_type="text/event-stream")

    url = await model_server(handler)
    llm = OpenAIProvider(f"{url}/v1", None, client=model_http, retry_policy=fast_policy)
    response = (await collect(llm.stream(first_request())))[-1]
    assert isinstance(response, ModelResponse) and response.text == text


async def test_key_echoed_in_a_mid_stream_error_is_redacted(
    model_server: ModelServer, model_http: aiohttp.ClientSession, fast_policy: RetryPolicy
) -> None:
    async def handler(request: web.Request) -> web.Response:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        body = f'data: {{"error": {{"message": "bad key {key}", "type": "server_error"}}}}\n\n'
        return web.Response(body=body.encode(), content_type="text/event-stream")

    url = await model_server(handler)
    llm = OpenAIProvider(f"{url}/v1", "sk-test-secret", client=model_http, retry_policy=fast_policy)
    with pytest.raises(ModelError) as error:
        await collect(llm.stream(first_request()))
    assert "sk-test-secret" not in str(error.value) and "bad key [redacted]" in str(error.value)


@pytest.mark.parametrize("provider", [OpenAIProvider, AnthropicProvider])
async def test_a_key_a_malformed_chunk_is_cut_in_is_redacted_too(
    model_server: ModelServer, model_http: aiohttp.ClientSession, fast_policy: RetryPolicy, provider: type
) -> None:
    # A malformed chunk is quoted in the error up to 200 characters, cut before the key is looked
    # for: a key echoed across that cut showed its first characters.
    async def handler(request: web.Request) -> web.Response:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ") or request.headers["x-api-key"]
        return web.Response(body=f"data: {{not json {'x' * 180}{key}\n\n".encode(), content_type="text/event-stream")

    url = await model_server(handler)
    llm = provider(f"{url}/v1" if provider is OpenAIProvider else url, "sk-test-secret", client=model_http,
                   retry_policy=fast_policy)
    with pytest.raises(ModelError) as error:
        await collect(llm.stream(first_request()))
    assert error.value.reason == "STREAM_ERROR"
    assert "sk-test" not in str(error.value) and "[redacted]…" in str(error.value), str(error.value)


@pytest.mark.parametrize("mid_stream", [False, True])
async def test_a_key_the_error_message_is_cut_in_is_redacted_too(
    model_server: ModelServer, model_http: aiohttp.ClientSession, fast_policy: RetryPolicy, mid_stream: bool
) -> None:
    # A provider's message is cut at 500 characters before the key is looked for: a key echoed
    # across the cut showed its first characters, to the client and in the session's events.
    async def handler(request: web.Request) -> web.Response:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        error = {"message": "x" * 490 + key, "type": "invalid_request_error"}
        if mid_stream:
            body = f"data: {json.dumps({'error': error})}\n\n"
            return web.Response(body=body.encode(), content_type="text/event-stream")
        return web.json_response({"error": error}, status=400)

    url = await model_server(handler)
    llm = OpenAIProvider(f"{url}/v1", "sk-test-secret", client=model_http, retry_policy=fast_policy)
    with pytest.raises(ModelError) as error:
        await collect(llm.stream(first_request()))
    assert "sk-test" not in str(error.value) and "x" * 490 + "[redacted]" in str(error.value)


async def test_base_url_without_scheme_fails_at_once(
    model_http: aiohttp.ClientSession, fast_policy: RetryPolicy
) -> None:
    llm = OpenAIProvider("localhost:8000/v1", None, client=model_http, retry_policy=fast_policy)
    with pytest.raises(ModelError) as error:
        await collect(llm.stream(first_request()))
    assert error.value.reason == "CONNECTION" and "check the base URL" in str(error.value)


@pytest.mark.parametrize("provider_class", ["openai", "anthropic"])
async def test_json_nested_deeper_than_the_parser_goes_is_a_stream_error(
    model_server: ModelServer, model_http: aiohttp.ClientSession, fast_policy: RetryPolicy, provider_class: str
) -> None:
    """A chunk (or an error body) of "[[[[..." raised RecursionError, not a ModelError: the turn
    ended as an INTERNAL failure of the server, with a traceback in its log."""
    deep = "[" * 100_000 + "]" * 100_000
    requests = []

    async def handler(request: web.Request) -> web.Response:
        requests.append(request)
        if len(requests) > 1:
            return web.Response(body=deep, status=400, content_type="application/json")
        return web.Response(body=f'data: {{"type": "message_start", "choices": {deep}}}\n\n',
                            content_type="text/event-stream")

    url = await model_server(handler)
    if provider_class == "openai":
        llm = OpenAIProvider(f"{url}/v1", None, client=model_http, retry_policy=fast_policy)
    else:
        llm = AnthropicProvider(url, None, client=model_http, retry_policy=fast_policy)
    with pytest.raises(ModelError) as error:
        await collect(llm.stream(first_request()))
    assert error.value.reason == "STREAM_ERROR"
    with pytest.raises(ModelError) as error:
        await collect(llm.stream(first_request()))
    assert error.value.reason == "BAD_REQUEST" and error.value.status == 400


@pytest.mark.parametrize("provider", [OpenAIProvider, AnthropicProvider])
async def test_an_error_body_that_never_ends_is_read_only_in_part(
    model_server: ModelServer, model_http: aiohttp.ClientSession, fast_policy: RetryPolicy, provider: type
) -> None:
    # A broken proxy's 400 whose body never ends was read whole, into memory, the turn waiting.
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=400, headers={"content-type": "text/plain"})
        await response.prepare(request)
        with contextlib.suppress(Exception):  # until the client hangs up
            while True:
                await response.write(b"bad request " * 5000)
        return response

    url = await model_server(handler)
    llm = provider(f"{url}/v1" if provider is OpenAIProvider else url, None, client=model_http,
                   retry_policy=fast_policy)
    with pytest.raises(ModelError) as error:
        await asyncio.wait_for(collect(llm.stream(first_request())), 60)
    assert error.value.reason == "BAD_REQUEST" and error.value.status == 400
    assert "bad request bad request" in str(error.value) and len(str(error.value)) < 2000


@pytest.mark.parametrize("provider", [OpenAIProvider, AnthropicProvider])
async def test_a_success_that_is_not_an_event_stream_says_what_it_was(
    model_server: ModelServer, fast_policy: RetryPolicy, provider: type
) -> None:
    # Read as events, a JSON error answered with 200 (some proxies do) or a web page at a wrong
    # base URL gave only "the stream ended early ... try again", losing what the server said.
    async def handler(request: web.Request) -> web.Response:
        if request.path.startswith("/www/"):
            return web.Response(text="<html><body>Welcome to nginx!</body></html>", content_type="text/html")
        return web.json_response({"error": {"message": "model 'gpt-9' is not served here", "type": "invalid_model"}})

    url = await model_server(handler)
    for base, expected in ((url, "model 'gpt-9' is not served here"), (f"{url}/www", "Welcome to nginx!")):
        llm = provider(base, "sk-secret", retry_policy=fast_policy)
        with pytest.raises(ModelError) as error:
            await collect(llm.stream(first_request()))
        await llm.aclose()
        message = str(error.value)
        assert error.value.reason == "STREAM_ERROR"
        assert expected in message and "not an event stream" in message and "ended early" not in message, message


async def test_events_labelled_as_another_content_type_are_still_read_as_events(
    model_server: ModelServer, fast_policy: RetryPolicy
) -> None:
    async def handler(request: web.Request) -> web.Response:
        chunk = {"choices": [{"index": 0, "delta": {"content": "plain"}, "finish_reason": "stop"}]}
        return web.Response(text=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n", content_type="text/plain")

    url = await model_server(handler)
    llm = OpenAIProvider(f"{url}/v1", None, retry_policy=fast_policy)
    response = (await collect(llm.stream(first_request())))[-1]
    await llm.aclose()
    assert isinstance(response, ModelResponse) and response.text == "plain"
