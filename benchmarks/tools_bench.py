"""Tool overhead against bare ripgrep on a generated ~50 MB source tree.

    python -m benchmarks.tools_bench [--size-mb 50] [--keep DIR] [--repeat 9]

Each case runs the tool through `ToolRegistry.execute` (JSON parsing, schema validation, the rg
subprocess, sorting and formatting) and rg alone with the same flags, output captured, and
prints the medians and their ratio. Target: ratio <= 1.5.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import count
from tool_worker.registry import ToolRegistry
from tool_worker.tools.grep import rg_arguments
from tool_worker.tools.rg import BASE_ARGS, rg_binary

TARGET_RATIO = 1.5
SEED = 20240611
_MARKER = ".tools_bench_tree_v2"
_WORDS = (
    "user account session token request response handler config loader parser cache store "
    "client server worker queue task event stream buffer record index query result error retry "
    "backoff timeout lease slot lane schedule dispatch commit history message payload encode "
    "decode validate resolve path file directory walk match pattern search rank score"
).split()


def _identifier(rng: random.Random, style: str) -> str:
    words = rng.sample(_WORDS, rng.randint(1, 3))
    if style == "camel":
        return words[0] + "".join(word.title() for word in words[1:])
    return "_".join(words)


def _python_file(rng: random.Random, target_bytes: int) -> str:
    parts = [f'"""Module about {" ".join(rng.sample(_WORDS, 4))}."""\n\nimport os\nimport json\n\n']
    size = len(parts[0])
    while size < target_bytes:
        name = _identifier(rng, "snake")
        kind = rng.random()
        prefix = "handle_" if kind < 0.05 else ""
        lines = [f"def {prefix}{name}({_identifier(rng, 'snake')}, {_identifier(rng, 'snake')}=None):"]
        lines.append(f'    """Return the {" ".join(rng.sample(_WORDS, 3))}."""')
        for _ in range(rng.randint(3, 12)):
            lines.append(f"    {_identifier(rng, 'snake')} = {_identifier(rng, 'snake')}({rng.randint(0, 999)})")
        if rng.random() < 0.1:
            lines.append("    # TODO: handle the retry backoff here")
        lines.append(f"    return {_identifier(rng, 'snake')}\n\n")
        chunk = "\n".join(lines)
        parts.append(chunk)
        size += len(chunk)
    return "".join(parts)


def _js_file(rng: random.Random, target_bytes: int) -> str:
    parts = [f"// {' '.join(rng.sample(_WORDS, 5))}\n'use strict';\n\n"]
    size = len(parts[0])
    while size < target_bytes:
        lines = [f"export function {_identifier(rng, 'camel')}({_identifier(rng, 'camel')}) {{"]
        for _ in range(rng.randint(3, 10)):
            lines.append(f"  const {_identifier(rng, 'camel')} = {_identifier(rng, 'camel')}({rng.randint(0, 99)});")
        lines.append(f"  return {_identifier(rng, 'camel')};\n}}\n\n")
        chunk = "\n".join(lines)
        parts.append(chunk)
        size += len(chunk)
    return "".join(parts)


def generate_tree(root: Path, size_mb: int) -> None:
    """A deterministic tree of Python and JS files in nested directories, plus ignored output."""
    rng = random.Random(SEED)
    budget = size_mb * 1024 * 1024
    written = 0
    index = 0
    (root / ".gitignore").write_text("build/\nnode_modules/\n*.log\n")
    # About ten files per directory, nested up to four deep, as in a typical repository.
    directories = [
        root.joinpath(*(f"{rng.choice(_WORDS)}_{rng.randint(0, 9)}" for _ in range(rng.randint(1, 4))))
        for _ in range(size_mb * 8)
    ]
    while written < budget:
        directory = rng.choice(directories)
        directory.mkdir(parents=True, exist_ok=True)
        target = rng.randint(2_000, 24_000)
        if rng.random() < 0.6:
            prefix = "test_" if rng.random() < 0.15 else ""
            path, text = directory / f"{prefix}{_identifier(rng, 'snake')}_{index}.py", _python_file(rng, target)
        else:
            path, text = directory / f"{_identifier(rng, 'camel')}{index}.js", _js_file(rng, target)
        path.write_text(text)
        written += len(text)
        index += 1
    # Ignored content that a tool must not list or search.
    for ignored in ("build", "node_modules/lib"):
        directory = root / ignored
        directory.mkdir(parents=True, exist_ok=True)
        for number in range(50):
            (directory / f"generated_{number}.py").write_text(_python_file(rng, 8_000))
    (root / "debug.log").write_text("handle_ TODO\n" * 1000)
    (root / _MARKER).write_text(str(size_mb))


def _tree(keep: str | None, size_mb: int) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    if keep:
        root = Path(keep)
        marker = root / _MARKER
        if marker.exists() and marker.read_text() == str(size_mb):
            return root, None
        root.mkdir(parents=True, exist_ok=True)
        generate_tree(root, size_mb)
        return root, None
    holder = tempfile.TemporaryDirectory(prefix="codelane-bench-")
    generate_tree(Path(holder.name), size_mb)
    return Path(holder.name), holder


def paired_medians(tool: Callable[[], object], direct: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median ms of each, run alternately so that load on the machine hits both alike."""
    tool()
    direct()  # warm: page cache, thread pool, first-call imports
    samples: tuple[list[float], list[float]] = ([], [])
    for index in range(repeat):
        pair = (tool, direct) if index % 2 == 0 else (direct, tool)
        for run in pair:
            started = time.perf_counter()
            run()
            samples[run is direct].append(time.perf_counter() - started)
    return statistics.median(samples[0]) * 1000, statistics.median(samples[1]) * 1000


