"""Chunking: definitions from tree-sitter, windows of lines where no grammar applies."""

from __future__ import annotations

import random
import re

import pytest

from tests.semantic import EXTRA_MISSING
from tool_worker.semantic.chunking import _COMMENT_MARKS, WINDOW_LINES, Chunk, chunk_file, is_doc

pytest.importorskip("tree_sitter_language_pack", reason=EXTRA_MISSING)

PYTHON = '''"""Retry helpers."""
import time


# The policy the client uses.
@dataclass
class Retry:
    """How often and how long to retry."""

    attempts: int = 3

    def backoff(self, attempt):
        """Seconds to wait before `attempt`."""
        return 2 ** attempt

    # Jitter spreads clients out.
    def jitter(self):
        def inner():
            return 0
        return inner()


def main():
    return Retry()
'''


def _outline(chunks: list[Chunk]) -> list[tuple[int, int, str, str]]:
    return [(c.start_line, c.end_line, c.symbol, c.kind) for c in chunks]


def test_python_definitions_with_their_comments_and_decorators() -> None:
    chunks = chunk_file("pkg/retry.py", PYTHON)
    assert _outline(chunks) == [
        (1, 2, "", "lines"),
        (5, 20, "Retry", "class"),
        (12, 14, "Retry.backoff", "method"),
        (16, 20, "Retry.jitter", "method"),  # the comment above belongs to it; `inner` stays inside
        (23, 24, "main", "function"),
    ]
    by_symbol = {c.symbol: c for c in chunks}
    # A class's own chunk holds its header, docstring and fields, not its methods' bodies, and
    # names its members.
    own = by_symbol["Retry"].text
    assert "@dataclass" in own and "How often" in own and "attempts: int = 3" in own
    assert "2 ** attempt" not in own and own.endswith("members: backoff, jitter")
    assert by_symbol["Retry.backoff"].text.splitlines()[0] == "    def backoff(self, attempt):"
    assert by_symbol["Retry.jitter"].text.startswith("    # Jitter spreads clients out.")


def test_documentation_is_the_docstring_else_the_comments_above() -> None:
    docs = {c.symbol: c.doc for c in chunk_file("pkg/retry.py", PYTHON)}
    assert docs == {
        "": "",
        "Retry": "How often and how long to retry.",
        "Retry.backoff": "Seconds to wait before `attempt`.",
        "Retry.jitter": "Jitter spreads clients out.",
        "main": "",
    }
    go = "package x\n\n// Unrelated.\n\n// A holds the\n// settings.\n//\n// More detail.\ntype A struct { x int }\n"
    assert [(c.symbol, c.doc) for c in chunk_file("x.go", go)] == [("", ""), ("A", "A holds the settings.")]
    rust = "/** Adds one\n * to x. */\nfn add(x: u8) -> u8 { x + 1 }\n"
    assert chunk_file("x.rs", rust)[0].doc == "Adds one to x."


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        (
            "x.go",
            "package x\n\n// A is a thing.\ntype A struct { x int }\n\nfunc (a *A) F() int { return 1 }\nfunc G() {}\n",
            [(3, 4, "A", "type"), (6, 6, "F", "function"), (7, 7, "G", "function")],
        ),
        (
            "x.ts",
            "export class A {\n  m() {}\n}\nconst f = (x) => x;\nfunction g() {}\ninterface I { a: number }\n",
            [(1, 3, "A", "class"), (2, 2, "A.m", "method"), (4, 4, "f", "function"), (5, 5, "g", "function"),
             (6, 6, "I", "interface")],
        ),
        (
            "x.rs",
            "struct S { a: u8 }\nimpl Tr for S {\n    fn f(&self) {}\n}\nfn g() {}\n",
            [(1, 1, "S", "struct"), (2, 4, "S (Tr)", "impl"), (3, 3, "S (Tr).f", "method"), (5, 5, "g", "function")],
        ),
        (
            "x.c",
            "struct s { int x; };\nstatic int *f(int a) { return 0; }\nstruct s use(struct s v);\n",
            [(1, 1, "s", "struct"), (2, 2, "f", "function")],
        ),
        (
            "X.java",
            "class A {\n  A() {}\n  void m() {}\n}\n",
            [(1, 4, "A", "class"), (2, 2, "A.A", "method"), (3, 3, "A.m", "method")],
        ),
    ],
)
def test_other_languages(path: str, source: str, expected: list[tuple[int, int, str, str]]) -> None:
    assert _outline(chunk_file(path, source)) == expected


def test_markdown_sections_ignore_headings_in_code_fences() -> None:
    text = "intro line\nmore intro\n# Install\n\npip install x\nthen run\n```\n# not a heading\n```\n## Use\na\nb\n"
    assert _outline(chunk_file("README.md", text)) == [
        (1, 2, "", "lines"),
        (3, 9, "Install", "section"),
        (10, 12, "Use", "section"),
    ]


