"""The worker's command line: --require and --cache-dir."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tool_worker.registry import ToolRegistry
from tool_worker.worker import apply_requirements, build_parser, parse_requirement


def test_require_names_a_tool_and_its_labels() -> None:
    assert parse_requirement("semantic_search:accelerator=gpu,zone=eu") == (
        "semantic_search", {"accelerator": "gpu", "zone": "eu"}
    )


@pytest.mark.parametrize("text", ["accelerator=gpu", ":accelerator=gpu", "semantic_search:accelerator"])
def test_a_malformed_requirement_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_requirement(text)


def test_defaults_and_repeats(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["--connect", "h:1", "--cache-dir", str(tmp_path), "--require", "a:x=1", "--require", "b:y=2"]
    )
    assert args.cache_dir == tmp_path
    assert args.require == [("a", {"x": "1"}), ("b", {"y": "2"})]
    assert build_parser().parse_args(["--connect", "h:1"]).cache_dir.name == "codelane"


def test_a_bad_requirement_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--connect", "h:1", "--require", "semantic_search"])
    assert exited.value.code == 2
    assert "requirement 'semantic_search' is not TOOL:KEY=VALUE" in capsys.readouterr().err


def test_a_requirement_of_a_tool_not_offered_is_said_not_silently_ignored() -> None:
    registry = ToolRegistry.builtin()
    warnings = apply_requirements(registry, {"grep": {"tier": "fast"}, "semantic_serch": {"accelerator": "gpu"}})
    assert registry.get("grep").spec.required_labels == {"tier": "fast"}
    [warning] = warnings
    assert warning.startswith("--require names 'semantic_serch', which this worker does not offer: ignored")
    assert "grep" in warning


def test_a_requirement_of_an_execute_tool_is_said_a_worker_never_offers_one() -> None:
    # A worker's Hello carries its Query tools only (Execute calls run on the server), so
    # `--require bash:...` holds nothing; the warning's list of offered tools names no Execute tool.
    warnings = apply_requirements(ToolRegistry.builtin(), {"bash": {"accelerator": "gpu"}})
    [warning] = warnings
    assert warning.startswith("--require names 'bash', which this worker does not offer: ignored")
    offered = warning.split("(offered: ", 1)[1].rstrip(")").split(", ")
    assert offered == ["glob", "grep", "list_files", "ls", "read", "search"]
