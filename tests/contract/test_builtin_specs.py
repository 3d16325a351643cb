"""docs/protocol.md's specs of the server's Query tools are the code's (ToolRegistry.builtin()).

A worker that offers one of these names offers that tool, and the worker protocol gives it no
way to learn the spec: the page is where a foreign implementation reads it, so it must not drift.
After changing a built-in Query tool's spec, rewrite the block with

    python -m tests.contract.test_builtin_specs > /tmp/specs.md

and paste it between the page's markers.
"""

from __future__ import annotations

import json
from pathlib import Path

from tool_worker.registry import ToolRegistry
from tool_worker.tools.base import Lane, ToolSpec

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "protocol.md"
START = "<!-- The Query tools' specs, from ToolRegistry.builtin(): tests/contract/test_builtin_specs.py -->"
END = "<!-- End of the Query tools' specs -->"


def spec_json(spec: ToolSpec) -> dict:
    """A ToolSpec's fields by their proto names; parameters_json_schema as the JSON value its
    string holds."""
    return {
        "name": spec.name,
        "lane": f"LANE_{spec.lane.name}",
        "idempotent": spec.idempotent,
        "required_labels": dict(spec.required_labels),
        "description": spec.description,
        "parameters_json_schema": spec.parameters,
    }


def render() -> str:
    """The block between the markers, as the code has it."""
    parts = []
    for spec in ToolRegistry.builtin().specs(Lane.QUERY):
        text = json.dumps(spec_json(spec), indent=2, ensure_ascii=False)
        parts.append(f"#### `{spec.name}`\n\n```json\n{text}\n```\n")
    return "\n".join(parts)


def documented() -> str:
    page = DOCS.read_text(encoding="utf-8")
    assert page.count(START) == 1 and page.count(END) == 1, "the specs' markers are gone from docs/protocol.md"
    return page.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def test_the_pages_query_tool_specs_are_the_codes() -> None:
    specs = ToolRegistry.builtin().specs(Lane.QUERY)
    assert {s.name for s in specs} >= {"read", "grep", "glob", "ls", "list_files", "search"}
    blocks = [json.loads(block.split("```", 1)[0]) for block in documented().split("```json\n")[1:]]
    # Value by value first, for a readable failure; then the text, so the page stays as generated.
    assert [b["name"] for b in blocks] == [s.name for s in specs]
    for block, spec in zip(blocks, specs, strict=True):
        assert block == spec_json(spec), f"{spec.name}: docs/protocol.md differs from the code (see this module)"
    assert documented() == render(), "regenerate the block: python -m tests.contract.test_builtin_specs"


def test_the_names_worker_proto_calls_the_servers_query_tools_are_those_specified() -> None:
    proto = " ".join((REPO / "protos" / "codelane" / "v1" / "worker.proto").read_text(encoding="utf-8").split())
    names = [s.name for s in ToolRegistry.builtin().specs(Lane.QUERY)]
    assert "docs/protocol.md, \"The Query tools' specs\"" in proto.replace("// ", "")
    section = DOCS.read_text(encoding="utf-8").split("### The Query tools' specs\n", 1)[1].split(START, 1)[0]
    assert all(f"`{name}`" in section for name in names), section


if __name__ == "__main__":
    print(START)
    print()
    print(render(), end="")
    print()
    print(END)
