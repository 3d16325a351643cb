"""semantic_search: how well it finds code next to BM25 `search` and `grep`, and how fast it is.

    pip install -e '.[semantic]'
    python -m benchmarks.semantic_bench [--quick] [--tree-files 5000] [--no-evaluation] [--json FILE]
                                        [--cache-dir DIR]

It prints, measured in this one run:
- the evaluation (`benchmarks/semantic_eval.yaml`: questions over PyTorch's nn, optim and
  utils.data): recall@5 and MRR@10 of semantic_search, of the `search` tool (BM25) and of `grep`
  on the question's keywords (files ranked by matching lines), side by side; a hit is a result in
  an answer's file (the one level all three report), and for semantic_search also in its symbol.
  Target: semantic_search's recall@5 at least 20 points above search's. Recall is also shown for
  each half of the questions (odd and even positions in the file): ranking choices are tuned on
  half A and checked on half B;
- the model's load time in a new process, and the install size of the extra;
- building the index of a tree of `--tree-files` real source files (the first by path of this
  environment's site-packages), re-indexing after one file changes (the whole call that sees the
  change: walk, hash, chunk, embed, query; target <= 1 s), a worker restart on that index (from
  disk), and the query time with the index warm (p50 target <= 50 ms), on the device the model
  picked (a CUDA host reports its GPU).

`--quick` runs the evaluation on the questions answered inside optim, over that directory only,
and builds a 50-file tree: what CI runs to check that every figure is produced.
The tools run in-process through a `ToolRegistry`, as a worker runs them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tool_worker.confinement.readonly import ReadOnlyLauncher
from tool_worker.registry import ToolRegistry
from tool_worker.semantic.chunking import chunk_file
from tool_worker.semantic.embedder import detect_device, load_embedder
from tool_worker.semantic.tool import SemanticSearch, workspace_files
from tool_worker.tools.search import query_terms

EVAL_FILE = Path(__file__).with_name("semantic_eval.yaml")
TARGET_RECALL_GAIN = 0.20
TARGET_REINDEX_SECONDS = 1.0
TARGET_QUERY_P50_SECONDS = 0.050
RECALL_AT = 5
MRR_AT = 10
QUICK_TREE_FILES = 50
PROGRESS_SECONDS = 60.0
TOOLS = ("semantic_search", "search", "grep")


@dataclass(frozen=True)
class Answer:
    path: str
    symbol: str


@dataclass(frozen=True)
class Question:
    text: str
    answers: tuple[Answer, ...]
    # "A" for the 1st, 3rd, 5th... question of the file, "B" for the others. Ranking choices are
    # tuned on half A; half B checks that a choice did not merely fit A's questions.
    half: str = "A"


@dataclass(frozen=True)
class Found:
    """One result of a tool, as far as the evaluation can tell."""

    path: str
    # semantic_search names the symbol of each result.
    symbol: str = ""
    # search and grep show lines: the search's best lines of a file, grep's matching lines.
    lines: frozenset[int] = frozenset()


@dataclass
class Scores:
    """Recall@5 and MRR@10 at two levels: the answer's file, and the answer itself (its symbol for
    semantic_search; for search and grep, a line they show inside the symbol's lines)."""

    file_recall: float = 0.0
    file_mrr: float = 0.0
    recall: float = 0.0
    mrr: float = 0.0
    misses: list[str] = field(default_factory=list)
    # Recall@5 of the answer within each half of the questions (see Question.half).
    recall_by_half: dict[str, float] = field(default_factory=dict)


# -- the evaluation ------------------------------------------------------------------------------


def load_questions(quick: bool) -> tuple[dict[str, Any], list[Question]]:
    spec = yaml.safe_load(EVAL_FILE.read_text(encoding="utf-8"))
    questions = [
        Question(entry["q"], tuple(Answer(*answer.split("::", 1)) for answer in entry["a"]), "AB"[position % 2])
        for position, entry in enumerate(spec["questions"])
        if entry.get("quick") or not quick
    ]
    return spec["corpus"], questions


