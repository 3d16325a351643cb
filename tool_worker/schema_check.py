"""A fast pre-check for tool arguments, compiled from the common subset of JSON Schema.

jsonschema takes tens of microseconds to validate one call; this check takes one or two and
decides most calls alone. It is sound one way only: True means jsonschema would accept the
arguments too. False, or a schema using anything outside the subset (no check is compiled),
sends the call to jsonschema, which stays the authority and writes the error message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any], bool]

# Keywords that never make an instance invalid.
_ANNOTATIONS = frozenset({"description", "title", "default", "examples", "$comment", "$schema"})
_VALUE_KEYWORDS = frozenset(
    {"type", "minimum", "maximum", "minLength", "maxLength", "enum", "items", "minItems", "maxItems"}
)
# Exact types: json.loads builds no subclasses, and `type(x) is int` keeps bools out of integers.
# A float like 1.0 (an integer for jsonschema) just falls back to jsonschema.
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}
_BOUNDS_BY_TYPE = {
    "string": {"minLength", "maxLength", "enum"},
    "integer": {"minimum", "maximum"},
    "number": {"minimum", "maximum"},
    "array": {"items", "minItems", "maxItems"},
    "boolean": set(),
    "object": set(),
}


def compile_check(schema: Mapping[str, Any]) -> Callable[[dict[str, Any]], bool] | None:
    """A check for an object schema of simple properties, or None if the schema is beyond it."""
    if schema.get("type") != "object" or set(schema) - _ANNOTATIONS - {
        "type",
        "properties",
        "required",
        "additionalProperties",
    }:
        return None
    allow_others = schema.get("additionalProperties", True)
    if not isinstance(allow_others, bool):
        return None
    properties: dict[str, Check] = {}
    for name, subschema in schema.get("properties", {}).items():
        check = _compile_value(subschema)
        if check is None:
            return None
        properties[name] = check
    required = tuple(schema.get("required", ()))

    def check_object(instance: dict[str, Any]) -> bool:
        for name in required:
            if name not in instance:
                return False
        for name, value in instance.items():
            check = properties.get(name)
            if check is None:
                if not allow_others:
                    return False
            elif not check(value):
                return False
        return True

    return check_object


def _compile_value(schema: Any) -> Check | None:
    if not isinstance(schema, Mapping):
        return None
    keywords = set(schema) - _ANNOTATIONS
    kind = schema.get("type")
    if not keywords:
        return lambda _value: True
    if not isinstance(kind, str) or kind not in _TYPES:
        return None
    if keywords - _VALUE_KEYWORDS or keywords - {"type"} - _BOUNDS_BY_TYPE[kind]:
        return None
    exact = _TYPES[kind]
    checks: list[Check] = []
    if "enum" in schema:
        if not all(type(member) is str for member in schema["enum"]):
            return None
        members = frozenset(schema["enum"])
        checks.append(lambda value: value in members)
    if "minLength" in schema or "minItems" in schema:
        low = schema.get("minLength", schema.get("minItems"))
        checks.append(lambda value: len(value) >= low)
    if "maxLength" in schema or "maxItems" in schema:
        high = schema.get("maxLength", schema.get("maxItems"))
        checks.append(lambda value: len(value) <= high)
    if "minimum" in schema:
        minimum = schema["minimum"]
        checks.append(lambda value: value >= minimum)
    if "maximum" in schema:
        maximum = schema["maximum"]
        checks.append(lambda value: value <= maximum)
    if "items" in schema:
        item_check = _compile_value(schema["items"])
        if item_check is None:
            return None
        checks.append(lambda value: all(item_check(item) for item in value))

    def check_value(value: Any) -> bool:
        if type(value) not in exact:
            return False
        for check in checks:
            if not check(value):
                return False
        return True

    return check_value
