"""The workloads of `codelane bench`: generated trees, the calls of each workload, and their scripts.

Every workload is one model response asking for a fixed list of tool calls, then a final answer.
The same list is replayed in every mode and handed to every peer, so every run makes exactly the
same calls (`signature()` identifies the list; runs record what they actually executed).

- L (light): 11 `glob` calls on a mid-size tree;
- H (heavy): 8 `grep` calls over a large tree (~200 MB in a full run);
- R (remote-like): 16 `sleep` calls with a fixed service time (200 ms by default): the plugin
  tool of `benchmarks.plugin_tools`, standing in for remote storage or GPU inference;
- M (mixed): reads, two writes and a read of each written file right after its write;
- T (tiny): 40 reads of small files and 10 small greps: the calls coding agents make most,
  where codelane's own cost per call is what decides whether running them in parallel pays.

Trees are generated deterministically (`benchmarks.tools_bench.generate_tree`) into a cache
directory outside the repository and reused while their marker matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import resource
import shutil
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.tools_bench import generate_tree
from tool_worker.confinement.launcher import default_sandbox
from tool_worker.registry import ToolRegistry
from tool_worker.tools.base import Lane
from tool_worker.tools.grep import rg_invocation
from tool_worker.tools.rg import run_rg

PLUGIN_MODULE = "benchmarks.plugin_tools"
RG_ALONE_PASSES = 4
TREE_VERSION = "codelane-bench-tree-v1"
# Where the scratch files of M go.
SCRATCH_DIR = "var/bench/tmp/scratch"
DEFAULT_CACHE = Path(os.environ.get("CODELANE_BENCH_CACHE", Path.home() / ".cache" / "codelane-bench"))


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, sort_keys=True)


def canonical(name: str, arguments: Any) -> tuple[str, str]:
    """(name, arguments as sorted-key JSON): the identity of a call, whoever executed it."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            return name, arguments
    return name, json.dumps(arguments, sort_keys=True)


def signature(calls: Iterable[tuple[str, str]]) -> str:
    """A short hash of a multiset of canonical calls (order does not matter: peers finish in any)."""
    digest = hashlib.sha256(json.dumps(sorted(calls)).encode()).hexdigest()
    return digest[:16]


@dataclass
class Workload:
    key: str
    title: str
    description: str
    workspace: Path
    calls: list[Call]
    # "wait": the service time is fixed and uses no core (R); "cpu": the tools compete for cores.
    kind: str
    service_time: float | None = None
    # Files that M writes (relative to the workspace), with the text that proves a read saw the write.
    writes: dict[str, str] = field(default_factory=dict)
    tree: dict[str, Any] = field(default_factory=dict)
    # CPU seconds (this process and its children, rg included) the calls take when run one after
    # the other in-process; None until `calibrate()`; not measured for "wait" workloads.
    cpu_seconds: float | None = None
    # For a workload of grep calls: ripgrep alone (the tool's own rg command lines, no codelane),
    # median seconds with the searches run one after another and all at once.
    rg_alone: dict[str, float] | None = None

    @property
    def prompt(self) -> str:
        return f"codelane bench workload {self.key}"

    def signature(self) -> str:
        return signature(canonical(c.name, c.arguments) for c in self.calls)

    def lanes(self, registry: ToolRegistry) -> list[Lane]:
        lanes = []
        for call in self.calls:
            tool = registry.get(call.name)
            if tool is None:
                raise ValueError(f"workload {self.key}: unknown tool {call.name!r}")
            lanes.append(tool.spec.lane)
        return lanes

    def script(self) -> dict[str, Any]:
        """The mock model's script: the calls in one response, then a final answer."""
        return {
            "responses": [
                {
                    "text": f"Workload {self.key}: {len(self.calls)} tool calls.",
                    "tool_calls": [
                        {"id": f"call_{index}", "name": c.name, "arguments": c.arguments}
                        for index, c in enumerate(self.calls)
                    ],
                },
                {"text": f"Workload {self.key} done."},
            ]
        }

    def reset(self) -> None:
        """Before every run: remove what the previous run wrote, so each run starts alike and a
        read that ran before its write fails instead of reading the previous run's file."""
        for relative in self.writes:
            with contextlib.suppress(FileNotFoundError):
                (self.workspace / relative).unlink()

    def order_ok(self, executed: Sequence[tuple[str, dict[str, Any], str, bool]]) -> bool | None:
        """For M: did every read of a written file see the write? None for other workloads.

        `executed` holds (tool, arguments, output, is_error) of every call run.
        """
        if not self.writes:
            return None
        for path, mark in self.writes.items():
            reads = [(out, err) for name, args, out, err in executed
                     if name == "read" and args.get("file_path") == path]
            if not reads or any(err or mark not in out for out, err in reads):
                return False
        return True


# -- trees -------------------------------------------------------------------------------------


