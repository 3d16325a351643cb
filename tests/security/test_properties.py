"""Property tests: no generated path reaches outside the workspace or past a deny, and no shell
line a prefix rule allows runs anything but what the rule names.

Paths are built from `..`, `.`, symlinks (inside, outside, to the parent, a loop), unicode names,
absolute forms and doubled slashes; shell lines from operators, redirections, substitutions,
quotes and writing options. The oracles are independent of the code under test: the file system
(`os.path.realpath`) for paths, and bash itself, run with stub programs, for commands.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from session_server.permissions import Action, PermissionPolicy
from tool_worker.sandbox import resolve_in_workspace
from tool_worker.tools.base import ToolFailure

# No example database: the suite leaves nothing behind in the checkout.
PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def tree() -> tuple[Path, Path]:
    """A workspace with links every which way, and a directory outside it."""
    base = Path(tempfile.mkdtemp(prefix="codelane-props-"))
    workspace, outside = base / "ws", base / "outside"
    for directory in ("src/deep", "secret/inner", "日本"):
        (workspace / directory).mkdir(parents=True)
    outside.mkdir()
    (workspace / "secret" / "key").write_text("k")
    (workspace / "src" / "a.py").write_text("a")
    (outside / "passwd").write_text("p")
    links = {
        "src/to_secret": "../secret", "src/deep/up": "../..", "in_link": "src", "out_link": str(outside),
        "rel_out": "../outside", "loop": "loop", "secret_key_link": "secret/key", "dot": ".",
    }
    for name, target in links.items():
        os.symlink(target, workspace / name)
    yield workspace, outside
    shutil.rmtree(base)


COMPONENTS = st.sampled_from(
    ["src", "deep", "secret", "inner", "key", "a.py", "..", ".", "", "in_link", "out_link", "rel_out", "loop",
     "to_secret", "up", "secret_key_link", "dot", "日本", "é", "passwd", "ws", "outside", "new.txt"]
)


@st.composite
def paths(draw, workspace: Path) -> str:
    relative = "/".join(draw(st.lists(COMPONENTS, min_size=1, max_size=7)))
    prefix = draw(st.sampled_from(["", "./", "/", f"{workspace}/", f"{workspace}//", f"{workspace.parent}/"]))
    return prefix + relative


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def test_no_generated_path_leaves_the_workspace(tree) -> None:
    workspace, _ = tree
    root = os.path.realpath(workspace)

    @PROPERTY_SETTINGS
    @given(path=paths(workspace), follow=st.booleans())
    def check(path: str, follow: bool) -> None:
        try:
            resolved = resolve_in_workspace(workspace, path, follow_final_symlink=follow)
        except ToolFailure:
            return
        assert inside(str(resolved), root), path
        # What a tool then opens: the real path of what it was given, or (not following a final
        # link, as delete and move do) the entry in its real parent directory.
        if follow:
            assert inside(os.path.realpath(resolved), root), path
        elif str(resolved) != root:
            assert inside(os.path.realpath(resolved.parent), root), path

    check()


def test_no_generated_path_reaches_past_a_deny(tree) -> None:
    workspace, _ = tree
    root = os.path.realpath(workspace)
    secret = os.path.join(root, "secret")
    policy = PermissionPolicy.parse(deny=["read(secret/**)"], allow=["read(src/**)"], default_action="ask")

    @PROPERTY_SETTINGS
    @given(path=paths(workspace), tool=st.sampled_from(["read", "grep", "ls", "list_files", "search", "copy",
                                                          "edit"]))
    def check(path: str, tool: str) -> None:
        arguments = {
            "read": {"file_path": path}, "edit": {"file_path": path, "old_string": "a", "new_string": "b"},
            "copy": {"source": path, "destination": "new.txt"}, "grep": {"pattern": "x", "path": path},
            "search": {"query": "x", "path": path},
        }.get(tool, {"path": path})
        action = policy.decide(tool, arguments, str(workspace)).action
        try:
            real = os.path.realpath(resolve_in_workspace(workspace, path))
        except ToolFailure:
            return  # the tool refuses it anyway
        if inside(real, secret):
            assert action is Action.DENY, (tool, path, real)
        if action is Action.ALLOW:
            assert tool == "read" and inside(real, os.path.join(root, "src")), (tool, path, real)

    check()


# -- shell lines: bash is the oracle -------------------------------------------------------------

# Lines start with `git` (what the rule names) so that many are allowed and then run; what follows
# tries every way out: operators starting another command, redirections, substitutions, quotes,
# writing options.
TOKENS = st.sampled_from(
    ["git", "status", "log", "--oneline", "x", "-c", "alias.x=!touch", "--output=../o", "-C", "..", ">", ">>", "<",
     "2>&1", "2>/dev/null", "> out/log", "out/log", "../escape", "&& git", "|| git", "; git", "| git", "\n git",
     "&&", ";", "|", "$(", ")", "`", "'", '"', "$X", "rm", "touch", "pwned", "sh", "(", "{", "}"]
)
STUBS = ("git", "rm", "touch", "sh", "cat", "xargs", "env")


def test_an_allowed_shell_line_runs_only_what_the_rule_names(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    policy = PermissionPolicy.parse(allow=["bash(git *)", "write(out/**)"], default_action="deny")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "ran.log"
    for name in STUBS:
        # Each stub records its name and its arguments, one per line, and does nothing else.
        (stubs / name).write_text(f'#!{bash}\nprintf "ran %s\\n" "{name}" >> "{log}"\n'
                                  f'printf "arg %s\\n" "$@" >> "{log}"\n')
        (stubs / name).chmod(0o755)

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(TOKENS, max_size=9))
    def check(tokens: list[str]) -> None:
        command = " ".join(["git", *tokens])
        if policy.decide("bash", {"command": command}, str(tmp_path / "ws")).action is not Action.ALLOW:
            return
        with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
            workspace = Path(scratch) / "ws"
            (workspace / "out").mkdir(parents=True)
            log.unlink(missing_ok=True)
            subprocess.run([bash, "--norc", "--noprofile", "-c", command], cwd=workspace, timeout=10,
                           env={"PATH": str(stubs)}, capture_output=True, stdin=subprocess.DEVNULL)
            ran = log.read_text().splitlines() if log.exists() else []
            programs = {line.removeprefix("ran ") for line in ran if line.startswith("ran ")}
            assert programs <= {"git"}, (command, ran)
            for forbidden in ("-c", "--output=../o", "-C"):
                assert f"arg {forbidden}" not in ran, (command, ran)
            created = {str(p.relative_to(scratch)) for p in Path(scratch).rglob("*")}
            assert created <= {"ws", "ws/out"} | {c for c in created if c.startswith("ws/out/")}, (command, created)

    check()
