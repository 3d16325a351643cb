"""The watch that lets semantic_search skip listing and stating an unchanged tree: every change a
refresh would see must end its quiet, and nothing else should."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tool_worker.semantic.watch import TreeWatch, filesystem_type

pytest.importorskip("inotify_simple", reason="inotify is Linux's")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (root / "empty" / "deeper").mkdir(parents=True)  # no file rg would list: watched all the same
    (root / ".hidden").mkdir()
    (root / "README.md").write_text("# Title\n")
    return root


@pytest.fixture
def watch(tree: Path):
    watch = TreeWatch(str(tree))
    yield watch
    watch.close()


def _armed(watch: TreeWatch) -> TreeWatch:
    assert not watch.quiet()  # never armed: nothing is proven
    watch.arm()
    assert watch.quiet()
    return watch


CHANGES = {
    "append to a file": lambda root: (root / "src" / "pkg" / "mod.py").open("a").write("x = 2\n"),
    "create a file": lambda root: (root / "src" / "new.py").write_text("y = 1\n"),
    "delete a file": lambda root: (root / "README.md").unlink(),
    "rename a file": lambda root: (root / "README.md").rename(root / "GUIDE.md"),
    "chmod a file": lambda root: (root / "README.md").chmod(0o600),
    "a file in a directory that held none": lambda root: (root / "empty" / "deeper" / "late.py").write_text("z = 3\n"),
    "create a directory": lambda root: (root / "src" / "sub").mkdir(),
    "edit a .gitignore": lambda root: (root / "src" / ".gitignore").write_text("pkg/\n"),
    "a .gitignore in a parent": lambda root: (root.parent / ".gitignore").write_text("ws/src/\n"),
    "the repository's excludes": lambda root: (
        (root / ".git" / "info").mkdir(parents=True), (root / ".git" / "info" / "exclude").write_text("*.md\n")),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_made_before_the_question_ends_the_quiet(watch: TreeWatch, tree: Path, change: str) -> None:
    _armed(watch)
    CHANGES[change](tree)
    assert not watch.quiet()
    watch.arm()  # the refresh that follows lists the change; the tree is quiet again
    assert watch.quiet()


def test_hidden_files_change_nothing_rg_lists(watch: TreeWatch, tree: Path) -> None:
    _armed(watch)
    (tree / ".hidden" / "secret.py").write_text("k = 1\n")
    (tree / "src" / ".mod.py.swp").write_text("swap")
    assert watch.quiet()


def test_directories_created_or_moved_in_are_watched_from_the_next_arm(watch: TreeWatch, tree: Path) -> None:
    _armed(watch)
    (tree / "new" / "inner").mkdir(parents=True)
    assert not watch.quiet()
    watch.arm()
    (tree / "new" / "inner" / "file.py").write_text("a = 1\n")
    assert not watch.quiet()
    watch.arm()
    (tree / "src" / "pkg").rename(tree / "moved")
    assert not watch.quiet()
    watch.arm()
    (tree / "moved" / "mod.py").write_text("b = 2\n")
    assert not watch.quiet()


def test_an_overflowed_queue_is_not_taken_for_quiet(watch: TreeWatch, tree: Path) -> None:
    _armed(watch)
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    files = [tree / "src" / "a.py", tree / "src" / "b.py"]
    for path in files:
        path.write_text("")
    # Alternating files: the kernel merges an event identical to the one queued last.
    for count in range(limit + 10):
        os.utime(files[count % 2])
    (tree / "lost").mkdir()  # its event did not fit in the queue
    assert not watch.quiet()
    watch.arm()  # watches the tree anew
    assert watch.quiet()
    (tree / "lost" / "mod.py").write_text("c = 3\n")
    assert not watch.quiet()


def test_a_tree_too_large_or_not_local_is_never_quiet(tree: Path) -> None:
    small = TreeWatch(str(tree), max_directories=2)
    small.arm()
    assert not small.quiet()
    assert filesystem_type("/proc/sys") == "proc"
    remote = TreeWatch("/proc/sys")  # not a filesystem whose changes all reach inotify
    remote.arm()
    assert not remote.quiet()


_QUIET_AFTER_ARM = """
import sys
from tool_worker.semantic.watch import TreeWatch
watch = TreeWatch(sys.argv[1])
watch.arm()
print(watch.quiet())
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
@pytest.mark.parametrize(("inner", "quiet"), [("mqueue", False), ("tmpfs", True)])
def test_a_tree_with_a_mount_not_known_to_be_local_inside_is_never_quiet(
    tree: Path, inner: str, quiet: bool
) -> None:
    # An NFS or FUSE mount inside a local workspace changes under it unseen by inotify, as a root
    # on one does. mqueue (small, empty) stands for them: another host's filesystem needs another
    # host. tmpfs, a local one, shows the check is about the mount's kind. Mounted in a mount
    # namespace of the test's own.
    mounted = tree / "src" / "mounted"
    mounted.mkdir()
    script = f'mount -t {inner} {inner} "$1" && exec "$2" -c "$3" "$4"'
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(mounted), sys.executable,
         _QUIET_AFTER_ARM, str(tree)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(quiet)


def _inotify_instances() -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.exists(fd) and os.readlink(fd) == "anon_inode:inotify")


def test_every_watch_of_a_process_shares_one_inotify_instance(tree: Path, tmp_path: Path) -> None:
    # Instances are few (fs.inotify.max_user_instances counts every process of the user).
    watches = []
    for number in range(3):
        root = tmp_path / f"other{number}"
        (root / "src").mkdir(parents=True)
        watches.append(TreeWatch(str(root)))
    watches.append(TreeWatch(str(tree)))
    for watch in watches:
        watch.arm()
    assert all(watch.quiet() for watch in watches)
    assert _inotify_instances() <= 1
    (tree / "README.md").write_text("changed\n")
    assert [watch.quiet() for watch in watches] == [True, True, True, False]
    for watch in watches:
        watch.close()


def test_nested_workspaces_keep_their_shared_watches_until_both_close(tree: Path) -> None:
    outer, inner = TreeWatch(str(tree)), TreeWatch(str(tree / "src"))
    outer.arm()
    inner.arm()
    outer.close()
    assert inner.quiet()
    (tree / "src" / "pkg" / "mod.py").write_text("d = 4\n")
    assert not inner.quiet()
    inner.close()


def test_a_tree_deleted_and_made_again_at_its_path_is_watched_anew(watch: TreeWatch, tree: Path) -> None:
    # The root's watch went with the old directory, and nothing watches its parent to see the new
    # one made: the next arm watched nothing at all, and the watch stayed quiet through every
    # later change, so semantic_search answered from the old index for good.
    _armed(watch)
    shutil.rmtree(tree)
    (tree / "src").mkdir(parents=True)
    assert not watch.quiet()
    watch.arm()  # the refresh that follows lists the new tree
    assert watch.quiet()
    (tree / "src" / "late.py").write_text("def late():\n    return 1\n")
    assert not watch.quiet()


def test_a_tree_whose_parent_moved_away_and_another_tree_at_its_path_ends_the_quiet(
    watch: TreeWatch, tree: Path, tmp_path: Path
) -> None:
    # The watches follow the directories moved away with their parent (no event: the tree itself
    # did not move); the new tree at the workspace's path was never seen.
    _armed(watch)
    tree.parent.rename(tmp_path.parent / (tmp_path.name + "-moved"))
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "other.py").write_text("def other():\n    return 2\n")
    assert not watch.quiet()
    watch.arm()
    assert watch.quiet()
    (tree / "src" / "late.py").write_text("def late():\n    return 1\n")
    assert not watch.quiet()
