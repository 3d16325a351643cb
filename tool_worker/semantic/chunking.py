"""Cut a file into the pieces semantic_search indexes: its definitions, or windows of lines.

A file in a language tree-sitter knows (by its suffix) gives one chunk per function, class and
method, named by its qualified symbol (`Outer.method`). A class-like definition's own chunk holds
its header, docstring and fields (the lines its methods do not cover), plus the names of its
members; each method is a chunk of its own. Comments right above a definition belong to it.
Lines outside every top-level definition (module docstrings, imports, constants) become windows
of at most WINDOW_LINES lines. Files no grammar covers are cut into such windows too, Markdown at
its headings.

Grammars come from the `tree-sitter-language-pack` wheel, which ships them compiled (the `semantic`
extra pins a release that does not download them at run time).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

WINDOW_LINES = 40
# A window with fewer non-blank lines than this says nothing worth a result of its own.
MIN_WINDOW_TEXT_LINES = 2
# A definition's documentation summary is cut here: its first paragraph is what describes it.
MAX_DOC_CHARS = 600
# Suffixes of prose: the `docs` kind of semantic_search; everything else is `code`.
DOC_SUFFIXES = frozenset({".md", ".markdown", ".rst", ".txt", ".adoc", ".org"})
MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
# A definition's chunk holds its whole lines. Where many definitions share lines (minified code:
# thousands of functions on one line) each chunk held those lines again, and the index tokenized
# and embedded the file's text thousands of times over (4,000 functions on a 92 KB line: half a
# minute of one call; 40,000 on a 900 KB line: hours, and more memory than the host has). Past
# this many characters of chunk text per character of the file (code gives about 1.1), plus a
# floor for small files, the file is cut into windows of lines instead.
MAX_TEXT_PER_CHAR = 4
MIN_TEXT_BUDGET = 64 * 1024


@dataclass(frozen=True)
class Chunk:
    """One indexed piece of a file. Lines are 1-based and inclusive."""

    start_line: int
    end_line: int
    # Qualified name of the definition ("Retry.backoff"), the heading of a Markdown section, or ""
    # for a window of lines.
    symbol: str
    # "function", "method", "class" (or the language's word: struct, interface, impl, ...),
    # "section" or "lines".
    kind: str
    text: str
    # The first paragraph of the definition's documentation (its docstring, or the comments right
    # above it), on one line; "" when it has none.
    doc: str = ""


@dataclass(frozen=True)
class Grammar:
    """How to find definitions in one language's syntax tree."""

    language: str
    # Definitions that hold more definitions (their members get chunks of their own), by node type,
    # with the word a result uses for them.
    containers: dict[str, str]
    # Definitions chunked whole (functions, methods), by node type.
    functions: frozenset[str]


_C_LIKE_CONTAINERS = {"struct_specifier": "struct", "union_specifier": "union", "enum_specifier": "enum"}
_JS_FUNCTIONS = frozenset(
    {"function_declaration", "generator_function_declaration", "method_definition", "variable_declarator"}
)
_JS_CONTAINERS = {"class_declaration": "class", "class": "class"}
_TS_CONTAINERS = {
    **_JS_CONTAINERS,
    "abstract_class_declaration": "class",
    "interface_declaration": "interface",
    "enum_declaration": "enum",
    "internal_module": "namespace",
}
_TS_FUNCTIONS = _JS_FUNCTIONS | {"function_signature", "method_signature", "type_alias_declaration"}