def _rg(root: Path, flags: list[str]) -> Callable[[], object]:
    argv = [rg_binary(), *BASE_ARGS, *flags]
    return lambda: subprocess.run(argv, cwd=root, stdin=subprocess.DEVNULL, capture_output=True, check=False)


CASES: list[tuple[str, str, dict[str, object], list[str]]] = [
    # (label, tool, tool arguments, rg flags run directly)
    ("grep files_with_matches", "grep", {"pattern": r"def handle_\w+"}, []),
    ("grep content -n", "grep", {"pattern": "TODO", "output_mode": "content"}, []),
    ("grep content, many lines", "grep", {"pattern": "return", "output_mode": "content"}, []),
    ("grep count -i, glob *.py", "grep", {"pattern": "retry", "output_mode": "count", "-i": True, "glob": "*.py"}, []),
    ("glob **/*.py", "glob", {"pattern": "**/*.py"}, ["--files", "--null"]),
    ("glob **/test_*.py", "glob", {"pattern": "**/test_*.py"}, ["--files", "--null"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--keep", help="build the tree here, or reuse the one already there")
    parser.add_argument("--repeat", type=count, default=9)
    options = parser.parse_args()

    started = time.perf_counter()
    root, holder = _tree(options.keep, options.size_mb)
    files = sum(1 for path in root.rglob("*") if path.is_file())
    print(f"tree: {root} ({options.size_mb} MB, {files} files, ready in {time.perf_counter() - started:.1f} s)")

    registry = ToolRegistry.builtin()
    loop = asyncio.new_event_loop()
    rows = []
    try:
        for label, tool, arguments, flags in CASES:
            arguments_json = json.dumps(arguments)

            def call_tool(tool: str = tool, arguments_json: str = arguments_json) -> object:
                result = loop.run_until_complete(registry.execute(tool, root, arguments_json))
                assert not result.is_error, result.output
                return result

            rg_flags = rg_arguments(arguments) if tool == "grep" else flags
            tool_ms, rg_ms = paired_medians(call_tool, _rg(root, rg_flags), options.repeat)
            rows.append((label, tool_ms, rg_ms, tool_ms / rg_ms))
    finally:
        loop.close()
        if holder is not None:
            holder.cleanup()

    print(f"\n{'case':<28} {'tool ms':>9} {'rg ms':>9} {'ratio':>7}  target <= {TARGET_RATIO}")
    for label, tool_ms, rg_ms, ratio in rows:
        verdict = "ok" if ratio <= TARGET_RATIO else "SLOW"
        print(f"{label:<28} {tool_ms:>9.2f} {rg_ms:>9.2f} {ratio:>7.2f}  {verdict}")


if __name__ == "__main__":
    main()
