"""Protected and denied paths, as the file tools and the sandbox's mounts both see them."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import glob
import os
import posixpath
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tool_worker.confinement.policy import SandboxSettings
from tool_worker.denied import literal_glob, relative_to_root
from tool_worker.tools.base import ErrorKind, ToolContext, ToolFailure

T = TypeVar("T")

# Files through which git takes its configuration and hooks from another directory (commondir)
# or reads more configuration (config.worktree), in the repository's git dir and in each
# submodule's (git status recurses into them). A read-only mount cannot keep them out as it keeps
# .git/config: they do not exist, and .git must stay writable for git to work. The file tools
# refuse them; one a command creates is removed when the command ends (remove_planted).
# The files of processes, the server's own among them (/proc/self/environ holds its API keys and
# tokens, cmdline its flags): a workspace of `/` reaches them, and the file tools run in the
# server and its workers, unconfined (commands see a /proc of their own). No tool reads, lists or
# writes them, as none does the data dir; no workspace lies in them (config.resolve_workspace).
NEVER_TOUCHED = ("/proc",)

GIT_REDIRECTS = (".git/commondir", ".git/config.worktree", ".git/modules/*/commondir",
                 ".git/modules/*/config.worktree")


def protected_targets(root: Path, patterns: Iterable[str]) -> Iterator[Path]:
    """Each protected path of the workspace whose real path is `root`, with `*` expanded among
    existing entries and symlinks resolved (a `.git/hooks` that links elsewhere protects where it
    points). Entries that do not exist are given as their real parent plus the missing rest."""
    for pattern in patterns:
        path = pattern if os.path.isabs(pattern) else os.path.join(root, pattern)
        matches = glob.glob(glob.escape(path).replace("[*]", "*")) if "*" in pattern else [path]
        for match in matches:
            yield Path(os.path.realpath(match))


def within(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def overlap(target: Path, guarded: Iterable[Path]) -> Path | None:
    """The first guarded path that `target` is inside of, or that is inside `target` (changing a
    parent changes what it holds); None when there is none."""
    for path in guarded:
        if within(target, path) or within(path, target):
            return path
    return None


def _matched(root: Path, target: Path, patterns: Iterable[str]) -> Path | None:
    """A relative protected pattern that `target`, or a directory it lies in, matches by name:
    a path that does not exist yet (a new submodule's hooks) is matched too."""
    if not within(target, root):
        return None
    parts = target.relative_to(root).parts
    for pattern in patterns:
        if os.path.isabs(pattern):
            continue
        wanted = Path(pattern).parts
        if len(parts) >= len(wanted) and all(map(fnmatch.fnmatchcase, parts, wanted)):
            return root.joinpath(*parts[: len(wanted)])
    return None


def refuse_protected(ctx: ToolContext, tool: str, *targets: tuple[Path, str]) -> None:
    """For the file tools: raises PERMISSION_DENIED, before anything changes, when the session's
    sandbox is read-only, or when a target (a resolved path, and the path as the model gave it)
    is, holds or lies inside a protected or denied path."""
    if not ctx.policy.writes_workspace:
        raise ToolFailure(
            f"{tool} was not run: this session's sandbox is read-only, so no tool may change files",
            ErrorKind.PERMISSION_DENIED,
        )
    root = Path(os.path.realpath(ctx.workspace))
    settings = ctx.sandbox.settings
    denied = (Path(os.path.realpath(p)) for p in (*settings.denied_paths(), *NEVER_TOUCHED))
    # A denied directory that holds the whole workspace does not forbid the workspace itself (the
    # sandbox's mounts make the same exception).
    guarded = [*protected_targets(root, settings.protect), *(p for p in denied if not within(root, p))]
    for target, shown in targets:
        hit = overlap(target, guarded) or _matched(root, target, (*settings.protect, *GIT_REDIRECTS))
        if hit is not None:
            where = os.path.relpath(hit, root) if within(hit, root) else str(hit)
            raise ToolFailure(
                f"{tool} was not run: {shown} touches {where}, which is protected (no tool may change "
                ".git/hooks, .git/config or where git would take them from, the server's own files or "
                "the operator's protected paths)",
                ErrorKind.PERMISSION_DENIED,
            )


async def off_the_loop_if_submodules(workspace: Path, function: Callable[..., T], *arguments: Any) -> T:
    """`function(*arguments)`, work over the workspace's repository: in a thread when the
    repository has submodules (`.git/modules`, whose entries a command may have made by the
    hundred thousand: seconds of work that stalled every session), here otherwise, where a few
    stats cost less than the hop to a thread and back (about a quarter of what a sandbox built
    ahead adds to a call)."""
    if _has_submodules(workspace):
        return await asyncio.to_thread(function, *arguments)
    return function(*arguments)


def _has_submodules(workspace: Path) -> bool:
    return os.path.lexists(os.path.join(os.path.realpath(workspace), ".git", "modules"))


def absent_git_redirects(workspace: Path) -> list[Path]:
    """The GIT_REDIRECTS of a repository (its submodules' among them) that do not exist now,
    before a command runs."""
    root = Path(os.path.realpath(workspace))
    if not (root / ".git").is_dir():
        return []
    git_dirs = [root / ".git", *(path for path in (root / ".git" / "modules").glob("*") if path.is_dir())]
    names = dict.fromkeys(posixpath.basename(redirect) for redirect in GIT_REDIRECTS)
    return [git_dir / name for git_dir in git_dirs for name in names if not os.path.lexists(git_dir / name)]


def remove_planted(absent: list[Path]) -> list[Path]:
    """Removes those of `absent` that exist now (a command created them); returns them."""
    planted = [path for path in absent if os.path.lexists(path)]
    for path in planted:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return planted


def operator_denied_inside(settings: SandboxSettings, workspace: str) -> tuple[str, ...]:
    """The operator's deny list (the data dir, TLS files, --sandbox-deny-read, the home's
    credentials), and NEVER_TOUCHED, where it lies inside the workspace, relative to the
    workspace's real path. A denied directory holding the whole workspace is not among them (the
    sandbox's mounts make the same exception)."""
    root = os.path.realpath(workspace)
    inside = (relative_to_root(root, os.path.realpath(path)) for path in (*settings.denied_paths(), *NEVER_TOUCHED))
    return tuple(dict.fromkeys(relative for relative in inside if relative not in (None, ".")))


def operator_excludes_inside(settings: SandboxSettings, workspace: str) -> tuple[str, ...]:
    """The workspace's own exclusion patterns (WorkspaceSnapshot.exclude): `operator_denied_inside`
    less the paths that are not valid UTF-8. A pattern travels as a proto string, which must be
    UTF-8, and the digest's rule 1 leaves such a name out of every snapshot already, with all under
    it (the tools' deny globs keep them: `operator_denied_globs`)."""
    return tuple(relative for relative in operator_denied_inside(settings, workspace) if _is_utf8(relative))


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: a byte of a name that is not UTF-8
        return False
    return True


def operator_denied_globs(settings: SandboxSettings, workspace: str) -> tuple[str, ...]:
    """`operator_denied_inside` as deny globs for the tools that read and list: the sandbox keeps
    commands out of these paths, and read, grep, search, the listings and copy must not hand them
    over either (they read a session's history out of a data dir inside the workspace)."""
    return tuple(literal_glob(relative) for relative in operator_denied_inside(settings, workspace))