GRAMMARS: dict[str, Grammar] = {
    ".py": Grammar("python", {"class_definition": "class"}, frozenset({"function_definition"})),
    ".pyi": Grammar("python", {"class_definition": "class"}, frozenset({"function_definition"})),
    ".js": Grammar("javascript", _JS_CONTAINERS, _JS_FUNCTIONS),
    ".mjs": Grammar("javascript", _JS_CONTAINERS, _JS_FUNCTIONS),
    ".cjs": Grammar("javascript", _JS_CONTAINERS, _JS_FUNCTIONS),
    ".jsx": Grammar("javascript", _JS_CONTAINERS, _JS_FUNCTIONS),
    ".ts": Grammar("typescript", _TS_CONTAINERS, _TS_FUNCTIONS),
    ".tsx": Grammar("tsx", _TS_CONTAINERS, _TS_FUNCTIONS),
    ".go": Grammar(
        "go", {"type_declaration": "type"}, frozenset({"function_declaration", "method_declaration"})
    ),
    ".rs": Grammar(
        "rust",
        {"impl_item": "impl", "trait_item": "trait", "mod_item": "module", "struct_item": "struct",
         "enum_item": "enum"},
        frozenset({"function_item", "function_signature_item", "macro_definition"}),
    ),
    ".java": Grammar(
        "java",
        {"class_declaration": "class", "interface_declaration": "interface", "enum_declaration": "enum",
         "record_declaration": "record"},
        frozenset({"method_declaration", "constructor_declaration"}),
    ),
    ".kt": Grammar(
        "kotlin", {"class_declaration": "class", "object_declaration": "object"},
        frozenset({"function_declaration"}),
    ),
    ".cs": Grammar(
        "csharp",
        {"class_declaration": "class", "interface_declaration": "interface", "struct_declaration": "struct",
         "namespace_declaration": "namespace", "record_declaration": "record"},
        frozenset({"method_declaration", "constructor_declaration"}),
    ),
    ".c": Grammar("c", _C_LIKE_CONTAINERS, frozenset({"function_definition"})),
    ".h": Grammar("c", _C_LIKE_CONTAINERS, frozenset({"function_definition"})),
    **{
        suffix: Grammar(
            "cpp",
            {**_C_LIKE_CONTAINERS, "class_specifier": "class", "namespace_definition": "namespace"},
            frozenset({"function_definition"}),
        )
        for suffix in (".cc", ".cpp", ".cxx", ".hpp", ".hh", ".hxx")
    },
    ".rb": Grammar("ruby", {"class": "class", "module": "module"}, frozenset({"method", "singleton_method"})),
    ".php": Grammar(
        "php",
        {"class_declaration": "class", "interface_declaration": "interface", "trait_declaration": "trait"},
        frozenset({"function_definition", "method_declaration"}),
    ),
    ".scala": Grammar(
        "scala", {"class_definition": "class", "object_definition": "object", "trait_definition": "trait"},
        frozenset({"function_definition"}),
    ),
    ".swift": Grammar(
        "swift", {"class_declaration": "class", "protocol_declaration": "protocol"},
        frozenset({"function_declaration"}),
    ),
    ".lua": Grammar("lua", {}, frozenset({"function_declaration"})),
    ".sh": Grammar("bash", {}, frozenset({"function_definition"})),
    ".bash": Grammar("bash", {}, frozenset({"function_definition"})),
}

# Node types whose text names a definition, when it has no `name` field.
_NAME_TYPES = frozenset(
    {"identifier", "type_identifier", "field_identifier", "qualified_identifier", "property_identifier",
     "constant", "operator_name", "destructor_name", "namespace_identifier", "simple_identifier"}
)
# A C struct, union or enum is defined where it has a body, not where it is only used as a type.
_DEFINED_BY_BODY = frozenset({"struct_specifier", "union_specifier", "enum_specifier"})
_FUNCTION_VALUES = frozenset({"arrow_function", "function", "function_expression", "generator_function"})
# Comment syntax stripped from documentation comments: //, ///, /* */, leading *, #, --.
# Both are matched against files a model may write, and `re` holds the GIL while it matches: they
# must take time linear in the line. A closing `*/` is only looked for at the start of a run of
# `*` (a comment of 100 KB of `*` took 8 s, each `*` starting a scan of the run); a heading's
# closing `#`s and spaces are stripped after the match (the lazy title before them took cubic
# time on a heading with thousands of spaces in it: 2,000 of them, 12-15 s).
_COMMENT_MARKS = re.compile(r"^\s*(?:/{2,3}!?|/\*+|\*+/?|#+|--)|(?<!\*)\*+/\s*$", re.MULTILINE)
_MARKDOWN_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*)$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def is_doc(path: str) -> bool:
    """Whether semantic_search counts this file as `docs` rather than `code`."""
    return PurePosixPath(path).suffix.lower() in DOC_SUFFIXES