def corpus_workspace(corpus: dict[str, Any], quick: bool, into: Path) -> Path:
    """Copies the corpus's Python files into `into/<package>/...`; fails when the installed
    version is not the one the questions were written for."""
    installed = importlib.metadata.version(corpus["package"])
    if installed.split("+")[0] != corpus["version"]:
        raise SystemExit(
            f"the evaluation is written for {corpus['package']}=={corpus['version']}, found {installed}: "
            "install the semantic extra (pip install -e '.[semantic]')"
        )
    spec = importlib.util.find_spec(corpus["package"])
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).parent
    for directory in corpus["quick_directories" if quick else "directories"]:
        for path in sorted((source / directory).rglob("*.py")):
            target = into / corpus["package"] / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return into


Spans = dict[Answer, list[range]]


def answer_spans(workspace: Path, questions: list[Question]) -> Spans:
    """The lines of every answer; fails unless each names a file of the corpus and a symbol the
    chunker finds in it."""
    chunks: dict[str, list[Any]] = {}
    spans: Spans = {}
    problems = []
    for question in questions:
        for answer in question.answers:
            if answer.path not in chunks:
                path = workspace / answer.path
                text = path.read_text(encoding="utf-8") if path.is_file() else ""
                chunks[answer.path] = chunk_file(answer.path, text)
            spans[answer] = [
                range(chunk.start_line, chunk.end_line + 1)
                for chunk in chunks[answer.path]
                if chunk.symbol == answer.symbol
            ]
            if not spans[answer]:
                problems.append(f"{answer.path}::{answer.symbol} ({question.text})")
    if problems:
        raise SystemExit("answers not found in the corpus:\n  " + "\n  ".join(problems))
    return spans


def _answers(found: Found, answer: Answer, spans: Spans) -> bool:
    if found.path != answer.path:
        return False
    if found.symbol:
        # A method of the wanted class answers a question about the class.
        return found.symbol == answer.symbol or found.symbol.startswith(answer.symbol + ".")
    return any(line in span for line in found.lines for span in spans[answer])


async def ranked_semantic(registry: ToolRegistry, workspace: Path, question: str) -> list[Found]:
    result = await registry.execute(
        "semantic_search", workspace, json.dumps({"query": question, "limit": MRR_AT})
    )
    assert not result.is_error, result.output
    return [Found(hit["path"], symbol=hit["symbol"] or "-") for hit in result.metadata["results"]]


_SEARCH_FILE = re.compile(r"^\d+\. (.+) \(score [0-9.]+\)$")
_SEARCH_LINE = re.compile(r"^ +(\d+): ")


async def ranked_search(registry: ToolRegistry, workspace: Path, question: str) -> list[Found]:
    result = await registry.execute("search", workspace, json.dumps({"query": question, "limit": MRR_AT}))
    assert not result.is_error, result.output
    found: list[Found] = []
    for block in result.output.split("\n\n"):
        header, *snippet = block.splitlines()
        match = _SEARCH_FILE.match(header)
        if match:
            lines = frozenset(int(m.group(1)) for line in snippet if (m := _SEARCH_LINE.match(line)))
            found.append(Found(match.group(1), lines=lines))
    return found


async def ranked_grep(registry: ToolRegistry, workspace: Path, question: str) -> list[Found]:
    """What an agent does without a search tool: grep the question's keywords, case-insensitive,
    and read the files with the most matching lines first."""
    pattern = "|".join(re.escape(term) for term in sorted(query_terms(question)))
    result = await registry.execute(
        "grep", workspace,
        json.dumps({"pattern": pattern, "-i": True, "output_mode": "content", "head_limit": 100_000}),
    )
    assert not result.is_error, result.output
    lines: dict[str, set[int]] = {}
    for line in result.output.splitlines():
        path, _, rest = line.partition(":")
        number, _, _ = rest.partition(":")
        if number.isdigit():
            lines.setdefault(path, set()).add(int(number))
    ranked = sorted(lines.items(), key=lambda item: (-len(item[1]), item[0]))[:MRR_AT]
    return [Found(path, lines=frozenset(numbers)) for path, numbers in ranked]


