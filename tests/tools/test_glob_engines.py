"""Globs are untrusted (a client's rules and deny list, a model's patterns), and so are the paths
they are matched against. Python's backtracking engine takes time exponential in a glob's
wildcards on a path that nearly matches; those globs go to RE2, which answers in time linear in
the path, and both engines give the same answers."""

from __future__ import annotations

import re

import pytest

from tool_worker.denied import compile_path_glob
from tool_worker.tools.globs import _Linear, compile_glob_regex, glob_to_regex, translate_glob

# Each would hold a backtracking engine for hours on its path (ten `**/` on 60 components is
# about 60^10 tries): the test ends only because the answer comes in linear time.
CRAFTED = [
    ("/".join(["**"] * 10) + "/x", "/".join(["a"] * 60) + "/y"),
    ("*a*a*a*a*a*a*ax", "a" * 4000),
    ("{a,a}" * 40 + "b", "a" * 40 + "c"),
    ("**/a*a*a*a*a*a*/**/b", "/".join(["a" * 200] * 20) + "/c"),
]

GLOBS = [
    "*.py", "**/*.py", "src/**", "src/**/test_*.py", "**/x/**", "*a*b*", "a?c", "[!a]*.py", "[a-c]*",
    "{src,lib}/**/*.{py,md}", "**/**/x", "a/**/b/**/c", "\\*star", "é*", "dir/*/", "*\udcff*",
]
PATHS = [
    "a.py", "src/a.py", "src/x/test_a.py", "src", "x", "x/y", "a/x/b", "axb", "abc", "b.py", "ab", "c.md",
    "lib/d/e.md", "a/b/c", "a/q/b/r/c", "*star", "éa", "dir/sub", "src/\udcffz", "\udcff", "a\nb.py",
]


@pytest.mark.parametrize(("glob", "path"), CRAFTED)
def test_a_crafted_glob_on_a_crafted_path_is_answered(glob: str, path: str) -> None:
    assert glob_to_regex(glob).fullmatch(path) is None
    assert compile_path_glob(glob).fullmatch(path) is None


@pytest.mark.parametrize("glob", GLOBS)
def test_both_engines_give_the_same_answers(glob: str) -> None:
    for source in (translate_glob(glob), f"(?:.*/)?{translate_glob(glob)}"):
        backtracking, linear = re.compile(source, re.DOTALL), _Linear(source)
        for path in PATHS:
            assert bool(backtracking.fullmatch(path)) == bool(linear.fullmatch(path)), (glob, path)


def test_a_glob_neither_engine_takes_raises_re_error() -> None:
    with pytest.raises(re.error):
        compile_glob_regex(translate_glob("[z-a]*x*"))
    with pytest.raises(re.error):
        compile_glob_regex(translate_glob("[z-a]"))
