"""The set of tools a process offers, and the one place where a call's arguments are checked.

`execute` is on the hot path of every call: validators are compiled once, at registration, and
a call whose arguments pass the fast pre-check (`schema_check`) never reaches jsonschema, which
costs tens of microseconds per call.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from tool_worker import schemas
from tool_worker.confinement.launcher import Sandbox, default_sandbox
from tool_worker.confinement.policy import SandboxPolicy
from tool_worker.plugins import ToolHost
from tool_worker.schema_check import compile_check
from tool_worker.tools import (
    bash,
    copy,
    delete,
    edit,
    execute,
    glob,
    grep,
    list_files,
    ls,
    move,
    read,
    search,
    write,
)
from tool_worker.tools.base import ErrorKind, Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec

_BUILTIN_TOOLS: tuple[Tool, ...] = (
    read.TOOL,
    glob.TOOL,
    grep.TOOL,
    ls.TOOL,
    list_files.TOOL,
    search.TOOL,
    bash.TOOL,
    execute.TOOL,
    write.TOOL,
    edit.TOOL,
    delete.TOOL,
    move.TOOL,
    copy.TOOL,
)


# What OpenAI and Anthropic accept as a tool name (the hub refuses a worker's other names): a
# name outside it would fail every model request of every session it is offered to.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _spec_problem(spec: ToolSpec) -> str | None:
    """What makes a plugin's spec one no model request or Hello can carry, as a phrase that
    follows "its spec"; None when it is sound. A worker found out only when its Hello failed to
    encode: a traceback, after connecting, and the hub never heard why."""
    if not isinstance(spec.name, str) or not TOOL_NAME.fullmatch(spec.name):
        return "name is not 1-64 letters, digits, '_' or '-' (what model APIs accept)"
    if not isinstance(spec.description, str):
        return f"description is a {type(spec.description).__name__}, not a str"
    if not isinstance(spec.lane, Lane):
        return f"lane is {spec.lane!r}, not a Lane (Lane.QUERY or Lane.EXECUTE)"
    if not isinstance(spec.idempotent, bool):
        return f"idempotent is a {type(spec.idempotent).__name__}, not a bool"
    labels = spec.required_labels
    if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return "required_labels is not a mapping of str to str"
    if not isinstance(spec.parameters, Mapping):
        return f"parameters is a {type(spec.parameters).__name__}, not a JSON Schema object (a dict)"
    try:
        spec.parameters_json()
    except (TypeError, ValueError, RecursionError) as exc:
        return f"parameters cannot be written as JSON ({type(exc).__name__}: {exc})"
    return None


def _failure(exc: BaseException) -> str:
    """An exception raised by a plugin's own code, in one line: its type, message and the line of
    the plugin that raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


# The built-ins' own functions: their results are right by construction, and are not checked
# on the hot path as a plugin's are (`_result_problem`).
_BUILTIN_RUNS = frozenset(tool.run for tool in _BUILTIN_TOOLS)
_ERROR_KINDS = frozenset(ErrorKind)
INT32 = range(-(2**31), 2**31)


def _result_problem(result: Any) -> str | None:
    """What makes a plugin tool's result one codelane cannot carry, as a phrase that follows "the
    tool returned"; None when it is sound.

    A result is sent to the hub, stored in the session's events and history and read by the model:
    a wrong type went wrong far from the tool. On a worker a str output reached the hub as an
    empty success; run in the server, an unknown error kind or an exit code past 32 bits failed
    every read of the session's events, and metadata JSON cannot write stopped the event log."""
    if not isinstance(result, ToolResult):
        return f"a {type(result).__name__}, not a ToolResult"
    if type(result.output) is not str:
        return f"a ToolResult whose output is a {type(result.output).__name__}, not a str"
    if type(result.is_error) is not bool or type(result.truncated) is not bool:
        return "a ToolResult whose is_error or truncated is not a bool"
    if result.error_kind is not None and result.error_kind not in _ERROR_KINDS:
        return f"a ToolResult whose error_kind {result.error_kind!r} is not an ErrorKind"
    if result.exit_code is not None and (type(result.exit_code) is not int or result.exit_code not in INT32):
        return f"a ToolResult whose exit_code {result.exit_code!r} is not a 32-bit int"
    if not isinstance(result.metadata, dict):
        return f"a ToolResult whose metadata is a {type(result.metadata).__name__}, not a dict"
    if result.metadata:
        try:
            # As the worker sends it (tool_worker.wire): what JSON has no type for is its text.
            json.dumps(result.metadata, default=str)
        except (TypeError, ValueError, RecursionError) as exc:
            return f"a ToolResult whose metadata JSON cannot write ({type(exc).__name__}: {exc})"
    return None


def _integral(value: Any) -> Any:
    return int(value) if type(value) is float and value.is_integer() else value


_Entry = tuple[Tool, Draft202012Validator, Callable[[dict[str, Any]], bool] | None]


