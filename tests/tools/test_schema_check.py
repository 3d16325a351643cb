from __future__ import annotations

import itertools
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tool_worker.registry import ToolRegistry
from tool_worker.schema_check import compile_check

# Values of every JSON type, including the ones the fast check is conservative about.
SAMPLES: list[Any] = ["", "x", "*.py", "content", 0, -1, 1, 5, 10**6, 1.0, 2.5, True, False, None, [], ["a"], [1], {}]


def test_fast_check_never_accepts_what_jsonschema_rejects(registry: ToolRegistry) -> None:
    for spec in registry.specs():
        check = compile_check(spec.parameters)
        assert check is not None, f"{spec.name}: built-in schemas should stay inside the fast subset"
        validator = Draft202012Validator(spec.parameters)
        names = [*spec.parameters["properties"], "unknown"]
        for name, value in itertools.product(names, SAMPLES):
            required = {key: "x" for key in spec.parameters.get("required", [])}
            for instance in ({name: value}, {**required, name: value}):
                if check(instance):
                    assert validator.is_valid(instance), (spec.name, instance)


def test_typical_calls_take_the_fast_path(registry: ToolRegistry) -> None:
    calls = {
        "grep": {"pattern": "def \\w+", "output_mode": "content", "-i": True, "-C": 2, "head_limit": 10},
        "read": {"file_path": "a.py", "offset": 10, "limit": 5},
        "bash": {"command": "ls", "timeout": 1000},
        "execute": {"argv": ["ls", "-l"]},
        "ls": {"ignore": ["*.pyc"]},
        "edit": {"file_path": "a", "old_string": "x", "new_string": "", "replace_all": True},
    }
    for name, arguments in calls.items():
        tool = registry.get(name)
        assert tool is not None
        check = compile_check(tool.spec.parameters)
        assert check is not None and check(arguments), name


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"type": ["string", "null"]}}},
        {"type": "object", "properties": {"a": {"pattern": "^x"}}},
        {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}},
        {"type": "object", "oneOf": [{"required": ["a"]}]},
        {"type": "object", "properties": {"a": {"minimum": 1}}},
        {"type": "object", "properties": {"a": {"enum": [1, 2]}}},
    ],
)
def test_schemas_beyond_the_subset_get_no_fast_check(schema: dict[str, Any]) -> None:
    assert compile_check(schema) is None


async def test_integral_float_still_accepted_through_jsonschema(call: Any) -> None:
    result = await call("read", file_path="README.md", limit=1.0)
    assert not result.is_error and result.output.startswith("     1\t# Demo")
    sliced = await call("grep", pattern="load_config", head_limit=1.0)
    assert not sliced.is_error and sliced.output.startswith("src/app.py\n[showing files 1-1 of 2")