def chunk_file(path: str, text: str) -> list[Chunk]:
    """The chunks of one file, in line order (a container's own chunk before its members')."""
    if not text.strip():
        return []
    lines = text.split("\n")
    suffix = PurePosixPath(path).suffix.lower()
    grammar = GRAMMARS.get(suffix)
    if grammar is not None:
        parser = _parser(grammar.language)
        if parser is not None:
            budget = _TextBudget(MAX_TEXT_PER_CHAR * len(text) + MIN_TEXT_BUDGET)
            try:
                return _definition_chunks(parser.parse(text.encode("utf-8")).root_node, grammar, lines, budget)
            except (RecursionError, _Overgrown):
                # Nesting deeper than Python recurses (generated data, say), or definitions sharing
                # their lines over and over (minified code): windows of lines.
                pass
    if suffix in MARKDOWN_SUFFIXES:
        return _markdown_chunks(lines)
    return _windows(lines, 1, len(lines), symbol="", kind="lines")


@functools.cache
def _parser(language: str) -> Any:
    # Imported here: the package is importable (and the tool offerable or not) without the extra.
    from tree_sitter_language_pack import get_parser

    try:
        return get_parser(language)
    except (LookupError, ValueError, OSError):
        return None


class _Overgrown(Exception):
    """The chunks' text passed the file's budget (see MAX_TEXT_PER_CHAR)."""


class _TextBudget:
    """Characters of chunk text a file's definitions may still take."""

    def __init__(self, chars: int) -> None:
        self.left = chars

    def take(self, text: str) -> str:
        self.left -= len(text)
        if self.left < 0:
            raise _Overgrown
        return text


def _definition_chunks(root: Any, grammar: Grammar, lines: list[str], budget: _TextBudget) -> list[Chunk]:
    chunks: list[Chunk] = []
    covered: list[tuple[int, int]] = []
    for node, start, end in _definitions(root, grammar):
        covered.append((start, end))
        chunks.extend(_chunks_of(node, start, end, grammar, lines, prefix="", budget=budget))
    gaps = []
    next_line = 1
    for start, end in sorted(covered):
        if start > next_line:
            gaps.extend(_windows(lines, next_line, start - 1, symbol="", kind="lines"))
        next_line = max(next_line, end + 1)
    if next_line <= len(lines):
        gaps.extend(_windows(lines, next_line, len(lines), symbol="", kind="lines"))
    return sorted(chunks + gaps, key=lambda chunk: chunk.start_line)


def _chunks_of(
    node: Any, start: int, end: int, grammar: Grammar, lines: list[str], prefix: str, budget: _TextBudget
) -> list[Chunk]:
    definition = _unwrap(node)
    name = _name(definition)
    symbol = f"{prefix}{name}" if name else prefix.rstrip(".") or "<anonymous>"
    if definition.type in grammar.containers:
        members = list(_definitions(definition, grammar))
        inner: list[Chunk] = []
        for member, member_start, member_end in members:
            inner.extend(
                _chunks_of(member, member_start, member_end, grammar, lines, prefix=f"{symbol}.", budget=budget)
            )
        # The lines between the members, taken as slices: a set of every line of the container,
        # at every level of nesting, cost depth x lines (400 nested modules around a million
        # blank lines: a minute, holding the worker's thread).
        own_lines: list[str] = []
        cursor = start
        for member_start, member_end in sorted((s, e) for _, s, e in members):
            if member_start > cursor:
                own_lines.extend(lines[cursor - 1 : min(member_start - 1, end)])
            cursor = max(cursor, member_end + 1)
        if cursor <= end:
            own_lines.extend(lines[cursor - 1 : end])
        own = "\n".join(own_lines)
        member_names = [_name(_unwrap(member)) for member, _, _ in members]
        if any(member_names):
            own += "\nmembers: " + ", ".join(filter(None, member_names))
        kind = grammar.containers[definition.type]
        return [Chunk(start, end, symbol, kind, budget.take(own), _documentation(node, definition)), *inner]
    kind = "method" if prefix else "function"
    text = budget.take("\n".join(lines[start - 1 : end]))
    return [Chunk(start, end, symbol, kind, text, _documentation(node, definition))]


def _definitions(node: Any, grammar: Grammar) -> Iterator[tuple[Any, int, int]]:
    """The outermost definitions under `node` (not inside one another), with their line ranges,
    comments right above them included."""
    for child in node.named_children:
        definition = _unwrap(child)
        if _is_definition(definition, grammar):
            yield child, _first_line(child), child.end_point.row + 1
        elif child.type not in grammar.functions:
            yield from _definitions(child, grammar)


def _is_definition(node: Any, grammar: Grammar) -> bool:
    if node.type == "variable_declarator":
        value = node.child_by_field_name("value")
        return node.type in grammar.functions and value is not None and value.type in _FUNCTION_VALUES
    if node.type in _DEFINED_BY_BODY:
        return node.type in grammar.containers and node.child_by_field_name("body") is not None
    return node.type in grammar.functions or node.type in grammar.containers


