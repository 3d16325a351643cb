"""Session settings: defaults, limits, and validation that names the offending field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from session_server.llm.factory import load_script, parse_model
from session_server.llm.script import ScriptError

DEFAULT_MAX_TURNS = 50
MAX_MAX_TURNS = 1000
DEFAULT_QUERY_CONCURRENCY = 8
MAX_QUERY_CONCURRENCY = 256
DEFAULT_QUERY_TIMEOUT = 60.0
DEFAULT_EXECUTE_TIMEOUT = 600.0
MAX_LANE_TIMEOUT = 24 * 3600.0
DEFAULT_MAX_ATTEMPTS = 3
MAX_MAX_ATTEMPTS = 10
DEFAULT_SYSTEM_PROMPT = (
    "You are a coding agent working in a repository. Use the tools to inspect and change files. "
    "Call several read-only tools at once when you can: they run in parallel."
)


class InvalidArgument(ValueError):
    """A request field is out of range; `field` names it as the client sent it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class SessionSettings:
    model: str
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_turns: int = DEFAULT_MAX_TURNS
    query_concurrency: int = DEFAULT_QUERY_CONCURRENCY
    query_timeout: float = DEFAULT_QUERY_TIMEOUT
    execute_timeout: float = DEFAULT_EXECUTE_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionSettings:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class SettingsRequest:
    """What a client asked for; zero values mean "the default"."""

    model: str = ""
    system_prompt: str = ""
    max_turns: int = 0
    query_concurrency: int = 0
    query_timeout: float | None = None
    execute_timeout: float | None = None
    max_attempts: int = 0
    # Lane modes other than internal, and permission rules, as the client sent them; each
    # unsupported one is refused by name.
    unsupported: list[tuple[str, str]] = field(default_factory=list)


def resolve_workspace(workspace: str) -> Path:
    if not workspace.strip():
        raise InvalidArgument("workspace", "is empty: give the path of a directory on the server's machine")
    path = Path(workspace).expanduser()
    if not path.is_absolute():
        raise InvalidArgument("workspace", f"{workspace!r} is not an absolute path")
    if not path.is_dir():
        raise InvalidArgument("workspace", f"{workspace} does not exist or is not a directory on the server")
    return path.resolve()


def validate_model(model: str) -> None:
    try:
        spec = parse_model(model)
    except ValueError as exc:
        raise InvalidArgument("config.model", str(exc)) from None
    if spec.provider == "scripted":
        try:
            load_script(spec.name)
        except ScriptError as exc:
            raise InvalidArgument("config.model", str(exc)) from None


def _bounded(field_name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidArgument(field_name, f"{value:g} is out of range [{low:g}, {high:g}]")


def build_settings(request: SettingsRequest, default_model: str) -> SessionSettings:
    """Defaults filled in, every field checked. Raises InvalidArgument naming the field."""
    for field_name, message in request.unsupported:
        raise InvalidArgument(field_name, message)
    model = request.model or default_model
    if not model:
        raise InvalidArgument("config.model", "is empty and the server has no default model (--model)")
    validate_model(model)
    _bounded("config.max_turns", request.max_turns, 0, MAX_MAX_TURNS)
    _bounded("config.queue.query_concurrency", request.query_concurrency, 0, MAX_QUERY_CONCURRENCY)
    _bounded("config.queue.max_attempts", request.max_attempts, 0, MAX_MAX_ATTEMPTS)
    if request.query_timeout is not None:
        _bounded("config.queue.lanes.timeout", request.query_timeout, 0.001, MAX_LANE_TIMEOUT)
    if request.execute_timeout is not None:
        _bounded("config.queue.lanes.timeout", request.execute_timeout, 0.001, MAX_LANE_TIMEOUT)
    return SessionSettings(
        model=model,
        system_prompt=request.system_prompt or DEFAULT_SYSTEM_PROMPT,
        max_turns=request.max_turns or DEFAULT_MAX_TURNS,
        query_concurrency=request.query_concurrency or DEFAULT_QUERY_CONCURRENCY,
        query_timeout=request.query_timeout or DEFAULT_QUERY_TIMEOUT,
        execute_timeout=request.execute_timeout or DEFAULT_EXECUTE_TIMEOUT,
        max_attempts=request.max_attempts or DEFAULT_MAX_ATTEMPTS,
    )
