"""grep: search file contents with a regular expression, via ripgrep (Query lane).

rg runs with its parallel walk, which emits files in whatever order threads finish; the output
is sorted here by path instead of with `rg --sort path`, which would force a single thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tool_worker import effects
from tool_worker.sandbox import resolve_in_workspace, workspace_root
from tool_worker.tools.base import Lane, Tool, ToolContext, ToolFailure, ToolResult, ToolSpec
from tool_worker.tools.files import describe_file_type
from tool_worker.tools.globs import dot_slash_anchored
from tool_worker.tools.rg import RgOutput, answer_of, left_out, run_rg, search_location

# Whether a path (relative to the workspace root) must be left out; None when nothing is denied.
Hides = Callable[[str], bool] | None

DEFAULT_HEAD_LIMIT = 250
# Longer lines (minified code, data) are shown as a preview: rg says how much it left out.
MAX_LINE_CHARS = 500
# rg refuses numbers past its integers; far fewer lines than this fit in a result anyway.
MAX_CONTEXT_LINES = 10_000

_MODE_ARGS = {
    "files_with_matches": ["--files-with-matches", "--null"],
    "count": ["--count", "--with-filename", "--null"],
    # --heading with --null gives "path\0" + the file's lines, and a blank line between files:
    # whole per-file blocks that can be sorted without parsing every line.
    "content": [
        "--heading",
        "--with-filename",
        "--null",
        "--line-number",
        f"--max-columns={MAX_LINE_CHARS}",
        "--max-columns-preview",
    ],
}


def rg_arguments(args: dict[str, Any]) -> list[str]:
    """The rg flags for a grep call, without the path (the benchmark runs rg with these too)."""
    mode = args.get("output_mode", "files_with_matches")
    # `$` matches at the end of a CRLF line too (before its \r), as the model, which read shows
    # such lines without their \r, expects.
    flags = [*_MODE_ARGS[mode], "--crlf"]
    if args.get("-i"):
        flags.append("--ignore-case")
    if args.get("multiline"):
        flags += ["--multiline", "--multiline-dotall"]
    if "glob" in args:
        flags += ["--glob", dot_slash_anchored(args["glob"])]
    if "type" in args:
        flags += ["--type", args["type"]]
    if mode == "content":
        for option in ("-A", "-B", "-C"):
            if option in args:
                flags += [option, str(args[option])]
    flags += ["--regexp", args["pattern"]]
    return flags


def _file_entries(out: RgOutput, prefix: str, hides: Hides) -> tuple[list[str], int]:
    entries = [prefix + name.decode("utf-8", "replace") for name in sorted(out.stdout.split(b"\0")[:-1])]
    if hides is None:
        return entries, 0
    kept = [entry for entry in entries if not hides(entry)]
    return kept, len(entries) - len(kept)


def _count_entries(out: RgOutput, prefix: str, hides: Hides) -> tuple[list[str], int]:
    entries = []
    hidden = 0
    for name, count in sorted(_count_records(out.stdout)):
        path = prefix + name.decode("utf-8", "replace")
        if hides is not None and hides(path):
            hidden += 1
            continue
        entries.append(f"{path}:{count.decode()}")
    return entries, hidden


def _count_records(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(name, count) of `rg --count --null --crlf` output: `name NUL count CR LF` each.

    Read field by field rather than split at LF: a file's name may hold LF (never NUL), and a
    split would give its count, or a policy's verdict, to a made-up name. A record cut short
    (rg's output capped) is left out."""
    start = 0
    while (name_end := data.find(b"\0", start)) != -1 and (end := data.find(b"\n", name_end)) != -1:
        yield data[start:name_end], data[name_end + 1 : end].removesuffix(b"\r")
        start = end + 1