def _unwrap(node: Any) -> Any:
    """The definition inside a Python decorator or a JS `export`/`const` statement."""
    if node.type == "decorated_definition":
        return node.child_by_field_name("definition") or node
    if node.type in ("lexical_declaration", "variable_declaration") and node.named_child_count == 1:
        return node.named_children[0]
    return node


def _comments_above(node: Any) -> list[Any]:
    """The comment nodes right above a definition (no blank line between), top first."""
    comments = []
    start = node.start_point.row
    previous = node.prev_named_sibling
    while previous is not None and "comment" in previous.type and previous.end_point.row >= start - 1:
        comments.append(previous)
        start = previous.start_point.row
        previous = previous.prev_named_sibling
    return comments[::-1]


def _first_line(node: Any) -> int:
    comments = _comments_above(node)
    return (comments[0] if comments else node).start_point.row + 1


def _documentation(node: Any, definition: Any) -> str:
    """The first paragraph of a Python docstring, else of the comments right above the definition."""
    body = definition.child_by_field_name("body")
    first = body.named_children[0] if body is not None and body.named_child_count else None
    if first is not None and first.type == "expression_statement" and first.named_child_count:
        first = first.named_children[0]  # older grammars wrap the docstring in a statement
    if first is not None and first.type == "string":
        text = "".join(_text(part) for part in first.named_children if part.type == "string_content")
        return _first_paragraph(text)
    return _first_paragraph("\n".join(_COMMENT_MARKS.sub("", _text(c)) for c in _comments_above(node)))


def _first_paragraph(text: str) -> str:
    paragraph = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
    return " ".join(paragraph.split())[:MAX_DOC_CHARS]


def _name(node: Any) -> str:
    named = node.child_by_field_name("name")
    if named is None and node.type == "type_declaration":
        spec = next((child for child in node.named_children if child.type.endswith("_spec")), None)
        named = spec.child_by_field_name("name") if spec is not None else None
    if named is None and node.type == "impl_item":
        implemented = node.child_by_field_name("type")
        trait = node.child_by_field_name("trait")
        if implemented is not None:
            return _text(implemented) + (f" ({_text(trait)})" if trait is not None else "")
    declarator = node
    while named is None and declarator is not None:
        # C and C++: the name sits inside nested declarators (pointer, function, reference).
        declarator = declarator.child_by_field_name("declarator")
        if declarator is not None and declarator.type in _NAME_TYPES:
            named = declarator
    if named is None:
        named = next((child for child in node.named_children if child.type in _NAME_TYPES), None)
    return _text(named) if named is not None else ""


def _text(node: Any) -> str:
    return node.text.decode("utf-8", "replace") if node.text is not None else ""


def _windows(lines: list[str], first: int, last: int, *, symbol: str, kind: str) -> list[Chunk]:
    """Lines first..last cut into windows of at most WINDOW_LINES, empty edges trimmed."""
    chunks = []
    start = first
    while start <= last:
        end = min(start + WINDOW_LINES - 1, last)
        window = lines[start - 1 : end]
        text_lines = [number for number, line in enumerate(window, start=start) if line.strip()]
        if len(text_lines) >= MIN_WINDOW_TEXT_LINES:
            trimmed = lines[text_lines[0] - 1 : text_lines[-1]]
            chunks.append(Chunk(text_lines[0], text_lines[-1], symbol, kind, "\n".join(trimmed)))
        start = end + 1
    return chunks


def _markdown_chunks(lines: list[str]) -> list[Chunk]:
    """One chunk per heading's section (windowed when long); headings inside code fences do not count."""
    sections: list[tuple[int, str]] = [(1, "")]
    fenced = False
    for number, line in enumerate(lines, start=1):
        if _FENCE.match(line):
            fenced = not fenced
        heading = None if fenced else _MARKDOWN_HEADING.match(line)
        if heading:
            if number == 1:
                sections = []
            sections.append((number, heading.group(2).rstrip().rstrip("#").rstrip()))
    chunks = []
    for index, (start, title) in enumerate(sections):
        end = sections[index + 1][0] - 1 if index + 1 < len(sections) else len(lines)
        chunks.extend(_windows(lines, start, end, symbol=title, kind="section" if title else "lines"))
    return chunks
