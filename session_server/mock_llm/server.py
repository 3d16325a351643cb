"""The mock LLM HTTP server: replays a Script over the OpenAI and Anthropic wire formats."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from session_server.llm.script import Script, ScriptedResponse, estimate_tokens, split_words
from session_server.mock_llm import anthropic_wire, openai_wire
from session_server.mock_llm.frames import Frame, usage_as_strings
from session_server.mock_llm.options import MockOptions

# Histories of long sessions are big; the aiohttp default of 1 MiB would reject them.
MAX_REQUEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: Mapping[str, str]
    body: Any  # parsed JSON, or None when the body was not JSON


class MockLLM:
    """Request handlers plus what tests want to inspect: every request received, in order."""

    def __init__(self, script: Script, options: MockOptions | None = None) -> None:
        self.script = script
        self.options = options or MockOptions()
        self.requests: list[RecordedRequest] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app[MOCK_LLM_KEY] = self
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/messages", self._anthropic)
        return app

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body, number = await self._record(request)
        request_id = f"chatcmpl-mock-{number}"
        headers = {"x-request-id": f"req_mock_{number}"}
        faulty = self.options.faulty(number)
        if faulty and self.options.fault in openai_wire.ERRORS:
            status, error = openai_wire.ERRORS[self.options.fault]
            return web.json_response(
                {"error": error}, status=status, headers={**headers, **self._fault_headers(status)}
            )
        problem = openai_wire.validate(body)
        if problem:
            return web.json_response(openai_wire.error_body(*problem), status=400, headers=headers)
        response = self._response_for(body["messages"])
        prompt_tokens = _prompt_tokens(body)
        model = body["model"]
        if not body.get("stream"):
            await self._pace_whole(response)
            return web.json_response(
                openai_wire.completion_body(
                    response, model=model, request_id=request_id, prompt_tokens=prompt_tokens
                ),
                headers=headers,
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        cut = faulty and self.options.fault == "max_tokens"
        if cut:
            response = cut_at_token_limit(response)
        frames = openai_wire.stream_frames(
            response,
            model=model,
            request_id=request_id,
            prompt_tokens=prompt_tokens,
            include_usage=include_usage,
            quirks=self.options.quirks,
            cut=cut,
        )
        return await self._stream(
            request, frames, openai_wire.error_frame(), headers, faulty, openai_wire.malformed_frame()
        )

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        body, number = await self._record(request)
        request_id = f"msg_mock_{number}"
        headers = {"request-id": f"req_mock_{number}"}
        faulty = self.options.faulty(number)
        if faulty and self.options.fault in anthropic_wire.ERRORS:
            status, error = anthropic_wire.ERRORS[self.options.fault]
            return web.json_response(
                {"type": "error", "error": error},
                status=status,
                headers={**headers, **self._fault_headers(status)},
            )
        problem = anthropic_wire.validate(body, request.headers)
        if problem:
            return web.json_response(anthropic_wire.error_body(problem), status=400, headers=headers)
        response = self._response_for(body["messages"])
        prompt_tokens = _prompt_tokens(body)
        model = body["model"]
        if not body.get("stream"):
            await self._pace_whole(response)
            return web.json_response(
                anthropic_wire.message_body(
                    response, model=model, request_id=request_id, prompt_tokens=prompt_tokens
                ),
                headers=headers,
            )
        cut = faulty and self.options.fault == "max_tokens"
        if cut:
            response = cut_at_token_limit(response)
        frames = anthropic_wire.stream_frames(
            response, model=model, request_id=request_id, prompt_tokens=prompt_tokens, cut=cut
        )
        return await self._stream(
            request, frames, anthropic_wire.error_frame(), headers, faulty, anthropic_wire.malformed_frame()
        )

    async def _record(self, request: web.Request) -> tuple[Any, int]:
        try:
            body = await request.json()
        except ValueError:
            body = None
        self.requests.append(RecordedRequest(request.path, dict(request.headers), body))
        return body, len(self.requests)

    def _response_for(self, messages: list[Any]) -> ScriptedResponse:
        # Like Script.response_for, over wire messages: one response per assistant turn so far.
        return self.script.response_at(
            sum(1 for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant")
        )

    def _fault_headers(self, status: int) -> dict[str, str]:
        if status != 429 or self.options.fault == "quota":
            return {}
        after = self.options.retry_after
        return {"retry-after": f"{after:g}", "retry-after-ms": f"{after * 1000:g}"}

    async def _stream(
        self,
        request: web.Request,
        frames: list[Frame],
        error: Frame,
        headers: dict[str, str],
        faulty: bool,
        malformed: Frame,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                **headers,
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(request)
        if faulty and self.options.fault == "cut_stream":
            frames = [frame for frame in frames if not frame.final]
        elif faulty and self.options.fault == "malformed_chunk":
            frames = [frames[0], malformed, *frames[1:]]
        elif faulty and self.options.fault == "string_usage":
            frames = [usage_as_strings(frame) for frame in frames]
        try:
            if self.options.latency:
                await asyncio.sleep(self.options.latency)
            for frame in frames:
                if self.options.token_rate and frame.tokens:
                    await asyncio.sleep(frame.tokens / self.options.token_rate)
                await response.write(frame.data)
                if faulty and self.options.fault == "error_mid_stream" and frame.tokens:
                    await response.write(error.data)
                    break
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away; nothing left to send it
        return response

    async def _pace_whole(self, response: ScriptedResponse) -> None:
        tokens = anthropic_wire.output_tokens(response)
        delay = self.options.latency + (tokens / self.options.token_rate if self.options.token_rate else 0.0)
        if delay:
            await asyncio.sleep(delay)


MOCK_LLM_KEY = web.AppKey("mock_llm", MockLLM)


async def start_mock_llm(
    script: Script | str | Path, host: str = "127.0.0.1", port: int = 0, **options: Any
) -> tuple[web.AppRunner, str]:
    """Start serving `script`; returns the runner (`await runner.cleanup()` to stop; the MockLLM is
    `runner.app[MOCK_LLM_KEY]`) and the root URL. OpenAI clients use `{url}/v1` as base URL,
    Anthropic clients `{url}`. `options` are MockOptions fields."""
    if not isinstance(script, Script):
        script = Script.load(script)
    if "quirks" in options:
        options["quirks"] = frozenset(options["quirks"])
    mock = MockLLM(script, MockOptions(**options))
    # A mock needs no graceful shutdown, and a handler whose client left should stop pacing.
    runner = web.AppRunner(mock.app(), access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"


def cut_at_token_limit(response: ScriptedResponse) -> ScriptedResponse:
    """The response as far as the output token limit let it come: its last tool call right after
    the name (no arguments), or, without calls, the first half of its words."""
    if response.tool_calls:
        *whole, last = response.tool_calls
        return dataclasses.replace(
            response, tool_calls=(*whole, dataclasses.replace(last, arguments_json=""))
        )
    words = split_words(response.text)
    return dataclasses.replace(response, text="".join(words[: len(words) // 2]))


def _prompt_tokens(body: Mapping[str, Any]) -> int:
    parts = (body.get("system"), body.get("messages"), body.get("tools"))
    return estimate_tokens("".join(p if isinstance(p, str) else json.dumps(p) for p in parts if p))