def _content_lines(
    out: RgOutput, prefix: str, numbered: bool, start: int, stop: int, hides: Hides
) -> tuple[list[str], int, int]:
    """Lines [start, stop) of the path-sorted output, how many lines there are in all, and how
    many files were left out because the policy denies them.

    Only the lines shown are split, decoded and formatted; the rest are just counted, in place:
    a bytes object per line of 64 MiB of short lines cost six times the output in memory.
    """
    data = out.stdout
    blocks = sorted(_content_blocks(data))
    hidden = 0
    if hides is not None:
        kept = [block for block in blocks if not hides(prefix + block[0].decode("utf-8", "replace"))]
        hidden, blocks = len(blocks) - len(kept), kept
    shown: list[str] = []
    total = 0
    for name, body_start in blocks:
        body_end = _block_end(data, body_start, name)
        warning = _binary_warning(data, body_start, body_end, name)
        if warning != -1:
            body_end = warning
        # A line ends at LF, the block's last one possibly without (cut by the output cap). Not
        # splitlines(): that would also split on a bare \r inside a line of text.
        count = data.count(b"\n", body_start, body_end)
        if body_end > body_start and data[body_end - 1] != ord("\n"):
            count += 1
        if total + count > start and total < stop:
            path = prefix + name.decode("utf-8", "replace")
            for line in _lines(data, body_start, body_end, max(0, start - total), min(count, stop - total)):
                shown.append(_format_line(path, line.decode("utf-8", "replace"), numbered))
        total += count
        if warning != -1:
            # One line, under the path as shown (rg's names the file relative to where it ran).
            if start <= total < stop:
                text = data[warning + len(name) : _block_end(data, body_start, name)].rstrip(b"\n")
                shown.append(prefix + name.decode("utf-8", "replace") + text.decode("utf-8", "replace"))
            total += 1
    return shown, total, hidden


def _lines(data: bytes, start: int, end: int, first: int, stop: int) -> Iterator[bytes]:
    """Lines [first, stop) of the LF-ended lines in data[start:end]; the last may lack its LF."""
    start = _past_lines(data, start, end, first)
    for _ in range(stop - first):
        line_end = data.find(b"\n", start, end)
        if line_end == -1:
            line_end = end
        # A CRLF line is shown without its \r, as read shows it.
        yield data[start : line_end - 1 if line_end > start and data[line_end - 1] == 13 else line_end]
        start = line_end + 1


def _past_lines(data: bytes, start: int, end: int, lines: int) -> int:
    """Where the line after the first `lines` lines from `start` begins. Counted a window at a
    time in C: a model's offset may skip millions of lines, a Python step each took seconds."""
    window = 64 * 1024
    while lines and (window_end := min(end, start + window)) > start:
        in_window = data.count(b"\n", start, window_end)
        if in_window < lines:
            lines -= in_window
            start = window_end
            continue
        for _ in range(lines):
            start = data.index(b"\n", start, window_end) + 1
        return start
    return start


def _content_blocks(data: bytes) -> Iterator[tuple[bytes, int]]:
    """(name, where its lines start) of each file in `rg --heading --null` output: `name NUL`
    then the file's lines, each `N:text`, `N-text` or `--` and never empty, then an empty line
    before the next file. Where the lines end is found again when they are read: an offset more
    per file took an eighth more memory on an output of many small files.

    A file's name may hold LF, even two in a row (never NUL), so the name is read up to its NUL
    and only then is the first empty line looked for: splitting the output at empty lines would
    give one file's lines to a name made of part of another's. A block whose name was cut short
    (rg's output capped) is left out."""
    start = 0
    while (name_end := data.find(b"\0", start)) != -1:
        name = data[start:name_end]
        yield name, name_end + 1
        start = _block_end(data, name_end + 1, name) + 2


# After a match in a binary file met in the walk, rg stops at its first NUL and ends the file's
# lines with `NAME: WARNING: stopped searching binary file ...` (in stdout, whatever --no-messages).
_BINARY_WARNING = b": WARNING: stopped searching binary file"


def _block_end(data: bytes, body_start: int, name: bytes) -> int:
    end = data.find(b"\n\n", body_start)
    if b"\n\n" in b"\n" + name:
        # The warning repeats the name, so an empty line in it is no end of the block: taken
        # for one, the rest of the warning and the next file's name made a name no rule denies,
        # with the next file's lines under it.
        warning = _binary_warning(data, body_start, len(data) if end == -1 else end, name)
        if warning != -1:
            end = data.find(b"\n\n", warning + len(name))
    return len(data) if end == -1 else end