def test_files_without_a_grammar_are_cut_into_windows() -> None:
    lines = [f"setting_{n} = {n}" for n in range(1, 2 * WINDOW_LINES + 11)]
    chunks = chunk_file("config.ini", "\n".join(lines))
    assert _outline(chunks) == [
        (1, WINDOW_LINES, "", "lines"),
        (WINDOW_LINES + 1, 2 * WINDOW_LINES, "", "lines"),
        (2 * WINDOW_LINES + 1, 2 * WINDOW_LINES + 10, "", "lines"),
    ]
    assert chunks[0].text.splitlines()[0] == "setting_1 = 1"


def test_blank_files_and_lone_lines_give_nothing() -> None:
    assert chunk_file("empty.py", "") == []
    assert chunk_file("blank.txt", "\n\n   \n") == []
    # A window needs two lines of text to be worth a result.
    assert chunk_file("one.txt", "\n\nonly line\n\n") == []


def test_a_syntax_error_still_yields_the_definitions_around_it() -> None:
    source = "def ok():\n    return 1\n\ndef broken(:\n    pass\n\ndef later():\n    return 2\n"
    chunks = chunk_file("broken.py", source)
    symbols = {c.symbol for c in chunks}
    assert {"ok", "later"} <= symbols


def test_doc_files() -> None:
    assert is_doc("docs/guide.md") and is_doc("README.rst") and is_doc("notes.TXT")
    assert not is_doc("src/app.py") and not is_doc("Makefile")


def test_a_file_nested_deeper_than_python_recurses_is_cut_into_windows() -> None:
    # A workspace file of deeply nested literals (generated data, say) once made chunking raise
    # RecursionError, and with it every semantic_search of the workspace.
    text = "x = " + "[" * 5000 + "]" * 5000 + ";\nfunction after() {\n  return 1;\n}\n"
    chunks = chunk_file("data.js", text)
    assert chunks and chunks[0].start_line == 1 and chunks[-1].end_line == 4
    assert {chunk.kind for chunk in chunks} == {"lines"}


# The patterns before they were made linear, to hold the new ones to the same results.
_OLD_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_OLD_MARKS = re.compile(r"^\s*(?:/{2,3}!?|/\*+|\*+/?|#+|--)|\*+/\s*$", re.MULTILINE)


def test_headings_and_comment_marks_read_as_before() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        line = "".join(rng.choice(" #a\t*/") for _ in range(rng.randint(0, 12)))
        old = _OLD_HEADING.match(line)
        title = old.group(2) if old else None
        [chunk] = chunk_file("x.md", f"{line}\nbody\n")[:1] or [None]
        assert (chunk.symbol if chunk and chunk.kind == "section" else None) == (title or None), repr(line)
        text = "\n".join(rng.choice(["/**", " * a", " ***/", "// b", "#  c", "-- d", "*/", "x */  "]) for _ in range(4))
        assert _COMMENT_MARKS.sub("", text) == _OLD_MARKS.sub("", text), repr(text)


@pytest.mark.parametrize(("path", "text"), [
    # 20,000 spaces in a heading: cubic before (2,000 took 12-15 s, with the GIL held).
    ("README.md", "# a" + " " * 20_000 + "b\nbody\n"),
    # A comment of a million stars above a function: quadratic before (100 KB took 8 s).
    ("x.py", "#" + "*" * 1_000_000 + "\ndef f():\n    return 1\n"),
])  # fmt: skip
def test_hostile_headings_and_comments_take_time_linear_in_them(path: str, text: str) -> None:
    # No clock here: before, this ran for hours, past the suite's per-test timeout.
    chunks = chunk_file(path, text)
    assert chunks and all(c.end_line <= text.count("\n") for c in chunks)


def test_nested_containers_cost_their_lines_not_depth_times_lines() -> None:
    # 400 modules nested around two million blank lines: each level took a set of every line of
    # its module (minutes before; the per-test timeout fails it).
    depth, blank = 400, 2_000_000
    text = "mod m {\n" * depth + "\n" * blank + "fn f() {}\n" + "}\n" * depth
    chunks = chunk_file("deep.rs", text)
    assert len(chunks) == depth + 1
    assert (chunks[-1].symbol, chunks[-1].kind) == (".".join(["m"] * depth + ["f"]), "method")
    assert chunks[0].text == "mod m {\n}\nmembers: m"  # its own lines: the member left out


@pytest.mark.parametrize("source", [
    # Minified code: thousands of functions on one line, and of methods in one class on one line.
    "function a(){return 1};" * 20_000 + "\n",
    "class C{" + "m(){return 1}" * 20_000 + "}\nfunction after() {\n  return 1;\n}\n",
])  # fmt: skip
def test_definitions_sharing_their_lines_do_not_hold_the_file_over_and_over(source: str) -> None:
    # A definition's chunk is its whole lines: 20,000 functions on one line each held the whole
    # line (460 KB), 9 GB of chunk text for the index to tokenize and embed: hours, and more memory
    # than the worker had. Such a file is cut into windows of lines instead.
    chunks = chunk_file("vendor/app.min.js", source)
    assert sum(len(chunk.text) for chunk in chunks) <= len(source)
    assert {chunk.kind for chunk in chunks} <= {"lines"}


def test_a_few_definitions_on_one_line_keep_their_chunks() -> None:
    chunks = chunk_file("small.js", "function a() { return 1; } function b() { return 2; }\n")
    assert _outline(chunks) == [(1, 1, "a", "function"), (1, 1, "b", "function")]
