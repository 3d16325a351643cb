"""Providers from "provider:name" model strings: openai:gpt-4o, anthropic:claude-sonnet-4-5,
scripted:path/to/script.yaml. Base URLs and keys come from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from session_server.llm.anthropic import AnthropicProvider
from session_server.llm.base import ModelProvider
from session_server.llm.openai import OpenAIProvider
from session_server.llm.script import Script
from session_server.llm.scripted import ScriptedProvider

KNOWN_PROVIDERS = ("openai", "anthropic", "scripted")
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
ANTHROPIC_DEFAULT_BASE_URL = "https://api.anthropic.com"


@dataclass(frozen=True)
class ModelSpec:
    provider: str
    name: str  # the model name, or the script path for `scripted`


def parse_model(spec: str) -> ModelSpec:
    """Split "provider:name" at the first colon (model names such as qwen2.5:7b keep theirs)."""
    provider, sep, name = spec.partition(":")
    provider = provider.strip().lower()
    if not sep or not name.strip():
        raise ValueError(
            f"model {spec!r} is not of the form provider:name (e.g. openai:gpt-4o); "
            f"known providers: {', '.join(KNOWN_PROVIDERS)}"
        )
    if provider not in KNOWN_PROVIDERS:
        raise ValueError(
            f"unknown model provider {provider!r} in {spec!r}; known providers: {', '.join(KNOWN_PROVIDERS)}"
        )
    return ModelSpec(provider, name.strip())


def create_provider(spec: str, env: Mapping[str, str] | None = None) -> tuple[ModelProvider, str]:
    """A new provider for `spec` and the model name to put in requests. The caller owns the
    provider (and its connection pool): create one per model, share it, `aclose` it at the end."""
    env = os.environ if env is None else env
    model = parse_model(spec)
    if model.provider == "openai":
        base_url = env.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL
        return OpenAIProvider(base_url, env.get("OPENAI_API_KEY")), model.name
    if model.provider == "anthropic":
        base_url = env.get("ANTHROPIC_BASE_URL") or ANTHROPIC_DEFAULT_BASE_URL
        return AnthropicProvider(base_url, env.get("ANTHROPIC_API_KEY")), model.name
    return ScriptedProvider(load_script(model.name)), model.name


_scripts: dict[tuple[str, int, int], Script] = {}


def load_script(path: str | Path) -> Script:
    """Load a script once per path; an edited file (new mtime or size) is read again."""
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return Script.load(path)  # raises ScriptError naming the path
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    if key not in _scripts:
        _scripts[key] = Script.load(resolved)
    return _scripts[key]
