"""Tools' argument schemas, compiled into validators that never retrieve anything.

A schema comes from a worker's Hello (a stranger's program) or from a plugin. Left to itself,
jsonschema resolves a reference it cannot find in the schema by retrieving its URI, with a
blocking urlopen and no timeout: an `http://` `$ref` stood the server's event loop still, a
`file://` one read the server's own files into an error result the model reads. Here validators
are given a registry that retrieves nothing, so no schema can make a process fetch a URL or read a
file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NoReturn

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.exceptions import NoSuchResource, Unresolvable

log = logging.getLogger(__name__)


def _retrieve_nothing(uri: str) -> NoReturn:
    raise NoSuchResource(ref=uri)


# jsonschema adds its bundled meta-schemas to the registry it is given: a validator compiled with
# this one resolves those and the schema's own contents, and looks nowhere else.
NO_RETRIEVAL: Registry[Any] = Registry(retrieve=_retrieve_nothing)  # type: ignore[call-arg]


def compile_validator(parameters: Mapping[str, Any]) -> Draft202012Validator:
    """A validator of `parameters` that resolves references only within it."""
    return Draft202012Validator(parameters, registry=NO_RETRIEVAL)


def argument_problem(name: str, validator: Draft202012Validator, arguments: dict[str, Any]) -> str | None:
    """Why `arguments` do not match the schema of tool `name`, as the model should read it; None
    when they do. Whatever goes wrong while checking them is such a reason, never an exception:
    a schema may hold a reference that resolves to nothing a validator can read, or refer to
    itself without end."""
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
