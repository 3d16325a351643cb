"""Tools' argument schemas: checked once when a tool is offered, then compiled into validators
that never retrieve anything.

A schema comes from a worker's Hello (a stranger's program) or from a plugin. Left to itself,
jsonschema resolves a reference it cannot find in the schema by retrieving its URI, with a
blocking urlopen and no timeout: an `http://` `$ref` stood the server's event loop still, a
`file://` one read the server's own files into an error result the model reads. Here a schema's
references must resolve within the schema itself (`check` refuses it otherwise), and validators
are given a registry that retrieves nothing, so no schema can make a process fetch a URL or read a
file.

jsonschema matches `pattern` and `patternProperties` with Python's `re`, a backtracking engine:
a worker's `{"pattern": "^(a+)+$"}` and a model's 35-character argument held the server's event
loop for minutes (a thread would not help: `re` holds the GIL). Validators here match them with
RE2, in time linear in the input, and `check` refuses a pattern RE2 does not take (backreferences,
lookaround) and the one use of patterns left to jsonschema's `re`: `patternProperties` in a schema
that also has `unevaluatedProperties`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

import re2
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource, Unresolvable
from referencing.jsonschema import DRAFT202012

from tool_worker.tools.globs import re2_text

log = logging.getLogger(__name__)

# The keywords by which the dialects jsonschema knows refer to another schema: `$ref` (all of
# them), `$dynamicRef` (2020-12) and `$recursiveRef` (2019-09).
REFERENCE_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")
# What an error quotes of a reference: a Hello's status message is cut at 1 KiB.
MAX_QUOTED_REFERENCE_CHARS = 200


def _retrieve_nothing(uri: str) -> NoReturn:
    raise NoSuchResource(ref=uri)


# jsonschema adds its bundled meta-schemas to the registry it is given: a validator compiled with
# this one resolves those and the schema's own contents, and looks nowhere else.
NO_RETRIEVAL: Registry[Any] = Registry(retrieve=_retrieve_nothing)  # type: ignore[call-arg]


_QUIET = re2.Options()
_QUIET.log_errors = False  # a pattern RE2 refuses is said in the refusal, not on stderr


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> Any:
    """`pattern` compiled by RE2 (re2.error when RE2 does not take it)."""
    return re2.compile(re2_text(pattern), options=_QUIET)


def _search(pattern: str, text: str) -> bool:
    return _regex(pattern).search(re2_text(text)) is not None


def _pattern(validator: Any, pattern: str, instance: Any, schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: Mapping[str, Any], instance: Any,
                        schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


_additional_properties_of_jsonschema = Draft202012Validator.VALIDATORS["additionalProperties"]


def _additional_properties(validator: Any, additional: Any, instance: Any,
                           schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    """jsonschema's own, unless patternProperties beside it would be matched with `re`."""
    if "patternProperties" not in schema:
        yield from _additional_properties_of_jsonschema(validator, additional, instance, schema)
        return
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema["patternProperties"])
    extras = [key for key in instance if key not in properties and not any(_search(p, key) for p in patterns)]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        names = ", ".join(map(repr, sorted(extras)))
        regexes = ", ".join(map(repr, sorted(schema["patternProperties"])))
        yield ValidationError(f"{names} {'does' if len(extras) == 1 else 'do'} not match any of the regexes: {regexes}")


_Validator = validators.extend(Draft202012Validator, {
    "pattern": _pattern, "patternProperties": _pattern_properties, "additionalProperties": _additional_properties,
})


def compile_validator(parameters: Mapping[str, Any]) -> Draft202012Validator:
    """A validator of `parameters` that resolves references only within it, and matches its
    patterns with RE2."""
    return _Validator(parameters, registry=_own_registry(DRAFT202012.create_resource(parameters)))


def _own_registry(root: Resource[Any]) -> Registry[Any]:
    """A registry of `root` and the subschemas it names with an `$id`, retrieving nothing.

    Crawled once here: a registry asked for a URI it does not hold crawls the whole schema again,
    at every reference. A schema of 3,000 `$id`s and as many references to them took 4 minutes to
    check, and a call of 300 of its properties 21 s to validate, on the server's event loop."""
    return NO_RETRIEVAL.with_resource(root.id() or "", root).crawl()


def check(parameters: Mapping[str, Any]) -> None:
    """ValueError when `parameters` cannot be a tool's argument schema: not a valid JSON Schema
    (draft 2020-12), nested too deeply to check, or holding a reference that does not resolve
    within it. Its message follows "the schema", e.g. "is not a valid JSON Schema: ..."."""
    try:
        Draft202012Validator.check_schema(parameters)
    except SchemaError as exc:
        raise ValueError(f"is not a valid JSON Schema: {exc.message}") from None
    except RecursionError:
        # The check recurses per level of the schema: a few hundred levels of "not" are a bad
        # schema, not an error of the process checking it.
        raise ValueError("is nested too deeply to check") from None
    problem = _reference_problem(parameters) or _pattern_problem(parameters)
    if problem is not None:
        raise ValueError(problem)
    allowed = parameters.get("type", "object")
    if allowed != "object" and not (isinstance(allowed, list) and "object" in allowed):
        # A model's arguments are always a JSON object: no call of such a tool could ever run.
        raise ValueError(f"allows no JSON object (its type is {json.dumps(allowed)}), but a tool's arguments are "
                         "always an object: make its type \"object\"")