def score(questions: list[Question], rankings: list[list[Found]], spans: Spans) -> Scores:
    scores = Scores()
    found_by_half: dict[str, list[bool]] = {}
    for question, ranking in zip(questions, rankings, strict=True):
        files = list(dict.fromkeys(found.path for found in ranking))[:MRR_AT]
        wanted = {answer.path for answer in question.answers}
        file_rank = next((rank for rank, path in enumerate(files, start=1) if path in wanted), None)
        rank = next(
            (
                rank
                for rank, found in enumerate(ranking[:MRR_AT], start=1)
                if any(_answers(found, answer, spans) for answer in question.answers)
            ),
            None,
        )
        scores.file_recall += file_rank is not None and file_rank <= RECALL_AT
        scores.file_mrr += 1 / file_rank if file_rank else 0.0
        scores.recall += rank is not None and rank <= RECALL_AT
        scores.mrr += 1 / rank if rank else 0.0
        found_by_half.setdefault(question.half, []).append(rank is not None and rank <= RECALL_AT)
        if rank is None or rank > RECALL_AT:
            scores.misses.append(question.text)
    scores.recall_by_half = {half: sum(found) / len(found) for half, found in sorted(found_by_half.items())}
    for name in ("file_recall", "file_mrr", "recall", "mrr"):
        setattr(scores, name, getattr(scores, name) / len(questions))
    return scores


async def evaluate(registry: ToolRegistry, workspace: Path, questions: list[Question]) -> dict[str, Scores]:
    spans = answer_spans(workspace, questions)
    rankers = {"semantic_search": ranked_semantic, "search": ranked_search, "grep": ranked_grep}
    results = {}
    for name in TOOLS:
        rankings = [await rankers[name](registry, workspace, question.text) for question in questions]
        results[name] = score(questions, rankings, spans)
    return results


# -- speed ---------------------------------------------------------------------------------------


def source_tree(files: int, into: Path) -> tuple[Path, int]:
    """The first `files` .py files (by path) of this environment's site-packages, copied: real code
    of many authors. Returns the tree and its size in bytes."""
    site = Path(importlib.util.find_spec("yaml").origin).parents[1]  # type: ignore[union-attr]
    copied = 0
    size = 0
    for path in sorted(site.rglob("*.py")):
        if copied == files:
            break
        if path.stat().st_size > 1024 * 1024 or "__pycache__" in path.parts:
            continue
        target = into / path.relative_to(site)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copied += 1
        size += path.stat().st_size
    return into, size


