"""Session settings: defaults, limits, and validation that names the offending field."""

from __future__ import annotations

import enum
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from session_server.external import DEFAULT_EXTERNAL_TASK_TIMEOUT
from session_server.llm.base import DEFAULT_MAX_TOKENS
from session_server.llm.factory import parse_model
from session_server.permissions import DEFAULT_CONFIRMATION_TIMEOUT, PermissionPolicy, PolicyError
from tool_worker.confinement.policy import (
    MIN_CPU_SECONDS,
    MIN_MEMORY,
    MIN_OPEN_FILES,
    MIN_PROCESSES,
    NetworkAccess,
    ResourceLimits,
    SandboxMode,
    SandboxPolicy,
    SandboxSettings,
)
from tool_worker.confinement.protected import NEVER_TOUCHED
from tool_worker.tools.base import Lane

DEFAULT_MAX_TURNS = 50
MAX_MAX_TURNS = 1000
MAX_MAX_OUTPUT_TOKENS = 1_000_000
DEFAULT_QUERY_CONCURRENCY = 8
MAX_QUERY_CONCURRENCY = 256
DEFAULT_QUERY_TIMEOUT = 60.0
DEFAULT_EXECUTE_TIMEOUT = 600.0
MAX_LANE_TIMEOUT = 24 * 3600.0
DEFAULT_MAX_ATTEMPTS = 3
MAX_MAX_ATTEMPTS = 10
MAX_EXTERNAL_TASK_TIMEOUT = 24 * 3600.0
MAX_CONFIRMATION_TIMEOUT = 24 * 3600.0
MAX_ENV_VARIABLES = 100
MAX_ENV_BYTES = 64 * 1024
MAX_SYSTEM_PROMPT_CHARS = 256 * 1024
# Rules of each list of a permission policy (allow, deny, ask). Each is parsed on the event loop,
# at creation and whenever the session is read, and checked against every call: 10 million fit
# in one request, which held every client up for about 25 s before the stored size refused them.
MAX_PERMISSION_RULES = 1000
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DEFAULT_SYSTEM_PROMPT = (
    "You are a coding agent working in a repository. Use the tools to inspect and change files. "
    "Call several read-only tools at once when you can: they run in parallel."
)


class InvalidArgument(ValueError):
    """A request field is out of range; `field` names it as the client sent it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class LaneMode(enum.StrEnum):
    """Who runs the calls of a lane. Mirrors codelane.v1.LaneMode."""

    # codelane runs them.
    INTERNAL = "internal"
    # Clients claim them as external tasks, run them, and complete them.
    EXTERNAL = "external"
    # codelane runs them and also announces them as external task events (not claimable).
    HYBRID = "hybrid"


@dataclass
class SessionSettings:
    model: str
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_turns: int = DEFAULT_MAX_TURNS
    max_output_tokens: int = DEFAULT_MAX_TOKENS
    query_concurrency: int = DEFAULT_QUERY_CONCURRENCY
    query_timeout: float = DEFAULT_QUERY_TIMEOUT
    execute_timeout: float = DEFAULT_EXECUTE_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    query_mode: LaneMode = LaneMode.INTERNAL
    execute_mode: LaneMode = LaneMode.INTERNAL
    external_task_timeout: float = DEFAULT_EXTERNAL_TASK_TIMEOUT
    permissions: PermissionPolicy = field(default_factory=PermissionPolicy)
    sandbox: SandboxPolicy = field(default_factory=SandboxPolicy)

    def lane_mode(self, lane: Lane) -> LaneMode:
        return self.query_mode if lane is Lane.QUERY else self.execute_mode

    def lane_timeout(self, lane: Lane) -> float:
        return self.query_timeout if lane is Lane.QUERY else self.execute_timeout

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (the store keeps it as the session's config)."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["query_mode"] = self.query_mode.value
        data["execute_mode"] = self.execute_mode.value
        data["permissions"] = self.permissions.to_dict()
        data["sandbox"] = {
            "mode": self.sandbox.mode.value,
            "network": self.sandbox.network.value,
            "limits": asdict(self.sandbox.limits),
            "env": dict(self.sandbox.env),
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], default_sandbox: SandboxPolicy | None = None) -> SessionSettings:
        """Reads `to_dict`'s output; keys a newer or older server wrote are ignored or defaulted.
        `default_sandbox`: the policy of a session stored before sandboxes existed (releases before
        2026-12-03 stored none), the server's default as a session created now gets: without it,
        the built-in workspace-write, whatever --sandbox the operator chose."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("query_mode", "execute_mode"):
            if key in known:
                known[key] = LaneMode(known[key])
        if "permissions" in known:
            known["permissions"] = PermissionPolicy.from_dict(known["permissions"])
        if "sandbox" in known:
            stored = known["sandbox"]
            known["sandbox"] = SandboxPolicy(
                mode=SandboxMode(stored["mode"]),
                network=NetworkAccess(stored["network"]),
                limits=ResourceLimits(**stored["limits"]),
                env=tuple(sorted(stored["env"].items())),
            )
        elif default_sandbox is not None:
            known["sandbox"] = default_sandbox
        return cls(**known)


