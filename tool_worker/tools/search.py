"""search: rank the workspace's files against a query with BM25 and show their best lines (Query lane).

Identifiers are split into words (camelCase, snake_case, digits) and lowercased on both sides,
so "load config" finds `loadConfig` and `load_config`. Ranking runs in a thread so the event loop
keeps serving other calls; it only tokenizes files that contain a query word at all.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tool_worker import effects
from tool_worker.sandbox import resolve_in_workspace, workspace_root
from tool_worker.tools.base import ErrorKind, Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec
from tool_worker.tools.files import is_binary, open_regular, run_stoppable
from tool_worker.tools.rg import left_out, run_rg, search_location

DEFAULT_RESULTS = 10
MAX_RESULTS = 50
# A query's words are scored against every file: 100,000 of them cost about 77 s a file (as
# semantic_search's, at most this long).
MAX_QUERY_CHARS = 2000
# Bigger files are generated or data, rarely what a code search is after.
MAX_FILE_BYTES = 1024 * 1024
# Bounds one call's work on a huge tree; files are read in path order, so the cut is stable.
MAX_TOTAL_BYTES = 64 * 1024 * 1024
SNIPPETS_PER_FILE = 3
MAX_SNIPPET_CHARS = 200
BINARY_SNIFF_BYTES = 8192
# A word in a file's path says more about the file than one more occurrence in its text.
PATH_WEIGHT = 3
# Standard BM25 parameters.
K1 = 1.2
B = 0.75

_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
# Words of text that is not all ASCII: runs of letters (any script), runs of digits.
_UNICODE_WORD = re.compile(r"[^\W\d_]+|\d+")
# Scripts written without spaces between words (kana, CJK ideographs, hangul): their runs are
# indexed as overlapping pairs of characters, so that a word matches inside a longer run.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_OR_OTHER = re.compile(f"([{_CJK}]+)|[^{_CJK}]+")
_STOPWORDS = frozenset(
    "a an and are as at be by do does for from how in is it of on or that the this to what when "
    "where which who why with".split()
)


def tokenize(text: str) -> list[str]:
    """Words of `text`: identifiers split at case changes, underscores and digits; lowercased;
    a plural `s` dropped, so `files` matches `file`. A word with letters beyond ASCII (`café`) is
    one word, lowercased; a run of kana, CJK ideographs or hangul gives its overlapping pairs of
    characters (`日本語` gives `日本`, `本語`; one character alone is itself). Without these, a
    query in another script had no word at all."""
    if text.isascii():
        found = _WORD.findall(text)
    else:
        found = []
        for word in _UNICODE_WORD.findall(text):
            if word.isascii():
                found += _WORD.findall(word)
                continue
            for part in _CJK_OR_OTHER.finditer(word):
                run = part.group()
                if part.group(1) is None:
                    found.append(run)
                else:
                    found += [run[i : i + 2] for i in range(max(1, len(run) - 1))]
    words = []
    for word in found:
        word = word.lower()
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        words.append(word)
    return words


@dataclass
class _Scan:
    """Per-document term frequencies of the files that contain a query word, plus corpus stats."""

    terms: frozenset[str]
    documents: int = 0
    total_length: int = 0
    candidates: list[tuple[str, int, dict[str, int]]] = field(default_factory=list)
    skipped_large: int = 0
    hit_total_cap: bool = False


def _scan(directory: Path, names: list[str], terms: frozenset[str], stop: threading.Event) -> _Scan:
    scan = _Scan(terms)
    scanned_bytes = 0
    for name in names:
        if stop.is_set():
            break
        try:
            with open_regular(directory / name, name) as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except (OSError, ToolFailure):
            continue
        if len(data) > MAX_FILE_BYTES:
            scan.skipped_large += 1
            continue
        if is_binary(data[:BINARY_SNIFF_BYTES]):
            continue
        if scanned_bytes + len(data) > MAX_TOTAL_BYTES:
            scan.hit_total_cap = True
            break
        scanned_bytes += len(data)
        scan.documents += 1
        scan.total_length += len(data)
        text = data.decode("utf-8", "replace")
        lowered = text.lower()
        path_lowered = name.lower()
        # A substring test is far cheaper than tokenizing, and no substring means no token.
        if not any(term in lowered or term in path_lowered for term in terms):
            continue
        counts = Counter(tokenize(text))
        path_counts = Counter(tokenize(name))
        frequencies = {
            term: counts[term] + PATH_WEIGHT * path_counts[term] for term in terms if counts[term] or path_counts[term]
        }
        if frequencies:
            scan.candidates.append((name, len(data), frequencies))
    return scan


def _rank(scan: _Scan) -> tuple[list[tuple[float, str]], dict[str, float]]:
    """BM25 scores, best first and equal scores in path order; and the idf of each query word."""
    if not scan.candidates:
        return [], {}
    average_length = scan.total_length / scan.documents
    document_frequency = Counter(term for _, _, frequencies in scan.candidates for term in frequencies)
    idf = {term: math.log(1 + (scan.documents - df + 0.5) / (df + 0.5)) for term, df in document_frequency.items()}
    ranked = []
    for name, length, frequencies in scan.candidates:
        norm = K1 * (1 - B + B * length / average_length)
        score = sum(idf[term] * tf * (K1 + 1) / (tf + norm) for term, tf in frequencies.items())
        ranked.append((-score, name))
    ranked.sort()
    return [(-negative, name) for negative, name in ranked], idf


def _snippets(path: Path, terms: frozenset[str], idf_of: dict[str, float]) -> list[str]:
    """The file's lines richest in query words, in line order."""
    try:
        with open_regular(path, path.name) as handle:
            text = handle.read(MAX_FILE_BYTES).decode("utf-8", "replace")
    except (OSError, ToolFailure):
        return []
    scored = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = terms.intersection(tokenize(line))
        if words:
            scored.append((-sum(idf_of.get(word, 0.0) for word in words), number, line))
    best = sorted(scored)[:SNIPPETS_PER_FILE]
    return [
        f"  {number:>5}: {line.strip()[:MAX_SNIPPET_CHARS]}" for _, number, line in sorted(best, key=lambda s: s[1])
    ]


