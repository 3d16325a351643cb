"""Globs are untrusted (a client's rules and deny list, a model's patterns), and so are the paths
they are matched against. Translated as written, a glob takes Python's backtracking engine time
exponential in its wildcards on a path that nearly matches; compiled (tool_worker.tools.globs),
every glob matches in time linear in the path and matches exactly what it always did."""

from __future__ import annotations

import random
import re

import pytest

from tool_worker.denied import compile_path_glob
from tool_worker.tools.globs import Budget, _Linear, compile_glob, glob_to_regex, globs_overlap, translate_glob

# Each would hold a backtracking engine for hours on its path (ten `**/` on 60 components is
# about 60^10 tries): the test ends only because the answer comes in linear time.
CRAFTED = [
    ("/".join(["**"] * 10) + "/x", "/".join(["a"] * 60) + "/y"),
    ("*a*a*a*a*a*a*ax", "a" * 4000),
    ("{a,a}" * 40 + "b", "a" * 40 + "c"),
    ("**/a*a*a*a*a*a*/**/b", "/".join(["a" * 200] * 20) + "/c"),
    ("**/a*a*a*a*a*a*/**/a*a*a*a*a*a*/**/b", "/".join(["a" * 200] * 20) + "/c"),
    ("[!b]*a*a*a*a*a*ax", "a" * 4000),
]

GLOBS = [
    "*.py", "**/*.py", "src/**", "src/**/test_*.py", "**/x/**", "*a*b*", "a?c", "[!a]*.py", "[a-c]*",
    "{src,lib}/**/*.{py,md}", "**/**/x", "a/**/b/**/c", "\\*star", "é*", "dir/*/", "*\udcff*", "[.-0]*",
]
PATHS = [
    "a.py", "src/a.py", "src/x/test_a.py", "src", "x", "x/y", "a/x/b", "axb", "abc", "b.py", "ab", "c.md",
    "lib/d/e.md", "a/b/c", "a/q/b/r/c", "*star", "éa", "dir/sub", "src/\udcffz", "\udcff", "a\nb.py", "./x",
]


def _as_written(glob: str, any_directory: bool = False, suffix: str = "") -> re.Pattern[str]:
    """The glob translated as written: what it must match (and slow only on crafted paths)."""
    return re.compile(("(?:.*/)?" if any_directory else "") + translate_glob(glob) + suffix, re.DOTALL)


@pytest.mark.parametrize(("glob", "path"), CRAFTED)
def test_a_crafted_glob_on_a_crafted_path_is_answered(glob: str, path: str) -> None:
    assert glob_to_regex(glob).fullmatch(path) is None
    assert compile_path_glob(glob).fullmatch(path) is None


@pytest.mark.parametrize("glob", GLOBS)
def test_a_compiled_glob_matches_what_it_says(glob: str) -> None:
    for any_directory in (False, True):
        compiled, reference = compile_glob(glob, any_directory=any_directory), _as_written(glob, any_directory)
        for path in PATHS:
            assert bool(compiled.fullmatch(path)) == bool(reference.fullmatch(path)), (glob, any_directory, path)
    source = translate_glob(glob)
    linear = _Linear(source)  # RE2, where braces send a glob: the same answers as `re`
    for path in PATHS:
        assert bool(linear.fullmatch(path)) == bool(_as_written(glob).fullmatch(path)), (glob, path)


def test_random_globs_match_what_they_say() -> None:
    # Small globs and paths of a few letters, where the glob as written is quick to match: the
    # atomic form (and RE2, for braces) must give its answers, for thousands of pairs.
    rng = random.Random(2026)
    pieces = ["a", "b", "*", "**/", "?", "/", "[ab]", "[!a]", "{a,b*}", "\\*", "/**"]
    for _ in range(3000):
        glob = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        any_directory = rng.random() < 0.3
        suffix = rng.choice(["", "(?:/.*)?"])
        try:
            reference = _as_written(glob, any_directory, suffix)
        except re.error:
            continue
        compiled = compile_glob(glob, any_directory=any_directory, suffix=suffix)
        for _ in range(20):
            path = "".join(rng.choice("ab/*") for _ in range(rng.randint(0, 8)))
            assert bool(compiled.fullmatch(path)) == bool(reference.fullmatch(path)), (glob, suffix, path)


def test_a_glob_no_engine_takes_raises_re_error() -> None:
    for bad in ("[z-a]*x*", "[z-a]", "{a,[z-a]}"):
        with pytest.raises(re.error):
            compile_glob(bad)


def test_globs_overlap_whenever_a_path_matches_both() -> None:
    # globs_overlap may say yes when no path matches both (two classes), never no when one does:
    # random globs against random paths, and each pair's answer checked against every path found.
    rng = random.Random(2027)
    pieces = ["a", "b", "*", "**/", "?", "/", "[ab]", "[!a]", "{a,b*}", "\\*", "/**"]
    paths = ["".join(rng.choice("ab/*") for _ in range(rng.randint(0, 7))) for _ in range(400)]
    for _ in range(1500):
        first, second = ("".join(rng.choice(pieces) for _ in range(rng.randint(1, 5))) for _ in range(2))
        try:
            a, b, b_below = compile_glob(first), compile_glob(second), compile_glob(second, suffix="(?:/.*)?")
        except re.error:
            continue
        if any(a.fullmatch(p) and b.fullmatch(p) for p in paths):
            assert globs_overlap(first, second, Budget(10**6)), (first, second)
        if any(a.fullmatch(p) and b_below.fullmatch(p) for p in paths):
            assert globs_overlap(first, second, Budget(10**6), below_second=True), (first, second)
    assert not globs_overlap("*.py", "**/*.env", Budget(10**6))
    assert not globs_overlap("src/*", "secret", Budget(10**6), below_second=True)
    assert globs_overlap("s*/key", "secret", Budget(10**6), below_second=True)
    assert globs_overlap("*.py", "**/*.env", Budget(0))  # past its budget: taken to overlap