@dataclass
class PermissionsRequest:
    """A permission policy as the client sent it; empty actions mean the defaults."""

    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    ask: list[str] = field(default_factory=list)
    # "allow", "deny", "ask"; "" means allow.
    default_action: str = ""
    confirmation_timeout: float | None = None
    # "allow" or "deny"; "" means deny.
    timeout_action: str = ""


@dataclass
class SandboxRequest:
    """A sandbox policy as the client sent it; empty or zero values mean the server's defaults.
    Modes are SandboxMode / NetworkAccess values; unknown numbers arrive as their text."""

    mode: str = ""
    network: str = ""
    max_processes: int = 0
    max_memory_bytes: int = 0
    max_cpu_seconds: float | None = None
    max_open_files: int = 0


@dataclass
class SettingsRequest:
    """What a client asked for; zero values mean "the default"."""

    model: str = ""
    system_prompt: str = ""
    max_turns: int = 0
    max_output_tokens: int = 0
    query_concurrency: int = 0
    query_timeout: float | None = None
    execute_timeout: float | None = None
    # The request fields the lane timeouts came from (their index in the client's list of lanes),
    # which an out-of-range one is refused by.
    query_timeout_field: str = "config.queue.lanes.timeout"
    execute_timeout_field: str = "config.queue.lanes.timeout"
    max_attempts: int = 0
    query_mode: LaneMode | None = None
    execute_mode: LaneMode | None = None
    external_task_timeout: float | None = None
    permissions: PermissionsRequest | None = None
    sandbox: SandboxRequest | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Values the api layer could not even translate (an unknown lane or mode), refused by field name.
    unsupported: list[tuple[str, str]] = field(default_factory=list)


# Longer than any path the kernel accepts: refused before it reaches the file system.
MAX_WORKSPACE_BYTES = 4096


def resolve_workspace(workspace: str, roots: Sequence[Path] = (), data_dir: Path | None = None) -> Path:
    """The workspace with its symlinks resolved. With `roots` (the server's --workspace-root, each
    already resolved), it must lie inside one of them, which is checked after resolving, so a link
    cannot lead out. It may be neither `data_dir` (resolved) nor inside it: the tools keep out of
    a data directory inside a workspace, but one that holds the workspace would be all of it.
    Raises InvalidArgument("workspace", ...)."""
    if not workspace.strip():
        raise InvalidArgument("workspace", "is empty: give the path of a directory on the server's machine")
    if len(workspace.encode("utf-8", "surrogateescape")) > MAX_WORKSPACE_BYTES or "\0" in workspace:
        raise InvalidArgument(
            "workspace", f"is not a usable path (longer than {MAX_WORKSPACE_BYTES} bytes, or with a NUL byte)"
        )
    path = Path(workspace)
    try:
        path = path.expanduser()
    except RuntimeError:
        pass  # `~user` of no user on this machine: left as written, a relative path refused below
    if not path.is_absolute():
        raise InvalidArgument("workspace", f"{workspace!r} is not an absolute path")
    try:
        real = path.resolve()
        is_dir = real.is_dir()
    except (OSError, RuntimeError):
        is_dir = False
    if roots and (not is_dir or not any(real == root or root in real.parents for root in roots)):
        # Whether a path outside the roots exists is none of the client's business.
        raise InvalidArgument(
            "workspace", f"{workspace} is not inside a directory this server allows sessions in "
            f"(--workspace-root: {', '.join(map(str, roots))})"
        )
    if not is_dir:
        raise InvalidArgument("workspace", f"{workspace} does not exist or is not a directory on the server")
    refuse_server_paths(real, data_dir)
    return real