def query_terms(query: str) -> frozenset[str]:
    """The words of a query that BM25 scores: its tokens less stopwords, unless that leaves none
    (a query of only stopwords, "how to", still searches for them)."""
    words = frozenset(tokenize(query))
    return words - _STOPWORDS or words


def _search(
    directory: Path, prefix: str, names: list[str], query: str, limit: int, notices: list[str],
    stop: threading.Event,
) -> ToolResult:
    terms = query_terms(query)
    if not terms:
        raise ToolFailure(f"query {query!r} has no searchable words", ErrorKind.INVALID_ARGUMENTS)
    scan = _scan(directory, sorted(names), terms, stop)
    ranked, idf = _rank(scan)
    if scan.skipped_large:
        notices.append(f"[{scan.skipped_large} files over {MAX_FILE_BYTES} bytes were not searched]")
    if scan.hit_total_cap:
        notices.append(
            f"[stopped after reading {MAX_TOTAL_BYTES} bytes: later files (by path) were not searched; "
            "give a path to narrow the search]"
        )
    if len(ranked) > limit:
        notices.append(f"[showing the best {limit} of {len(ranked)} matching files; raise limit to see more]")
    blocks = [
        "\n".join([f"{rank}. {prefix}{name} (score {score:.2f})", *_snippets(directory / name, terms, idf)])
        for rank, (score, name) in enumerate(ranked[:limit], start=1)
    ] or [f"No files match {query!r}"]
    if notices:
        blocks.append("\n".join(notices))
    return ToolResult(output="\n\n".join(blocks), truncated=bool(notices), metadata={"matches": len(ranked)})


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    shown = args.get("path", ".")
    target = resolve_in_workspace(ctx.workspace, shown)
    ctx.check_readable(target, shown)
    if not target.is_dir():
        raise ToolFailure(f"not a directory: {shown}")
    directory, _, prefix = search_location(workspace_root(ctx.workspace), target)
    listing = await run_rg(["--files", "--null"], directory, ctx.sandbox.read_only)
    listing.check(f"listing {shown}")
    names = [name.decode("utf-8", "surrogateescape") for name in listing.stdout.split(b"\0")[:-1]]
    hidden = 0
    if ctx.denied:
        kept = [name for name in names if not ctx.hides(prefix + name)]
        hidden, names = len(names) - len(kept), kept
    # A cancelled call must not leave its thread reading the whole tree: run_stoppable stops it.
    return await run_stoppable(
        _search, directory, prefix, names, args["query"], args.get("limit", DEFAULT_RESULTS), left_out(listing, hidden)
    )


TOOL = Tool(
    spec=ToolSpec(
        name="search",
        description=(
            'Find the files most relevant to a query of keywords or plain words ("where is the '
            'retry backoff computed", "parse config yaml"), ranked by BM25 over the workspace\'s '
            "text files; identifiers are split into words, so `loadConfig` and `load_config` both "
            'match "load config"; words of any script count (Chinese, Japanese and Korean by pairs of '
            "characters). Each result shows its best matching lines with line numbers. "
            "Use it to find where something lives when you do not know the exact name; use grep "
            f"for an exact pattern. Returns the best {DEFAULT_RESULTS} files by default (limit, up "
            f"to {MAX_RESULTS}). Files ignored by .gitignore, hidden, binary or over "
            f"{MAX_FILE_BYTES // 1024} KiB are skipped."
        ),
        parameters={
            "type": "object",
            "properties": {
                "query": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS,
                          "description": "What to look for."},
                "path": {
                    "type": "string",
                    "description": "Directory to search (default: the workspace root).",
                },
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_RESULTS,
                    "description": f"How many files to return (default {DEFAULT_RESULTS}).",
                },
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        lane=Lane.QUERY,
        idempotent=True,
    ),
    run=_run,
    effects=effects.reads(("path", ".")),
)
