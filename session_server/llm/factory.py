"""Providers from "provider:name" model strings: openai:gpt-4o, anthropic:claude-sonnet-4-5,
scripted:path/to/script.yaml. Base URLs and keys come from the environment."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

from session_server.llm.anthropic import AnthropicProvider
from session_server.llm.base import ModelError, ModelProvider, ModelRequest, StreamItem
from session_server.llm.openai import OpenAIProvider
from session_server.llm.script import Script, ScriptError, open_script, read_script
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


def create_provider(
    spec: str, env: Mapping[str, str] | None = None, scripts: ScriptLibrary | None = None
) -> tuple[ModelProvider, str]:
    """A new provider for `spec` and the model name to put in requests. The caller owns the
    provider (and its connection pool): create one per provider, share it, `aclose` it at the end.

    An HTTP provider does not depend on the model name (it travels in each request), so one serves
    every model of its kind. A scripted provider reads its script when it streams, from `scripts`
    (the process-wide library by default), so creating one does no I/O.
    """
    env = os.environ if env is None else env
    model = parse_model(spec)
    if model.provider == "openai":
        base_url = env.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL
        return OpenAIProvider(base_url, env.get("OPENAI_API_KEY")), model.name
    if model.provider == "anthropic":
        base_url = env.get("ANTHROPIC_BASE_URL") or ANTHROPIC_DEFAULT_BASE_URL
        return AnthropicProvider(base_url, env.get("ANTHROPIC_API_KEY")), model.name
    return ScriptFileProvider(model.name, scripts or DEFAULT_SCRIPTS), model.name


def missing_key(spec: str, env: Mapping[str, str] | None = None) -> str | None:
    """The environment variable holding the API key `spec`'s provider needs, when it is not set
    and the provider's own service is the one asked (a proxy or a local server at another base URL
    may need none); None otherwise. `spec` must parse."""
    env = os.environ if env is None else env
    provider = parse_model(spec).provider
    if provider == "openai" and not env.get("OPENAI_BASE_URL") and not env.get("OPENAI_API_KEY"):
        return "OPENAI_API_KEY"
    if provider == "anthropic" and not env.get("ANTHROPIC_BASE_URL") and not env.get("ANTHROPIC_API_KEY"):
        return "ANTHROPIC_API_KEY"
    return None


# How many parsed scripts a process keeps; each is at most MAX_SCRIPT_BYTES of file.
MAX_CACHED_SCRIPTS = 32


class ScriptLibrary:
    """Parsed scripts by file, bounded (least recently used first out), re-read when a file changes.

    `allowed_dirs` are where a client may name a script (a server's `--scripts-dir`): `check`
    refuses any other path, symlinks resolved first. Loading opens only regular files, without
    blocking (a FIFO is refused, not waited on), reads at most MAX_SCRIPT_BYTES, and runs in a
    thread under `load_async`.
    """

    def __init__(self, allowed_dirs: Sequence[str | Path] = (), max_entries: int = MAX_CACHED_SCRIPTS) -> None:
        self.allowed_dirs = tuple(os.path.realpath(d) for d in allowed_dirs)
        self._max_entries = max_entries
        self._cache: OrderedDict[str, tuple[tuple[int, int, int, int], Script]] = OrderedDict()
        # Loads run in threads: the cache is shared between them.
        self._lock = threading.Lock()

    def check(self, path: str) -> None:
        """Raises ScriptError unless `path` lies inside an allowed directory."""
        real = os.path.realpath(path)
        for directory in self.allowed_dirs:
            if real == directory or real.startswith(directory.rstrip(os.sep) + os.sep):
                return
        if not self.allowed_dirs:
            raise ScriptError(
                "this server does not let clients name script files; the operator allows directories of "
                "scripts with --scripts-dir"
            )
        raise ScriptError(
            f"script {path} is outside the directories this server allows scripts from (--scripts-dir: "
            f"{', '.join(self.allowed_dirs)})"
        )

    def available(self, path: str, *, check: bool) -> None:
        """Raises ScriptError when the script is not allowed (with `check`) or is no regular
        file: metadata only (a stat never blocks, not even on a FIFO), for a quick answer before
        a turn starts; reading it is `load`'s."""
        if check:
            self.check(path)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise ScriptError(f"script file not found: {path}") from None
        except OSError as exc:
            raise ScriptError(f"cannot read script file {path}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise ScriptError(f"script file {path} is not a regular file")

    def cached(self, path: str) -> Script | None:
        """The parsed script when the file is unchanged since it was loaded (one stat, no read)."""
        try:
            info = os.stat(path)
        except OSError:
            return None
        with self._lock:
            entry = self._cache.get(path)
            if entry is None or entry[0] != _identity(info):
                return None
            self._cache.move_to_end(path)
            return entry[1]

    def load(self, path: str | Path) -> Script:
        """The script at `path`, from the cache when the file did not change. Raises ScriptError."""
        key = str(path)
        with open_script(key) as handle:
            identity = _identity(os.fstat(handle.fileno()))
            with self._lock:
                entry = self._cache.get(key)
                if entry is not None and entry[0] == identity:
                    self._cache.move_to_end(key)
                    return entry[1]
            script = Script.parse(read_script(handle, key), key)
        with self._lock:
            self._cache[key] = (identity, script)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return script

    async def load_async(self, path: str, *, check: bool) -> Script:
        """`load` off the event loop (after `check`, when asked), unless the cache answers."""
        if check:
            await asyncio.to_thread(self.check, path)
        script = self.cached(path)
        return script if script is not None else await asyncio.to_thread(self.load, path)

    def __len__(self) -> int:
        return len(self._cache)


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


DEFAULT_SCRIPTS = ScriptLibrary()


def load_script(path: str | Path) -> Script:
    """Load a script through the process-wide library (cached; re-read when the file changes)."""
    return DEFAULT_SCRIPTS.load(path)


class ScriptFileProvider:
    """A scripted model whose script is a file, read (or found in the library) at each request.

    With `checked`, the path is checked against the library's allowed directories at each
    request too: a script a client named stays usable only while the operator allows it.
    """

    def __init__(self, path: str, scripts: ScriptLibrary, *, checked: bool = False) -> None:
        self.path = path
        self.scripts = scripts
        self.checked = checked

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]:
        try:
            script = await self.scripts.load_async(self.path, check=self.checked)
        except ScriptError as exc:
            raise ModelError("SCRIPT_UNAVAILABLE", str(exc)) from None
        async with aclosing(ScriptedProvider(script).stream(request)) as items:
            async for item in items:
                yield item

    async def aclose(self) -> None:
        return None
