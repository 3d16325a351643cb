"""The models sessions may use: which model strings a client may name, and one provider per kind.

The operator's default model (`--model`) is trusted as it is. A client naming a model of its own
may name any HTTP model, but a `scripted:PATH` only inside the directories the operator allowed
(`--scripts-dir`), checked when the session is created and again at every model request.

HTTP providers do not depend on the model name (it travels in each request), so there is one per
provider kind, however many model strings clients send; scripted providers hold no resources and
are kept for the most recently used few. Domain logic: no grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from session_server.config import InvalidArgument
from session_server.llm.base import ModelProvider
from session_server.llm.factory import ScriptFileProvider, ScriptLibrary, create_provider, parse_model
from session_server.llm.limiter import LimitedProvider
from session_server.llm.observed import ObservedProvider
from session_server.llm.script import ScriptError
from session_server.stats import LaneStats
from session_server.telemetry import Telemetry

# Scripted providers kept at once (they are cheap to make again).
MAX_SCRIPTED_PROVIDERS = 64


class Models:
    """Checks model strings and hands out their providers, all behind the Generate lane's limit."""

    def __init__(
        self,
        default_model: str,
        generate: asyncio.Semaphore,
        scripts_dirs: Sequence[str | Path] = (),
        telemetry: Telemetry | None = None,
        stats: LaneStats | None = None,
    ) -> None:
        self.default_model = default_model
        self._stats = stats
        self.scripts = ScriptLibrary(scripts_dirs)
        self._generate = generate
        self._telemetry = telemetry
        self._http: dict[str, LimitedProvider] = {}
        self._scripted: OrderedDict[str, LimitedProvider] = OrderedDict()

    def trusted(self, model: str) -> bool:
        """The operator's own model: its script may live anywhere."""
        return bool(model) and model == self.default_model

    async def check(self, model: str) -> None:
        """Raises InvalidArgument("config.model", ...) for a model this session may not use: a bad
        model string, or a script that is not allowed or does not load. Never quotes the file."""
        try:
            spec = parse_model(model)
        except ValueError as exc:
            raise InvalidArgument("config.model", str(exc)) from None
        if spec.provider == "scripted":
            if "\0" in spec.name:
                # No file has such a name, and the os functions refuse it with ValueError, not OSError.
                raise InvalidArgument("config.model", "the script path holds a NUL character: name a script file")
            try:
                await self.scripts.load_async(spec.name, check=not self.trusted(model))
            except ScriptError as exc:
                raise InvalidArgument("config.model", str(exc)) from None

    def provider(self, model: str) -> tuple[ModelProvider, str]:
        """The provider for `model` and the name to put in requests. Raises ValueError for a model
        string that does not parse, and for a script that is gone or no longer allowed."""
        spec = parse_model(model)
        if spec.provider != "scripted":
            if spec.provider not in self._http:
                provider, _ = create_provider(model)
                self._http[spec.provider] = LimitedProvider(
                    self._observed(provider, spec.provider), self._generate, self._stats)
            return self._http[spec.provider], spec.name
        try:
            self.scripts.available(spec.name, check=not self.trusted(model))
        except ScriptError as exc:
            raise ValueError(str(exc)) from None
        limited = self._scripted.get(model)
        if limited is None:
            scripted = ScriptFileProvider(spec.name, self.scripts, checked=not self.trusted(model))
            limited = self._scripted[model] = LimitedProvider(
                self._observed(scripted, "scripted"), self._generate, self._stats)
            while len(self._scripted) > MAX_SCRIPTED_PROVIDERS:
                self._scripted.popitem(last=False)
        self._scripted.move_to_end(model)
        return limited, spec.name

    def _observed(self, provider: ModelProvider, kind: str) -> ModelProvider:
        # Inside the limiter: the figures are the model's, not the wait for a Generate slot.
        return ObservedProvider(provider, kind, self._telemetry) if self._telemetry is not None else provider

    def provider_count(self) -> int:
        return len(self._http) + len(self._scripted)

    async def aclose(self) -> None:
        for provider in [*self._http.values(), *self._scripted.values()]:
            with contextlib.suppress(Exception):
                await provider.aclose()
        self._http.clear()
        self._scripted.clear()
