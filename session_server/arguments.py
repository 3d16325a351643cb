"""The server's check of a call's arguments against its tool's advertised schema, before dispatch.

A worker is a stranger's program: the server does not rely on it to check what the model sent.
Every call whose arguments are not a JSON object matching its tool's `parameters` schema (the
spec the model was given, a worker's from its Hello) ends with an INVALID_ARGUMENTS result and
is never sent anywhere.

Validators are compiled once per spec, as the registry does for its own tools: a call whose
arguments pass the fast pre-check (`tool_worker.schema_check`) never reaches jsonschema. They
resolve references only within the spec's schema (`tool_worker.schemas`): checking a call
retrieves nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from tool_worker import schemas
from tool_worker.schema_check import compile_check
from tool_worker.tools.base import ToolSpec

# Specs whose validators are kept. Built-in specs live for the process; a worker's live as long
# as it is connected, so this only needs to hold the specs of the workers connected at once.
MAX_COMPILED_SPECS = 512

_Compiled = tuple[ToolSpec, Draft202012Validator, Callable[[dict[str, Any]], bool] | None]


def check_schema(name: str, parameters: Mapping[str, Any]) -> None:
    """Raises ValueError when `parameters` is not a valid JSON Schema (draft 2020-12), or refers
    to what it does not hold (see `tool_worker.schemas.check`)."""
    try:
        schemas.check(parameters)
    except ValueError as exc:
        raise ValueError(f"tool {name!r}: parameters_json_schema {exc}") from None


class ArgumentChecker:
    """Checks calls' arguments against their tools' specs, caching compiled validators per spec."""

    def __init__(self, capacity: int = MAX_COMPILED_SPECS) -> None:
        self._capacity = capacity
        # By id(spec): a spec's parameters are a dict (unhashable), and hashing the schema on
        # every call would cost more than the check. The entry holds the spec, so its id is not
        # reused while cached.
        self._compiled: OrderedDict[int, _Compiled] = OrderedDict()

    def problem(self, spec: ToolSpec, arguments: dict[str, Any]) -> str | None:
        """Why `arguments` do not match the spec's schema, as the model should read it; None when
        they do."""
        _, validator, fast_check = self._entry(spec)
        if fast_check is not None and fast_check(arguments):
            return None
        return schemas.argument_problem(spec.name, validator, arguments)

    def _entry(self, spec: ToolSpec) -> _Compiled:
        key = id(spec)
        entry = self._compiled.get(key)
        if entry is not None and entry[0] is spec:
            self._compiled.move_to_end(key)
            return entry
        try:
            validator = schemas.compile_validator(spec.parameters)
            validator.check_schema(spec.parameters)
        except SchemaError:
            # Specs with a broken schema are refused at a worker's Hello and at registration; one
            # that slipped through validates like an empty schema rather than failing every call.
            validator = schemas.compile_validator({})
        entry = (spec, validator, compile_check(spec.parameters))
        self._compiled[key] = entry
        if len(self._compiled) > self._capacity:
            self._compiled.popitem(last=False)
        return entry


# One per process: specs are shared across sessions.
ARGUMENTS = ArgumentChecker()