@functools.lru_cache(maxsize=256)
def _context(
    workspace: Path | str, denied_paths: tuple[str, ...], sandbox: Sandbox, policy: SandboxPolicy
) -> ToolContext:
    # Contexts are immutable and a process serves a few workspaces and policies: one per set (a
    # worker passes the workspace as the string it received, which saves building a Path per
    # call). The denied paths and the sandbox policy are part of the key: two sessions of one
    # workspace may differ.
    return ToolContext(workspace=Path(workspace), denied_paths=denied_paths, sandbox=sandbox, policy=policy)


def parse_arguments(arguments_json: str) -> tuple[dict[str, Any] | None, str]:
    """A call's arguments as a dict, or None and what is wrong with them, as a phrase that
    follows "its arguments" (the model reads it)."""
    # Some model APIs send no argument text at all for a call without arguments; "{}" is the
    # commonest text of all and skips the parser.
    if arguments_json == "{}" or not arguments_json or arguments_json.isspace():
        return {}, ""
    try:
        arguments = json.loads(arguments_json)
    except json.JSONDecodeError as exc:
        return None, f"are not valid JSON ({exc})"
    except RecursionError:  # a model's "[[[[..." deeper than the parser goes
        return None, "are nested too deeply to read"
    except ValueError:
        # Not a JSONDecodeError (caught above): Python refuses to read an integer longer than its
        # limit. A model's 5,000 digits are a bad call, not the end of the turn.
        digits = sys.get_int_max_str_digits()
        return None, f"hold an integer of more than {digits:,} digits; write such a number as a string"
    if not isinstance(arguments, dict):
        return None, f"must be a JSON object, not {type(arguments).__name__}"
    return arguments, ""