async def build(state: SemanticSearch, root: Path) -> tuple[float, int]:
    """Indexes `root` completely; returns the seconds it took and the number of chunks. A long
    build says how far it got every PROGRESS_SECONDS, on stderr."""
    started = time.perf_counter()
    names = (await workspace_files(root, ReadOnlyLauncher())).names
    index = state.index_for(root)
    never = threading.Event()
    await asyncio.to_thread(index.refresh, names, math.inf, never)
    while not await asyncio.to_thread(index.wait_embedded, time.monotonic() + PROGRESS_SECONDS, never):
        elapsed = time.perf_counter() - started
        embedded = index.embedded_count()
        print(f"  building {root.name}: {embedded:,} of {index.chunk_count():,} chunks embedded after {elapsed:.0f} s "
              f"({embedded / elapsed:.1f} chunks/s)", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    return elapsed, index.chunk_count()


async def timed_calls(registry: ToolRegistry, workspace: Path, queries: list[str]) -> list[float]:
    times = []
    for query in queries:
        started = time.perf_counter()
        result = await registry.execute("semantic_search", workspace, json.dumps({"query": query}))
        times.append(time.perf_counter() - started)
        assert not result.is_error, result.output
    return times


def cold_load_seconds() -> float:
    """Time for a new process to import everything and load the model, as a worker does."""
    code = (
        "import time; started = time.perf_counter()\n"
        "from tool_worker.semantic.embedder import detect_device, load_embedder\n"
        "load_embedder(detect_device()); print(time.perf_counter() - started)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def extra_install_bytes() -> tuple[int, list[str]]:
    """Bytes on disk of the distributions the semantic extra adds to the base install."""
    def closure(requirements: list[str], extras: set[str]) -> set[str]:
        seen: set[str] = set()
        pending = list(requirements)
        while pending:
            requirement = pending.pop()
            name, _, marker = requirement.partition(";")
            if marker and "extra ==" in marker and not any(f'"{extra}"' in marker for extra in extras):
                continue
            base = re.split(r"[\s\[<>=!~;(]", name.strip(), maxsplit=1)[0].lower().replace("_", "-")
            if base in seen:
                continue
            try:
                distribution = importlib.metadata.distribution(base)
            except importlib.metadata.PackageNotFoundError:
                continue
            seen.add(base)
            pending.extend(r for r in distribution.requires or [] if "extra ==" not in r)
        return seen

    own = importlib.metadata.distribution("codelane").requires or []
    base = closure([r for r in own if "extra ==" not in r], set())
    semantic = closure([r for r in own if 'extra == "semantic"' in r], {"semantic"}) - base
    total = 0
    for name in semantic:
        for file in importlib.metadata.distribution(name).files or []:
            path = Path(file.locate())
            if path.is_file():
                total += path.stat().st_size
    return total, sorted(semantic)


# -- the run -------------------------------------------------------------------------------------


async def run(
    quick: bool, tree_files: int, evaluation: bool = True, progress: bool = False, cache_dir: Path | None = None
) -> dict[str, Any]:
    """Measures every figure. With `progress`, the evaluation is also printed (on stderr) as soon
    as it is measured: the build of a large tree that follows it takes long. With `cache_dir`,
    the index's store is kept there: a later run on the same trees reads it back instead of
    embedding them again (its build figures are then a restart's)."""
    figures: dict[str, Any] = {}
    device = detect_device()
    figures["device"] = asdict(device)
    figures["model_load_cold_seconds"] = cold_load_seconds()
    embedder = load_embedder(device)
    figures["model_load_warm_seconds"] = embedder.load_seconds
    figures["extra_install_bytes"], figures["extra_distributions"] = extra_install_bytes()
    corpus, questions = load_questions(quick)
    with tempfile.TemporaryDirectory(prefix="semantic-bench-") as scratch:
        scratch_dir = Path(scratch)
        cache = cache_dir or scratch_dir / "cache"
        state = SemanticSearch(embedder, cache)
        registry = ToolRegistry.builtin()
        registry.register(state.tool())
        if evaluation:
            workspace = corpus_workspace(corpus, quick, scratch_dir / "corpus")
            seconds, chunks = await build(state, workspace)
            files = len((await workspace_files(workspace, ReadOnlyLauncher())).names)
            figures["corpus"] = {"files": files, "chunks": chunks, "build_seconds": seconds}
            results = await evaluate(registry, workspace, questions)
            figures["evaluation"] = {"questions": len(questions), **{name: asdict(s) for name, s in results.items()}}
            if progress:
                with contextlib.redirect_stdout(sys.stderr):
                    report_evaluation(figures)

        tree, tree_bytes = source_tree(tree_files, scratch_dir / "tree")
        seconds, chunks = await build(state, tree)
        names = (await workspace_files(tree, ReadOnlyLauncher())).names
        figures["tree"] = {
            "files": len(names), "bytes": tree_bytes, "chunks": chunks,
            "build_seconds": seconds, "chunks_per_second": chunks / seconds,
        }
        queries = [question.text for question in questions]
        await timed_calls(registry, tree, queries[:3])  # first calls settle caches
        times = await timed_calls(registry, tree, queries)
        figures["query_seconds"] = {
            "p50": statistics.median(times), "p90": sorted(times)[int(0.9 * (len(times) - 1))], "count": len(times)
        }
        sources = sorted(name for name in names if name.endswith(".py")) or sorted(names)
        changed = tree / sources[len(sources) // 2]
        # A name of this run's own: with --cache-dir, an earlier run's edit is in the store already.
        with changed.open("a", encoding="utf-8") as handle:
            handle.write(f"\n\ndef semantic_bench_marker_{time.time_ns()}(retries):\n"
                         "    \"\"\"Back off before retrying.\"\"\"\n    return 2 ** retries\n")
        figures["reindex_one_file_seconds"] = (await timed_calls(registry, tree, ["back off before retrying"]))[0]

        restarted = SemanticSearch(embedder, cache)
        seconds, chunks = await build(restarted, tree)
        figures["restart_seconds"] = seconds
    return figures


def report_evaluation(figures: dict[str, Any]) -> bool:
    evaluation = figures["evaluation"]
    corpus = figures["corpus"]
    print(f"\nevaluation: {evaluation['questions']} questions over {corpus['files']} files "
          f"({corpus['chunks']:,} chunks, indexed in {corpus['build_seconds']:.1f} s)")
    print(f"{'':<17}{'the answer':>20}{'its file':>20}")
    print(f"{'tool':<17}{'recall@5':>10}{'MRR@10':>10}{'recall@5':>10}{'MRR@10':>10}")
    for name in TOOLS:
        scores = evaluation[name]
        print(f"{name:<17}{scores['recall']:>10.2f}{scores['mrr']:>10.2f}{scores['file_recall']:>10.2f}"
              f"{scores['file_mrr']:>10.2f}")
    for half in evaluation["semantic_search"]["recall_by_half"]:
        print(f"  half {half} (questions {'1, 3, 5' if half == 'A' else '2, 4, 6'}... of the file), recall@5 of the "
              "answer: " + ", ".join(f"{name} {evaluation[name]['recall_by_half'][half]:.2f}" for name in TOOLS))
    gain = evaluation["semantic_search"]["recall"] - evaluation["search"]["recall"]
    recall_ok = gain >= TARGET_RECALL_GAIN
    print(f"semantic_search - search, recall@5 of the answer: {gain * 100:+.0f} points "
          f"(target >= +{TARGET_RECALL_GAIN * 100:.0f}) {'ok' if recall_ok else 'MISSED'}")
    return recall_ok


def report(figures: dict[str, Any]) -> bool:
    """Prints the figures; True when every target is met."""
    device = figures["device"]
    memory = device["memory_bytes"] // 2**20
    print(f"device: {device['kind']} ({device['name']}, {memory:,} MiB, {device['precision']})")
    print(f"model load: {figures['model_load_cold_seconds']:.1f} s in a new process "
          f"({figures['model_load_warm_seconds']:.1f} s with torch already imported)")
    print(f"semantic extra: {figures['extra_install_bytes'] / 2**20:,.0f} MiB installed over the base "
          f"({len(figures['extra_distributions'])} distributions)")
    recall_ok = "evaluation" not in figures or report_evaluation(figures)
    tree = figures["tree"]
    print(f"\nindex build: {tree['files']:,} files ({tree['bytes'] / 2**20:.0f} MiB), {tree['chunks']:,} chunks in "
          f"{tree['build_seconds']:.1f} s ({tree['chunks_per_second']:.0f} chunks/s)")
    reindex = figures["reindex_one_file_seconds"]
    reindex_ok = reindex <= TARGET_REINDEX_SECONDS
    print(f"re-index after one file changed (the whole call): {reindex * 1000:.0f} ms "
          f"(target <= {TARGET_REINDEX_SECONDS * 1000:.0f}) {'ok' if reindex_ok else 'MISSED'}")
    print(f"worker restart on that index (from disk): {figures['restart_seconds'] * 1000:.0f} ms")
    query = figures["query_seconds"]
    query_ok = query["p50"] <= TARGET_QUERY_P50_SECONDS
    print(f"query ({query['count']} calls, index warm): p50 {query['p50'] * 1000:.0f} ms, "
          f"p90 {query['p90'] * 1000:.0f} ms (target p50 <= {TARGET_QUERY_P50_SECONDS * 1000:.0f}) "
          f"{'ok' if query_ok else 'MISSED'}")
    return recall_ok and reindex_ok and query_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.semantic_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI subset: optim, a 50-file tree")
    parser.add_argument("--tree-files", type=int, help="files in the build tree (default 5000; 50 with --quick)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--no-evaluation", action="store_true", help="only the load, install and speed figures")
    parser.add_argument("--show-misses", action="store_true", help="list the questions each tool missed")
    parser.add_argument(
        "--cache-dir", type=Path,
        help="keep the index here across runs: a second run embeds nothing again (its build figures are a restart's)",
    )
    args = parser.parse_args(argv)
    tree_files = args.tree_files or (QUICK_TREE_FILES if args.quick else 5000)
    figures = asyncio.run(
        run(args.quick, tree_files, evaluation=not args.no_evaluation, progress=True, cache_dir=args.cache_dir)
    )
    met = report(figures)
    if args.show_misses and "evaluation" in figures:
        for name in TOOLS:
            print(f"\n{name} missed:\n  " + "\n  ".join(figures["evaluation"][name]["misses"]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1), encoding="utf-8")
    print("\nall targets met" if met else "\nsome targets missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