def _tree_stats(root: Path) -> dict[str, Any]:
    files = 0
    size = 0
    for directory, _, names in os.walk(root):
        for name in names:
            files += 1
            with contextlib.suppress(OSError):
                size += os.stat(os.path.join(directory, name)).st_size
    return {"path": str(root), "files": files, "bytes": size, "mb": round(size / 1024 / 1024, 1)}


def ensure_tree(cache: Path, size_mb: int, log=print) -> Path:
    """The generated source tree of `size_mb`, built once into the cache (atomically) and reused."""
    root = cache / "trees" / f"src-{size_mb}mb"
    marker = root / ".codelane_bench_tree"
    if marker.exists() and marker.read_text() == f"{TREE_VERSION} {size_mb}":
        return root
    cache.joinpath("trees").mkdir(parents=True, exist_ok=True)
    staging = cache / "trees" / f".src-{size_mb}mb.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    started = time.perf_counter()
    log(f"generating a {size_mb} MB source tree in {root} (once; cached) ...")
    generate_tree(staging, size_mb)
    (staging / ".codelane_bench_tree").write_text(f"{TREE_VERSION} {size_mb}")
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    log(f"  done in {time.perf_counter() - started:.1f} s")
    return root


def _source_files(root: Path, suffix: str, count: int) -> list[str]:
    """The first `count` files with this suffix, in sorted path order, outside ignored dirs."""
    found = []
    for directory, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("build", "node_modules") and not d.startswith("."))
        for name in sorted(names):
            if name.endswith(suffix):
                found.append(os.path.relpath(os.path.join(directory, name), root))
                if len(found) == count:
                    return found
    return found


def _top_dirs(root: Path) -> list[str]:
    return sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir() and entry.name not in ("build", "node_modules") and not entry.name.startswith(".")
    )


# -- the workloads -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    l_mb: int = 40
    h_mb: int = 200
    m_mb: int = 2
    sleep_ms: int = 200
    r_calls: int = 16


def light(root: Path) -> Workload:
    first, second = [*_top_dirs(root), ".", "."][:2]
    patterns: list[dict[str, Any]] = [
        {"pattern": "**/*.py"},
        {"pattern": "**/test_*.py"},
        {"pattern": "**/*.js"},
        {"pattern": "**/*Config*.js"},
        {"pattern": "**/*handler*.py"},
        {"pattern": "**/*retry*"},
        {"pattern": "**/*_1?.py"},
        {"pattern": "*.{py,js}"},
        {"pattern": "**/*.py", "path": first},
        {"pattern": "**/test_*", "path": second},
        {"pattern": "**/*Cache*.js"},
    ]
    return Workload(
        "L", "light", "one turn of 11 glob calls on a mid-size tree", root,
        [Call("glob", p) for p in patterns], "cpu", tree=_tree_stats(root),
    )


def heavy(root: Path) -> Workload:
    greps: list[dict[str, Any]] = [
        {"pattern": r"def handle_\w+"},
        {"pattern": "TODO", "output_mode": "content", "head_limit": 100},
        {"pattern": "retry", "-i": True, "output_mode": "count", "glob": "*.py"},
        {"pattern": r"export function \w+Config", "type": "js"},
        {"pattern": r"return \w+_\w+_\w+", "output_mode": "content", "head_limit": 50},
        {"pattern": r"^import json", "output_mode": "files_with_matches"},
        {"pattern": r"\(\d{3}\)", "output_mode": "count"},
        {"pattern": "lease.*timeout", "-i": True},
    ]
    return Workload(
        "H", "heavy", "8 grep calls over a large generated tree", root,
        [Call("grep", g) for g in greps], "cpu", tree=_tree_stats(root),
    )


def remote(root: Path, sleep_ms: int, calls: int) -> Workload:
    return Workload(
        "R", "remote-like", f"{calls} calls of the plugin `sleep` tool, a fixed {sleep_ms} ms service time each",
        root, [Call("sleep", {"ms": sleep_ms}) for _ in range(calls)], "wait", service_time=sleep_ms / 1000,
    )


def mixed(root: Path) -> Workload:
    files = _source_files(root, ".py", 6)
    if len(files) < 6:
        raise RuntimeError(f"the M tree {root} has fewer than 6 Python files")
    notes, summary = f"{SCRATCH_DIR}/notes.md", f"{SCRATCH_DIR}/summary.txt"
    writes = {notes: "BENCH-MARK notes v1", summary: "BENCH-MARK summary v1"}
    body = "".join(f"line {n}: the retry backoff lease of slot {n % 7}\n" for n in range(20))
    calls = [
        Call("read", {"file_path": files[0]}),
        Call("read", {"file_path": files[1]}),
        Call("read", {"file_path": files[2]}),
        Call("write", {"file_path": notes, "content": f"# {writes[notes]}\n{body}"}),
        Call("read", {"file_path": notes}),
        Call("read", {"file_path": files[3]}),
        Call("read", {"file_path": files[4]}),
        Call("write", {"file_path": summary, "content": f"{writes[summary]}\n{body}"}),
        Call("read", {"file_path": summary}),
        Call("read", {"file_path": files[5]}),
        Call("glob", {"pattern": "**/*.py"}),
    ]
    return Workload(
        "M", "mixed", "reads, 2 writes and a read right after each write (11 calls)", root, calls, "cpu",
        writes=writes, tree=_tree_stats(root),
    )