def _binary_warning(data: bytes, body_start: int, body_end: int, name: bytes) -> int:
    """Where rg's binary warning starts, when it is the last line of the block data[body_start:
    body_end] (which may end inside the name it repeats); -1 when there is none. Every other
    line starts with a line number or is `--`, and holds no empty line, so `LF NAME: WARNING` at
    a line's start is the warning even when the name looks like a line."""
    needle = b"\n" + name + _BINARY_WARNING
    at = data.find(needle, body_start - 1, body_end + len(needle))
    if at == -1 or at > body_end:
        return -1
    return at + 1


def _format_line(path: str, line: str, numbered: bool) -> str:
    # rg prints "12:text" for a match and "12-text" for context, "--" between context groups.
    if line == "--":
        return line
    digits = len(line) - len(line.lstrip("0123456789"))
    separator = line[digits : digits + 1]
    return f"{path}{separator}{line if numbered else line[digits + 1 :]}"


def rg_invocation(workspace: Path, args: dict[str, Any]) -> tuple[list[str], Path, str]:
    """The rg arguments of a grep call, where to run them, and the prefix of the paths rg prints
    (see search_location). The benchmark times these same command lines without the tool."""
    shown_path = args.get("path", ".")
    target = resolve_in_workspace(workspace, shown_path)
    if not target.exists():
        raise ToolFailure(f"path not found: {shown_path}")
    if not target.is_dir() and not target.is_file():
        # rg would open it and wait on a FIFO for ever.
        raise ToolFailure(f"{shown_path} is {describe_file_type(target.stat().st_mode)}: grep only reads regular files")
    cwd, path_args, prefix = search_location(workspace_root(workspace), target)
    return [*rg_arguments(args), *path_args], cwd, prefix


async def _run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    shown_path = args.get("path", ".")
    ctx.check_readable(resolve_in_workspace(ctx.workspace, shown_path), shown_path)
    rg_args, cwd, prefix = rg_invocation(ctx.workspace, args)
    out = await run_rg(rg_args, cwd, ctx.sandbox.read_only)
    if out.failed_outright and not out.stderr:
        # rg exits 2 in silence (--no-messages) when it searched no file: its filters left none,
        # or every file there is ignored, a symlink (not followed) or unreadable.
        if "glob" in args or "type" in args:
            filters = " and ".join(f"{name} {args[name]!r}" for name in ("glob", "type") if name in args)
            return ToolResult(output=f"No files in {shown_path} match {filters}, so nothing was searched")
        return ToolResult(output=f"No files in {shown_path} to search: what is there is ignored (.gitignore, "
                                 "hidden files), symlinks (grep does not follow them) or unreadable")
    if out.failed_outright:
        detail = out.stderr or "rg gave no reason"
        if "--multiline" in detail and "is not allowed in a regex" in detail:
            # rg's advice names its own flags (--multiline, -U), which this tool does not take.
            detail = f"{detail.split(chr(10), 1)[0]}: set multiline=true to let the pattern match line feeds"
        raise ToolFailure(f"grep failed (rg uses Rust regex syntax): {detail}")
    if not out.stdout:
        return ToolResult(output=f"No matches for {args['pattern']!r} in {shown_path}")

    if args.get("output_mode") == "content" and b"\0" not in out.stdout:
        # rg searches a binary file it is given by name, and prints `PATH: binary file matches
        # (found "\0" byte around offset N)` instead of its lines: no block of lines, which read
        # as "no match" where files_with_matches and count find one.
        notice = out.stdout.decode("utf-8", "replace").strip()
        return ToolResult(output=f"{notice}; the lines of a binary file are not shown", metadata={"total": 0})
    hides = ctx.hides if ctx.denied else None
    return await answer_of(out, lambda: _answer(out, args, prefix, hides, shown_path))