class ToolRegistry:
    """Tools by name, each with its compiled argument validators, and the sandbox their
    processes run in (the process's default one unless given)."""

    def __init__(self, tools: Iterable[Tool] = (), sandbox: Sandbox | None = None) -> None:
        self._entries: dict[str, _Entry] = {}
        self.sandbox = sandbox or default_sandbox()
        self._default_policy = self.sandbox.settings.default_policy()
        for tool in tools:
            self.register(tool)

    @classmethod
    def builtin(cls, sandbox: Sandbox | None = None) -> ToolRegistry:
        """A registry holding every built-in tool, Query and Execute."""
        return cls(_BUILTIN_TOOLS, sandbox)

    def register(self, tool: Tool) -> None:
        """Add one tool; ValueError if its name is taken, its spec holds what a model request or a
        Hello cannot carry, or its parameters are not a valid schema (or refer to what they do not
        hold: see `schemas.check`)."""
        if not isinstance(tool, Tool):
            raise ValueError(f"{tool!r} is not a Tool")
        problem = _spec_problem(tool.spec)
        if problem is not None:
            raise ValueError(f"tool {tool.spec.name!r} cannot be offered: its {problem}")
        if tool.name in self._entries:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        parameters = tool.spec.parameters
        try:
            schemas.check(parameters)
        except ValueError as exc:
            raise ValueError(f"tool {tool.name!r} has an invalid parameters schema: it {exc}") from None
        self._entries[tool.name] = (tool, schemas.compile_validator(parameters), compile_check(parameters))

    def load_module(self, module_name: str, host: ToolHost | None = None) -> None:
        """Import a plugin module and register its tools: its `TOOLS: list[Tool]`, or what its
        `load_tools(host)` returns when this process is a worker (`host` given; see
        `tool_worker.plugins`). A module with only `load_tools` registers nothing without a host.

        Nothing is registered unless all of them can be: ValueError when the module has neither,
        when an entry is not a Tool, when a name repeats (within it or with a tool already here),
        or when the module's own code fails (its import, or `load_tools`), saying how in one line;
        ImportError when it, or what it imports, is not installed.
        """
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise
        except Exception as exc:  # a SyntaxError, a RuntimeError of its own: the plugin's bug, said in one line
            raise ValueError(f"tool plugin {module_name!r} failed to import: {_failure(exc)}") from exc
        load_tools = getattr(module, "load_tools", None)
        if callable(load_tools):
            if host is None:
                return
            try:
                tools = load_tools(host)
            except Exception as exc:
                raise ValueError(f"tool plugin {module_name!r}: load_tools failed: {_failure(exc)}") from exc
        else:
            tools = getattr(module, "TOOLS", None)
        if tools is None:
            raise ValueError(
                f"tool plugin {module_name!r} has no TOOLS attribute; define TOOLS: list[Tool] "
                "(or load_tools(host) for worker-only tools)"
            )
        if not isinstance(tools, list | tuple) or not all(isinstance(tool, Tool) for tool in tools):
            raise ValueError(f"{module_name}.TOOLS must be a list of Tool objects")
        seen: set[str] = set()
        for tool in tools:
            problem = _spec_problem(tool.spec)
            if problem is not None:
                raise ValueError(
                    f"tool plugin {module_name!r}: tool {tool.spec.name!r} cannot be offered: its {problem}"
                )
            if tool.name in self._entries or tool.name in seen:
                raise ValueError(f"tool plugin {module_name!r}: a tool named {tool.name!r} already exists")
            seen.add(tool.name)
        for tool in tools:
            self.register(tool)

    def require_labels(self, name: str, labels: Mapping[str, str]) -> None:
        """Adds labels a worker must carry to be sent calls of `name`; KeyError for an unknown tool."""
        tool, validator, fast_check = self._entries[name]
        required = {**tool.spec.required_labels, **labels}
        spec = dataclasses.replace(tool.spec, required_labels=required)
        self._entries[name] = (dataclasses.replace(tool, spec=spec), validator, fast_check)

    def get(self, name: str) -> Tool | None:
        entry = self._entries.get(name)
        return entry[0] if entry else None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def cheaper_here(self, name: str, workspace: Path | str, arguments_json: str) -> bool:
        """Whether this call of `name` costs less to run in this process than to send to a worker
        (the tool's `cheaper_here`); False for a tool without one, arguments it cannot read, or an
        estimate that fails."""
        tool = self.get(name)
        if tool is None or tool.cheaper_here is None:
            return False
        arguments, _ = parse_arguments(arguments_json)
        try:
            return arguments is not None and tool.cheaper_here(Path(workspace), arguments)
        except Exception:
            # A plugin's estimate that fails: the call goes to a worker, as with no estimate. It
            # ended the call with an internal error, never run anywhere.
            return False

    def specs(self, lane: Lane | None = None) -> list[ToolSpec]:
        """Specs of the registered tools (only those of `lane`, if given), sorted by name."""
        return [
            tool.spec for _, (tool, _, _) in sorted(self._entries.items()) if lane is None or tool.spec.lane is lane
        ]

    async def execute(
        self,
        name: str,
        workspace: Path | str,
        arguments_json: str,
        denied_paths: tuple[str, ...] = (),
        *,
        policy: SandboxPolicy | None = None,
    ) -> ToolResult:
        """Run one call under a session's sandbox `policy` (the sandbox's default when None).
        Every failure becomes an error result; only cancellation propagates.

        `denied_paths` are the globs of the paths the session's policy denies reading (see
        `tool_worker.denied`): tools refuse to read them and leave them out of what they list.
        Execute-lane results carry the policy's mode in `metadata["sandbox"]`, so that a call run
        without a sandbox always says so.
        """
        started = time.perf_counter()
        policy = policy or self._default_policy
        result = await self._execute(name, workspace, arguments_json, denied_paths, policy)
        updates: dict[str, Any] = {"run_time": time.perf_counter() - started}
        entry = self._entries.get(name)
        if entry is not None and entry[0].spec.lane is Lane.EXECUTE:
            updates["metadata"] = {**result.metadata, "sandbox": policy.mode.value}
        return dataclasses.replace(result, **updates)

    async def _execute(
        self,
        name: str,
        workspace: Path | str,
        arguments_json: str,
        denied_paths: tuple[str, ...],
        policy: SandboxPolicy,
    ) -> ToolResult:
        entry = self._entries.get(name)
        if entry is None:
            return ToolResult.error(
                ErrorKind.UNKNOWN_TOOL, f"unknown tool {name!r}; available tools: {', '.join(self.names())}"
            )
        tool, validator, fast_check = entry
        arguments, problem = parse_arguments(arguments_json)
        if arguments is None:
            return ToolResult.error(ErrorKind.INVALID_ARGUMENTS, f"{name} was not run: its arguments {problem}")
        if fast_check is None or not fast_check(arguments):
            problem = schemas.argument_problem(name, validator, arguments)
            if problem is not None:
                return ToolResult.error(ErrorKind.INVALID_ARGUMENTS, problem)
            # jsonschema counts 3.0 as an integer; tools index and slice with their integers.
            arguments = {key: _integral(value) for key, value in arguments.items()}
        try:
            result = await tool.run(_context(workspace, denied_paths, self.sandbox, policy), arguments)
        except ToolFailure as exc:
            return ToolResult.error(exc.kind, str(exc))
        except OSError as exc:
            # The file system said no (a name too long, a file gone, a full disk): a plain error
            # the model can act on, not an internal failure.
            return ToolResult.error(ErrorKind.TOOL_ERROR, f"{name} failed: {exc.strerror or exc}")
        except (Exception, SystemExit) as exc:
            # SystemExit too: a plugin's library may call sys.exit (a command-line parser's usage
            # error, say). It is no Exception, and went out of the event loop: the process exited.
            return ToolResult.error(ErrorKind.INTERNAL, f"{name} failed unexpectedly: {type(exc).__name__}: {exc}")
        if tool.run not in _BUILTIN_RUNS:
            problem = _result_problem(result)
            if problem is not None:
                return ToolResult.error(
                    ErrorKind.INTERNAL, f"{name} failed: the tool returned {problem} (a bug in the tool)"
                )
            if result.error_kind is not None and type(result.error_kind) is not ErrorKind:
                # Its value as a str ("tool_error"): equal to the kind, but not one where the kind's
                # own attributes are read (the worker's metrics).
                result = dataclasses.replace(result, error_kind=ErrorKind(result.error_kind))
        return result