def _reference_problem(parameters: Mapping[str, Any]) -> str | None:
    """Why one of the references of `parameters` does not resolve within it; None when all do.

    Every place jsonschema may read as a schema is visited: the subschemas, and what each
    reference points at (which may be inside an "enum" or an unknown keyword, never visited as a
    subschema). The registry holds this schema alone, not even the meta-schemas: a reference
    resolves here only to the schema's own contents."""
    root = DRAFT202012.create_resource(parameters)
    pending = [(root, _own_registry(root).resolver(root.id() or ""))]
    seen: set[int] = set()
    while pending:
        resource, resolver = pending.pop()
        contents = resource.contents
        if not isinstance(contents, Mapping) or id(contents) in seen:
            continue
        seen.add(id(contents))
        for keyword in REFERENCE_KEYWORDS:
            reference = contents.get(keyword)
            if not isinstance(reference, str):
                continue
            quoted = f"{keyword} {_quoted(reference)}"
            try:
                resolved = resolver.lookup(reference)
            # Besides Unresolvable, a JSON pointer that indexes an array with a word or descends
            # into a number raises ValueError or TypeError.
            except (Unresolvable, LookupError, TypeError, ValueError):
                return (
                    f"has {quoted}, which does not resolve within the schema: codelane retrieves no "
                    'schema from elsewhere (no URL, no file); put the schema it refers to under "$defs" '
                    'and refer to it as "#/$defs/NAME"'
                )
            if not isinstance(resolved.contents, Mapping | bool):
                return f"has {quoted}, which points at a {type(resolved.contents).__name__}, not a schema"
            pending.append((Resource.from_contents(resolved.contents, DRAFT202012), resolved.resolver))
        for subresource in resource.subresources():
            pending.append((subresource, resolver.in_subresource(subresource)))
    return None


def _pattern_problem(parameters: Mapping[str, Any]) -> str | None:
    """Why a pattern of `parameters` cannot be matched in linear time (see the module); None when
    all can. Every object of the schema is looked at: a `pattern` that is only a property's name
    (`"properties": {"pattern": {...}}`) is an object, not a string, and is passed by."""
    pending: list[Any] = [parameters]
    evaluates_unevaluated = uses_pattern_properties = False
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
            continue
        if not isinstance(node, Mapping):
            continue
        pattern = node.get("pattern")
        patterns = [pattern] if isinstance(pattern, str) else []
        if isinstance(node.get("patternProperties"), Mapping):
            uses_pattern_properties = True
            patterns += [key for key in node["patternProperties"] if isinstance(key, str)]
        evaluates_unevaluated = evaluates_unevaluated or "unevaluatedProperties" in node
        for each in patterns:
            try:
                _regex(each)
            except re2.error as exc:
                why = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
                return (f"has the pattern {_quoted(each)}, which RE2 does not take ({why}): codelane matches "
                        "patterns in linear time, without backreferences or lookaround")
        pending.extend(node.values())
    if evaluates_unevaluated and uses_pattern_properties:
        return ("has patternProperties and unevaluatedProperties together, which codelane cannot check in "
                "linear time: drop one of them")
    return None


def _quoted(reference: str) -> str:
    if len(reference) <= MAX_QUOTED_REFERENCE_CHARS:
        return repr(reference)
    return f"{reference[:MAX_QUOTED_REFERENCE_CHARS]!r}..."


def argument_problem(name: str, validator: Draft202012Validator, arguments: dict[str, Any]) -> str | None:
    """Why `arguments` do not match the schema of tool `name`, as the model should read it; None
    when they do. Whatever goes wrong while checking them is such a reason, never an exception:
    a schema that got through `check` may still hold a reference that resolves to nothing a
    validator can read, or refer to itself without end."""
    try:
        error = best_match(validator.iter_errors(arguments))
    except Unresolvable:
        return (
            f"the arguments of {name} cannot be checked: its schema has a reference that does not resolve "
            "within the schema (codelane retrieves none from elsewhere); this tool cannot be called until its "
            "schema is fixed"
        )
    except RecursionError:
        return (
            f"the arguments of {name} are nested too deeply to check against its schema (or the schema refers "
            "to itself without end)"
        )
    except Exception as exc:
        log.warning("checking the arguments of %s against its schema failed", name, exc_info=True)
        return (
            f"the arguments of {name} cannot be checked against its schema ({type(exc).__name__}); this tool "
            "cannot be called until its schema is fixed"
        )
    if error is None:
        return None
    where = f" at {error.json_path!r}" if error.path else ""
    return f"invalid arguments for {name}{where}: {error.message}"