def tiny(root: Path) -> Workload:
    files = _source_files(root, ".py", 40)
    if len(files) < 40:
        raise RuntimeError(f"the T tree {root} has fewer than 40 Python files")
    directories = [*_top_dirs(root), "."]
    patterns = ["def ", "return", "import", "class ", "retry", "lease", "slot", "TODO", "json", "self"]
    calls = [Call("read", {"file_path": f}) for f in files]
    calls += [
        Call("grep", {"pattern": p, "path": directories[i % len(directories)], "output_mode": "content",
                      "head_limit": 20})
        for i, p in enumerate(patterns)
    ]
    return Workload(
        "T", "tiny", "40 reads of small files and 10 small greps in one turn", root, calls, "cpu",
        tree=_tree_stats(root),
    )


WORKLOAD_KEYS = ("L", "H", "R", "M", "T")


def build_workloads(keys: Sequence[str], cache: Path, sizes: Sizes, log=print) -> list[Workload]:
    """The workloads named by `keys`, their trees generated (or found) in `cache`."""
    work = cache / "work"
    out: list[Workload] = []
    for key in keys:
        if key == "L":
            out.append(light(ensure_tree(cache, sizes.l_mb, log)))
        elif key == "H":
            out.append(heavy(ensure_tree(cache, sizes.h_mb, log)))
        elif key == "R":
            root = work / "R"
            root.mkdir(parents=True, exist_ok=True)
            (root / "README.md").write_text("Workspace of workload R: the sleep tool reads nothing.\n")
            out.append(remote(root, sizes.sleep_ms, sizes.r_calls))
        elif key == "M":
            # A private copy: M writes into it, and the shared trees must stay as generated.
            source = ensure_tree(cache, sizes.m_mb, log)
            root = work / f"M-{sizes.m_mb}mb"
            if not (root / ".codelane_bench_tree").exists():
                shutil.rmtree(root, ignore_errors=True)
                shutil.copytree(source, root, symlinks=True)
            (root / SCRATCH_DIR).mkdir(parents=True, exist_ok=True)
            workload = mixed(root)
            workload.reset()
            out.append(workload)
        elif key == "T":
            # Read-only: the generated small tree itself.
            out.append(tiny(ensure_tree(cache, sizes.m_mb, log)))
        else:
            raise ValueError(f"unknown workload {key!r}; known: {', '.join(WORKLOAD_KEYS)}")
    return out


def bench_registry() -> ToolRegistry:
    """The codelane tool implementations the peers call: the built-ins plus the plugin tools."""
    registry = ToolRegistry.builtin()
    registry.load_module(PLUGIN_MODULE)
    return registry


def _cpu_now() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


async def _calibrate(workloads: Sequence[Workload], passes: int) -> None:
    registry = bench_registry()
    for workload in workloads:
        if workload.kind != "cpu":
            continue
        samples = []
        for _ in range(passes + 1):  # the first pass warms the page cache and imports
            workload.reset()
            before = _cpu_now()
            for call in workload.calls:
                await registry.execute(call.name, workload.workspace, call.arguments_json)
            samples.append(_cpu_now() - before)
        workload.cpu_seconds = min(samples[1:])
        workload.reset()
        if workload.calls and all(call.name == "grep" for call in workload.calls):
            workload.rg_alone = await _rg_alone(workload)


async def _rg_alone(workload: Workload) -> dict[str, float]:
    """Times the grep calls' own rg command lines, one after another and all at once: how much
    running the searches side by side can gain when nothing but rg runs."""
    commands = [rg_invocation(workload.workspace, call.arguments)[:2] for call in workload.calls]
    launcher = default_sandbox().read_only
    sequential, concurrent = [], []
    for _ in range(RG_ALONE_PASSES + 1):  # the first pass warms the page cache
        started = time.perf_counter()
        for args, cwd in commands:
            await run_rg(args, cwd, launcher)
        sequential.append(time.perf_counter() - started)
        started = time.perf_counter()
        await asyncio.gather(*(run_rg(args, cwd, launcher) for args, cwd in commands))
        concurrent.append(time.perf_counter() - started)
    return {"sequential": statistics.median(sequential[1:]), "concurrent": statistics.median(concurrent[1:])}


def calibrate(workloads: Sequence[Workload], passes: int = 2) -> None:
    """Measures each CPU-bound workload's CPU time: the floor of its wall time is that / cores,
    whatever runs the calls (rg already runs one thread per core)."""
    asyncio.run(_calibrate(workloads, passes))