def _answer(out: RgOutput, args: dict[str, Any], prefix: str, hides: Hides,
            shown_path: str) -> ToolResult:
    """The answer from rg's matches: the window of entries asked for, with what was left out."""
    mode = args.get("output_mode", "files_with_matches")
    offset = args.get("offset", 0)
    limit = args.get("head_limit", DEFAULT_HEAD_LIMIT)
    if mode == "content":
        lines, total, hidden = _content_lines(out, prefix, args.get("-n", True), offset, offset + limit, hides)
        unit = "lines"
    else:
        if mode == "files_with_matches":
            entries, hidden = _file_entries(out, prefix, hides)
        else:
            entries, hidden = _count_entries(out, prefix, hides)
        lines, total = entries[offset : offset + limit], len(entries)
        unit = "files"
    if not lines and total == 0:
        return ToolResult(output="\n".join([f"No matches for {args['pattern']!r} in {shown_path}",
                                            *left_out(out, hidden)]))
    if not lines:
        raise ToolFailure(f"offset {offset} is past the end of the results ({total} {unit})")
    notices = left_out(out, hidden)
    if offset + len(lines) < total:
        notices.append(
            f"[showing {unit} {offset + 1}-{offset + len(lines)} of {total}; use offset={offset + len(lines)} for more]"
        )
    if out.overflowed:
        notices.append(
            "[rg produced too much output and was stopped: results cover part of the tree only; "
            "use a more specific pattern, path or glob]"
        )
    return ToolResult(
        output="\n".join(lines + notices),
        truncated=bool(notices),
        metadata={"total": total},
    )


TOOL = Tool(
    spec=ToolSpec(
        name="grep",
        description=(
            "Search file contents with a regular expression (ripgrep, Rust regex syntax: escape "
            "literal braces and parentheses, e.g. `interface\\{\\}`, `fn\\(`). Files ignored by "
            ".gitignore, hidden files and binary files are skipped. Paths in the answer are relative "
            "to the workspace root, sorted.\n"
            "- output_mode: `files_with_matches` (default) lists matching files; `content` shows "
            "matching lines as `path:line:text` (context lines use `-`); `count` gives matches per "
            "file.\n"
            "- Filter files with glob (`*.py`, `src/**/*.ts`) or type (`py`, `js`, `rust`, ...); as "
            "with rg --glob, a file matching glob is searched even if .gitignore lists it.\n"
            "- -i ignores case; -A/-B/-C add context lines in content mode; multiline lets a "
            "pattern (with `.` matching newlines) span lines.\n"
            f"- Returns at most head_limit entries (default {DEFAULT_HEAD_LIMIT}); continue with "
            f"offset. Lines longer than {MAX_LINE_CHARS} characters are shortened."
        ),
        parameters={
            "type": "object",
            "properties": {
                "pattern": {"type": "string", "minLength": 1, "description": "Regular expression to find."},
                "path": {
                    "type": "string",
                    "description": "File or directory to search (default: the workspace root).",
                },
                "glob": {"type": "string", "description": "Only search files matching this glob."},
                "type": {"type": "string", "description": "Only search files of this rg type, e.g. py."},
                "output_mode": {
                    "type": "string",
                    "enum": ["files_with_matches", "content", "count"],
                    "description": "What to return (default files_with_matches).",
                },
                "-i": {"type": "boolean", "description": "Case-insensitive search."},
                "-n": {
                    "type": "boolean",
                    "description": "Show line numbers in content mode (default true).",
                },
                "-A": {"type": "integer", "minimum": 0, "maximum": MAX_CONTEXT_LINES,
                       "description": "Lines of context after a match."},
                "-B": {"type": "integer", "minimum": 0, "maximum": MAX_CONTEXT_LINES,
                       "description": "Lines of context before a match."},
                "-C": {"type": "integer", "minimum": 0, "maximum": MAX_CONTEXT_LINES,
                       "description": "Lines of context around a match."},
                "multiline": {
                    "type": "boolean",
                    "description": "Let the pattern span lines; `.` also matches newlines.",
                },
                "head_limit": {
                    "type": "integer",
                    "minimum": 1,
                    "description": f"At most this many entries (default {DEFAULT_HEAD_LIMIT}).",
                },
                "offset": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Skip this many entries first, to page through results (default 0).",
                },
            },
            "required": ["pattern"],
            "additionalProperties": False,
        },
        lane=Lane.QUERY,
        idempotent=True,
    ),
    run=_run,
    effects=effects.reads(("path", ".")),
)
