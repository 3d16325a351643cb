from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from session_server.llm.anthropic import AnthropicProvider
from session_server.llm.base import ModelError, ModelResponse
from session_server.llm.factory import ModelSpec, ScriptFileProvider, ScriptLibrary, create_provider, parse_model
from session_server.llm.limiter import LimitedProvider
from session_server.llm.openai import OpenAIProvider
from session_server.llm.script import MAX_SCRIPT_BYTES, Script, ScriptError
from session_server.llm.scripted import ScriptedProvider
from session_server.stats import LaneStats, StatsLane
from tests.llm.conftest import collect, first_request


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("openai:gpt-4o", ModelSpec("openai", "gpt-4o")),
        ("openai:qwen2.5:7b", ModelSpec("openai", "qwen2.5:7b")),
        ("Anthropic:claude-sonnet-4-5", ModelSpec("anthropic", "claude-sonnet-4-5")),
        ("scripted:tests/x.yaml", ModelSpec("scripted", "tests/x.yaml")),
    ],
)
def test_parse_model(spec: str, expected: ModelSpec) -> None:
    assert parse_model(spec) == expected


@pytest.mark.parametrize("spec", ["gpt-4o", "openai:", "gemini:pro"])
def test_parse_model_errors_name_the_known_providers(spec: str) -> None:
    with pytest.raises(ValueError, match="known providers: openai, anthropic, scripted"):
        parse_model(spec)


async def test_create_http_providers_from_env() -> None:
    openai_provider, name = create_provider("openai:gpt-4o", env={"OPENAI_API_KEY": "k"})
    assert isinstance(openai_provider, OpenAIProvider) and name == "gpt-4o"
    assert openai_provider.url == "https://api.openai.com/v1/chat/completions"
    local, _ = create_provider("openai:llama3", env={"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1/"})
    assert isinstance(local, OpenAIProvider) and local.url == "http://127.0.0.1:11434/v1/chat/completions"
    claude, _ = create_provider("anthropic:claude", env={"ANTHROPIC_BASE_URL": "http://127.0.0.1:9"})
    assert isinstance(claude, AnthropicProvider) and claude.url == "http://127.0.0.1:9/v1/messages"
    default_claude, _ = create_provider("anthropic:claude", env={})
    assert isinstance(default_claude, AnthropicProvider)
    assert default_claude.url == "https://api.anthropic.com/v1/messages"
    for provider in (openai_provider, local, claude, default_claude):
        await provider.aclose()


async def test_scripted_scripts_are_read_when_streaming_and_cached_until_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("responses: [{text: one}]\n")
    library = ScriptLibrary()
    provider, name = create_provider(f"scripted:{path}", scripts=library)
    assert isinstance(provider, ScriptFileProvider) and name == str(path)
    assert len(library) == 0  # creating the provider read nothing
    assert (await collect(provider.stream(first_request())))[-1].text == "one"
    assert library.load(path) is library.load(path)
    path.write_text("responses: [{text: two}, {text: three}]\n")
    os.utime(path, ns=(1, 1))
    assert (await collect(provider.stream(first_request())))[-1].text == "two"


async def test_a_missing_script_fails_the_request_not_the_provider(tmp_path: Path) -> None:
    provider, _ = create_provider(f"scripted:{tmp_path / 'missing.yaml'}", scripts=ScriptLibrary())
    with pytest.raises(ModelError, match="not found") as caught:
        await collect(provider.stream(first_request()))
    assert caught.value.reason == "SCRIPT_UNAVAILABLE"
    with pytest.raises(ScriptError, match="not found"):
        ScriptLibrary().load(tmp_path / "missing.yaml")


def test_the_script_library_is_bounded(tmp_path: Path) -> None:
    library = ScriptLibrary(max_entries=3)
    for i in range(10):
        path = tmp_path / f"s{i}.yaml"
        path.write_text(f"responses: [{{text: t{i}}}]\n")
        assert library.load(path).responses[0].text == f"t{i}"
    assert len(library) == 3


def test_a_script_must_be_a_regular_file_of_bounded_size(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ScriptError, match="not a regular file"):
        ScriptLibrary().load(fifo)  # returns at once: nothing ever writes to the FIFO
    with pytest.raises(ScriptError, match="is a directory"):
        ScriptLibrary().load(tmp_path)
    big = tmp_path / "big.yaml"
    with big.open("wb") as handle:
        handle.truncate(MAX_SCRIPT_BYTES + 1)
    with pytest.raises(ScriptError, match="larger than"):
        ScriptLibrary().load(big)


def test_clients_may_name_scripts_only_in_allowed_directories(tmp_path: Path) -> None:
    allowed = tmp_path / "scripts"
    allowed.mkdir()
    (allowed / "ok.yaml").write_text("responses: []\n")
    os.symlink(tmp_path, allowed / "escape")
    library = ScriptLibrary([allowed])
    library.check(str(allowed / "ok.yaml"))
    for path in ("/etc/passwd", str(allowed / "escape" / "x.yaml"), str(allowed / ".." / "x.yaml")):
        with pytest.raises(ScriptError, match="outside the directories"):
            library.check(path)
    with pytest.raises(ScriptError, match="--scripts-dir"):
        ScriptLibrary().check(str(allowed / "ok.yaml"))


async def test_limited_provider_caps_concurrent_streams(script: Script) -> None:
    semaphore = asyncio.Semaphore(2)
    active = peak = 0

    class Counting(ScriptedProvider):
        async def stream(self, request):  # type: ignore[no-untyped-def, override]
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            try:
                async for item in super().stream(request):
                    yield item
            finally:
                active -= 1

    providers = [LimitedProvider(Counting(script, latency=0.02), semaphore) for _ in range(3)]
    results = await asyncio.gather(*(collect(p.stream(first_request())) for p in providers for _ in range(3)))
    assert peak == 2 and all(isinstance(r[-1], ModelResponse) for r in results)


async def test_limited_provider_frees_its_slot_when_a_stream_is_abandoned(script: Script) -> None:
    semaphore = asyncio.Semaphore(1)
    limited = LimitedProvider(ScriptedProvider(script), semaphore)
    stream = limited.stream(first_request())
    await anext(stream)
    assert semaphore.locked()
    await stream.aclose()
    assert not semaphore.locked()
    await limited.aclose()


async def test_limited_provider_counts_a_request_pending_until_it_has_a_slot(script: Script) -> None:
    stats = LaneStats()
    semaphore = asyncio.Semaphore(1)
    limited = LimitedProvider(ScriptedProvider(script), semaphore, stats)
    running = limited.stream(first_request())
    await anext(running)  # holds the only slot
    waiting = asyncio.create_task(collect(limited.stream(first_request())))
    await asyncio.sleep(0)  # the second request now waits for the slot
    generate = stats.snapshot()[StatsLane.GENERATE]
    assert (generate.pending, generate.active) == (1, 1)
    waiting.cancel()  # given up while waiting: it never ran
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await collect(running)
    generate = stats.snapshot()[StatsLane.GENERATE]
    assert (generate.pending, generate.active, generate.completed, generate.failed) == (0, 0, 1, 1)
    await limited.aclose()