def refuse_server_paths(workspace: Path, data_dir: Path | None) -> None:
    """Raises InvalidArgument("workspace", ...) if the resolved `workspace` is, or lies in, what no
    session may work in whatever the roots: the server's data directory, or what no tool touches."""
    if data_dir is not None and (workspace == data_dir or data_dir in workspace.parents):
        raise InvalidArgument(
            "workspace", f"{workspace} is in the server's data directory, which holds every session's history; "
            "give the directory of a project instead"
        )
    for never in map(Path, NEVER_TOUCHED):
        if workspace == never or never in workspace.parents:
            # /proc/self is the server's own: its environment holds the keys and tokens.
            raise InvalidArgument("workspace", f"{workspace} is in {never}, which no tool reads (the server's "
                                               "processes, their environment and flags); give the directory of "
                                               "a project")


def _bounded(field_name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidArgument(field_name, f"{value:g} is out of range [{low:g}, {high:g}]")


def build_settings(
    request: SettingsRequest,
    default_model: str,
    known_tools: Collection[str] | None = None,
    sandbox: SandboxSettings | None = None,
) -> SessionSettings:
    """Defaults filled in, every field checked, the sandbox policy within what the operator's
    `sandbox` settings allow. Raises InvalidArgument naming the field.

    The model string is checked for its form only; whether this client may use it, and whether
    its script loads, is `session_server.models.Models.check`, which reads files (off the event
    loop). With `known_tools`, permission rules must name one of them.
    """
    for field_name, message in request.unsupported:
        raise InvalidArgument(field_name, message)
    model = request.model or default_model
    if not model:
        raise InvalidArgument(
            "config.model", "is empty and the server has no default model: name one for the session (codelane run "
            "--model provider:name), or start the server with --model",
        )
    try:
        parse_model(model)
    except ValueError as exc:
        raise InvalidArgument("config.model", str(exc)) from None
    if len(request.system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
        raise InvalidArgument(
            "config.system_prompt",
            f"is {len(request.system_prompt):,} characters; at most {MAX_SYSTEM_PROMPT_CHARS:,}: put long "
            "instructions in a file of the workspace and tell the model to read it",
        )
    _bounded("config.max_turns", request.max_turns, 0, MAX_MAX_TURNS)
    _bounded("config.max_output_tokens", request.max_output_tokens, 0, MAX_MAX_OUTPUT_TOKENS)
    _bounded("config.queue.query_concurrency", request.query_concurrency, 0, MAX_QUERY_CONCURRENCY)
    _bounded("config.queue.max_attempts", request.max_attempts, 0, MAX_MAX_ATTEMPTS)
    if request.query_timeout is not None:
        _bounded(request.query_timeout_field, request.query_timeout, 0.001, MAX_LANE_TIMEOUT)
    if request.execute_timeout is not None:
        _bounded(request.execute_timeout_field, request.execute_timeout, 0.001, MAX_LANE_TIMEOUT)
    if request.external_task_timeout is not None:
        _bounded("config.queue.external_task_timeout", request.external_task_timeout, 0.001,
                 MAX_EXTERNAL_TASK_TIMEOUT)
    return SessionSettings(
        model=model,
        system_prompt=request.system_prompt or DEFAULT_SYSTEM_PROMPT,
        max_turns=request.max_turns or DEFAULT_MAX_TURNS,
        max_output_tokens=request.max_output_tokens or DEFAULT_MAX_TOKENS,
        query_concurrency=request.query_concurrency or DEFAULT_QUERY_CONCURRENCY,
        query_timeout=request.query_timeout or DEFAULT_QUERY_TIMEOUT,
        execute_timeout=request.execute_timeout or DEFAULT_EXECUTE_TIMEOUT,
        max_attempts=request.max_attempts or DEFAULT_MAX_ATTEMPTS,
        query_mode=request.query_mode or LaneMode.INTERNAL,
        execute_mode=request.execute_mode or LaneMode.INTERNAL,
        external_task_timeout=request.external_task_timeout or DEFAULT_EXTERNAL_TASK_TIMEOUT,
        permissions=build_policy(request.permissions, known_tools),
        sandbox=build_sandbox_policy(request.sandbox, request.env, sandbox or SandboxSettings()),
    )


def build_sandbox_policy(
    request: SandboxRequest | None, env: dict[str, str], server: SandboxSettings
) -> SandboxPolicy:
    """The session's sandbox policy: the server's defaults where unset, never beyond what the
    server allows. Raises InvalidArgument naming e.g. config.sandbox.limits.max_processes."""
    request = request or SandboxRequest()
    mode = server.default_mode
    if request.mode:
        try:
            mode = SandboxMode(request.mode)
        except ValueError:
            raise InvalidArgument(
                "config.sandbox.mode", f"{request.mode} is not a SandboxMode (WORKSPACE_WRITE, READ_ONLY, OFF)"
            ) from None
    if mode is SandboxMode.OFF and not server.allow_unsandboxed:
        raise InvalidArgument(
            "config.sandbox.mode",
            "OFF is not allowed: this server confines every command (its operator can allow OFF with "
            "--allow-unsandboxed)",
        )
    network = NetworkAccess.OFF
    if request.network:
        try:
            network = NetworkAccess(request.network)
        except ValueError:
            raise InvalidArgument(
                "config.sandbox.network", f"{request.network} is not a SandboxNetwork (OFF, ON)"
            ) from None
    if network is NetworkAccess.ON and mode is not SandboxMode.OFF and not server.allow_network:
        raise InvalidArgument(
            "config.sandbox.network",
            "ON is not allowed: this server gives commands no network (its operator can allow it with "
            "--sandbox-allow-network)",
        )
    most = server.limits
    cpu = request.max_cpu_seconds or 0
    if cpu != int(cpu):
        # RLIMIT_CPU counts whole seconds: rounding would give a limit nobody asked for.
        raise InvalidArgument("config.sandbox.limits.max_cpu_time",
                              f"{cpu:g}s is not a whole number of seconds (RLIMIT_CPU counts seconds); "
                              f"ask for at least {MIN_CPU_SECONDS}s, in whole seconds")
    limits = ResourceLimits(
        processes=_limit("max_processes", request.max_processes, MIN_PROCESSES, most.processes),
        memory_bytes=_limit("max_memory_bytes", request.max_memory_bytes, MIN_MEMORY, most.memory_bytes),
        cpu_seconds=_limit("max_cpu_time", int(cpu), MIN_CPU_SECONDS, most.cpu_seconds),
        open_files=_limit("max_open_files", request.max_open_files, MIN_OPEN_FILES, most.open_files),
    )
    return SandboxPolicy(mode=mode, network=network, limits=limits, env=_checked_env(env))


def _limit(name: str, value: int, low: int, server_max: int) -> int:
    """A requested limit (0: the server's); the server's value is also the most a session may ask."""
    if value == 0:
        return server_max
    if not low <= value <= server_max:
        raise InvalidArgument(
            f"config.sandbox.limits.{name}", f"{value} is out of range [{low}, {server_max}] (the server's limit)"
        )
    return value


def _checked_env(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    if len(env) > MAX_ENV_VARIABLES:
        raise InvalidArgument("config.env", f"has {len(env)} variables; at most {MAX_ENV_VARIABLES}")
    size = 0
    for name, value in env.items():
        shown = name if len(name) <= 40 else name[:40] + "..."
        if not _ENV_NAME.fullmatch(name):
            raise InvalidArgument(
                f"config.env[{shown!r}]", "is not a variable name (letters, digits and _, not starting with a digit)"
            )
        if "\0" in value:
            raise InvalidArgument(f"config.env[{shown!r}]", "contains a NUL character")
        size += len(name.encode()) + len(value.encode()) + 2
    if size > MAX_ENV_BYTES:
        raise InvalidArgument("config.env", f"holds {size} bytes; at most {MAX_ENV_BYTES}")
    return tuple(sorted(env.items()))


def build_policy(request: PermissionsRequest | None, known_tools: Collection[str] | None = None) -> PermissionPolicy:
    """The policy with defaults filled in. Raises InvalidArgument naming e.g. config.permissions.deny[1]."""
    if request is None:
        return PermissionPolicy()
    for name in ("allow", "deny", "ask"):
        count = len(getattr(request, name))
        if count > MAX_PERMISSION_RULES:
            raise InvalidArgument(f"config.permissions.{name}", f"has {count:,} rules; at most "
                                  f"{MAX_PERMISSION_RULES:,}: one glob can cover many paths or commands")
    timeout = request.confirmation_timeout
    if timeout is not None:
        _bounded("config.permissions.confirmation_timeout", timeout, 0.001, MAX_CONFIRMATION_TIMEOUT)
    try:
        return PermissionPolicy.parse(
            allow=request.allow,
            deny=request.deny,
            ask=request.ask,
            default_action=request.default_action or "allow",
            confirmation_timeout=timeout or DEFAULT_CONFIRMATION_TIMEOUT,
            timeout_action=request.timeout_action or "deny",
            known_tools=known_tools,
        )
    except PolicyError as exc:
        raise InvalidArgument(f"config.permissions.{exc.field}", exc.message) from None
