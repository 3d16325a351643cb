"""The workspace digest: canonical bytes, the spec's rules, and incremental rescans that always
agree with a scan from scratch."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from codelane.reapi import remote_execution_pb2 as reapi
from codelane.v1 import workspace_pb2
from tool_worker.inotify import shared_inotify
from tool_worker.merkle import EMPTY_HASH, Digest, Exclusions, TreeScanner, digest_of, hash_file


def make_tree(root: Path) -> None:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "src" / "pkg" / "main.py").write_text("print('hi')\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "blank").write_bytes(b"")
    (root / "ünï cödé.txt").write_text("unicode\n")
    (root / "link").symlink_to("src/pkg/main.py")
    (root / ".git" / "objects" / "ab").mkdir(parents=True)
    (root / ".git" / "objects" / "ab" / "cdef").write_bytes(b"object")
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")


def test_a_chain_of_directories_too_deep_to_scan_is_a_plain_error(tmp_path: Path) -> None:
    # RecursionError escaped: every call bound for a worker failed INTERNAL, with a traceback.
    deep = tmp_path / "ws"
    deepest = deep / "/".join(["d"] * 600)  # a 1.2 KB path; the scan takes two frames a level
    os.makedirs(deepest)
    try:
        with pytest.raises(OSError, match="nests directories too deep to snapshot"):
            TreeScanner(str(deep), watch=False).scan()
    finally:
        os.removedirs(deepest)  # upwards, one level at a time: rmtree recurses as the scan did


def test_bytes_are_what_protobuf_serializes(tmp_path: Path) -> None:
    make_tree(tmp_path)
    tree = digest_of(str(tmp_path))
    root = reapi.Directory.FromString(tree.blobs[tree.digest.hash])
    assert [f.name for f in root.files] == ["blank", "run.sh", "ünï cödé.txt"]
    assert [d.name for d in root.directories] == [".git", "empty", "src"]
    assert [(s.name, s.target) for s in root.symlinks] == [("link", "src/pkg/main.py")]
    assert root.files[1].is_executable and not root.files[0].is_executable
    assert root.files[0].digest.hash == EMPTY_HASH and root.files[0].digest.size_bytes == 0
    assert root.directories[1].digest.hash == EMPTY_HASH
    for blob in tree.blobs.values():
        if blob == tree.blobs[tree.times_digest.hash]:
            assert workspace_pb2.DirectoryTimes.FromString(blob).SerializeToString(deterministic=True) == blob
    for hash_hex, blob in tree.blobs.items():
        assert Digest.of(blob).hash == hash_hex
    assert root.SerializeToString(deterministic=True) == tree.blobs[tree.digest.hash]
    assert tree.digest == Digest.of(tree.blobs[tree.digest.hash])


def test_excluded_paths_and_undecodable_names_are_left_out(tmp_path: Path) -> None:
    make_tree(tmp_path)
    tree = digest_of(str(tmp_path))
    git = reapi.Directory.FromString(tree.blobs[next(
        d.digest.hash for d in reapi.Directory.FromString(tree.blobs[tree.digest.hash]).directories if d.name == ".git"
    )])
    assert [f.name for f in git.files] == ["HEAD"]
    assert [d.name for d in git.directories] == ["objects"]
    assert git.directories[0].digest.hash == EMPTY_HASH  # "a/**" keeps "a" itself, empty
    before = tree.digest
    (tmp_path / ".git" / "objects" / "ab" / "new").write_bytes(b"more")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path.joinpath(os.fsdecode(b"bad\xff"))).write_text("x")
    after = digest_of(str(tmp_path))
    assert after.digest == before
    assert any("not valid UTF-8" in s for s in after.skipped)
    assert any(s.startswith("pipe:") for s in after.skipped)
    assert digest_of(str(tmp_path), excludes=()).digest != before


def test_exclusion_patterns() -> None:
    rules = Exclusions(["**/node_modules", "build/*.o", "a/**", "x?z"])
    assert rules.excluded("node_modules") and rules.excluded("web/app/node_modules")
    assert rules.excluded("build/main.o") and not rules.excluded("build/sub/main.o")
    assert rules.excluded("a/b") and rules.excluded("a/b/c") and not rules.excluded("a")
    assert rules.excluded("xyz") and not rules.excluded("xz") and not rules.excluded("x/z")
    assert not Exclusions([]).excluded("anything")
    with pytest.raises(ValueError):
        Exclusions(["/abs"])


@pytest.mark.parametrize(("pattern", "miss", "hit"), [
    ("*a" * 20 + "*b", "a" * 40, "a" * 40 + "b"),
    ("**/a*/" * 20 + "b", "a/" * 40 + "a", "a/" * 40 + "b"),
], ids=["stars", "globstars"])
def test_a_hostile_exclusion_pattern_matches_in_time_linear_in_the_path(pattern: str, miss: str, hit: str) -> None:
    # Patterns come from the hub (Welcome, each snapshot), and a worker matches every path it
    # scans against them. Translated as written, 20 wildcards backtracked for ever on a path that
    # almost matches (the GIL held: no heartbeat, no result, the worker lost).
    check = f"from tool_worker.merkle import Exclusions; e = Exclusions([{pattern!r}]); print(e.excluded({miss!r}), e.excluded({hit!r}))"  # noqa: E501
    try:
        done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=30, check=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    except subprocess.TimeoutExpired:
        raise AssertionError(f"matching {pattern[:30]!r}... took more than 30 s") from None
    assert done.stdout.split() == ["False", "True"]


def _spec_regex(pattern: str) -> str:
    """workspace.proto's rule 2, translated as written (backtracking without bound)."""
    out = []
    parts = pattern.split("/")
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]*/)*")
            continue
        text = "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in part)
        out.append(text if last else text + "/")
    return "".join(out)


def test_exclusion_patterns_match_what_the_spec_says() -> None:
    rng = random.Random(7)
    components = ["**", "*", "a*", "*a", "*a*b", "a?", "?*", "a**b", "ab", "b", "*b*"]
    paths = ["/".join(rng.choice(["a", "b", "ab", "ba", "aab", "bab", "x"]) for _ in range(rng.randint(1, 5)))
             for _ in range(300)]
    for _ in range(300):
        pattern = "/".join(rng.choice(components) for _ in range(rng.randint(1, 4)))
        spec = re.compile(_spec_regex(pattern), re.DOTALL)
        rules = Exclusions([pattern])
        for path in paths:
            assert rules.excluded(path) == (spec.fullmatch(path) is not None), (pattern, path)


def test_each_change_changes_the_digest(tmp_path: Path) -> None:
    make_tree(tmp_path)
    seen = {digest_of(str(tmp_path)).digest}
    (tmp_path / "blank").chmod(0o755)
    seen.add(digest_of(str(tmp_path)).digest)
    (tmp_path / "link").unlink()
    (tmp_path / "link").symlink_to("elsewhere")
    seen.add(digest_of(str(tmp_path)).digest)
    (tmp_path / "empty" / "sub").mkdir()
    seen.add(digest_of(str(tmp_path)).digest)
    (tmp_path / "src" / "pkg" / "main.py").write_text("print('bye')\n")
    seen.add(digest_of(str(tmp_path)).digest)
    assert len(seen) == 5


def _mutate(root: Path, rng: random.Random) -> None:
    dirs = [root] + [p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()]
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    action = rng.choice(["write", "append", "delete", "mkdir", "move", "chmod", "rmtree", "same_size"])
    if action == "write" or not files:
        (rng.choice(dirs) / f"f{rng.randrange(1000)}").write_bytes(rng.randbytes(rng.randrange(50)))
    elif action == "append":
        with rng.choice(files).open("ab") as handle:
            handle.write(b"+")
    elif action == "same_size":
        # Same size, same second: only the content (and the racy-stat rule) tells it changed.
        target = rng.choice(files)
        data = target.read_bytes()
        target.write_bytes(bytes(b ^ 1 for b in data) if data else b"")
    elif action == "delete":
        rng.choice(files).unlink()
    elif action == "mkdir":
        (rng.choice(dirs) / f"d{rng.randrange(1000)}").mkdir(exist_ok=True)
    elif action == "move":
        source = rng.choice(files + dirs[1:])
        destination = rng.choice(dirs) / f"m{rng.randrange(1000)}"
        if not destination.exists() and not destination.is_relative_to(source):
            shutil.move(source, destination)
    elif action == "chmod":
        target = rng.choice(files)
        target.chmod(target.stat().st_mode ^ 0o100)
    elif action == "rmtree" and len(dirs) > 1:
        shutil.rmtree(rng.choice(dirs[1:]))


@pytest.mark.parametrize("watch", [True, False])
def test_incremental_rescans_equal_fresh_scans(tmp_path: Path, watch: bool) -> None:
    rng = random.Random(14)
    make_tree(tmp_path)
    scanner = TreeScanner(str(tmp_path), watch=watch)
    try:
        for _ in range(150):
            _mutate(tmp_path, rng)
            incremental = scanner.scan()
            fresh = digest_of(str(tmp_path))
            assert (incremental.digest, incremental.times_digest) == (fresh.digest, fresh.times_digest)
            assert incremental.files == fresh.files
    finally:
        scanner.close()


def test_a_watched_scanner_forgets_what_was_deleted(tmp_path: Path) -> None:
    # Watched rescans list only what changed, and only a full scan swept the caches: every file
    # and directory the tree ever held stayed in memory, with the watch descriptor of each
    # directory, for as long as the scanner lived (a server keeps one per workspace for weeks).
    make_tree(tmp_path)
    scanner = TreeScanner(str(tmp_path))
    if not scanner.watching:
        scanner.close()
        pytest.skip(f"this process cannot watch: {shared_inotify.problem()}")
    try:
        scanner.scan()
        for run in range(50):
            build = tmp_path / "build" / f"run{run}" / "obj"
            build.mkdir(parents=True)
            for number in range(5):
                (build / f"{number}.o").write_text(f"run {run} object {number}\n")
            (tmp_path / "src" / f"tmp{run}.py").write_text("temporary\n")
            scanner.scan()
            shutil.rmtree(tmp_path / "build")
            (tmp_path / "src" / f"tmp{run}.py").unlink()
            assert scanner.scan() == digest_of(str(tmp_path))
        fresh = TreeScanner(str(tmp_path), watch=False)
        fresh.scan()
        assert sorted(scanner._files) == sorted(fresh._files)
        assert sorted(scanner._dirs) == sorted(fresh._dirs)
        watcher = scanner._watcher
        assert watcher is not None
        assert len(watcher._wds) <= len(fresh._dirs)
    finally:
        scanner.close()


def test_an_unchanged_tree_is_neither_hashed_nor_listed_again(tmp_path: Path) -> None:
    make_tree(tmp_path)
    old = 1_000_000_000  # far from now: no file counts as racy
    for path in tmp_path.rglob("*"):
        if not path.is_symlink():
            os.utime(path, ns=(old, old))
    watched, unwatched = TreeScanner(str(tmp_path)), TreeScanner(str(tmp_path), watch=False)
    if not watched.watching:
        watched.close()
        pytest.skip("no inotify instance left for this user (fs.inotify.max_user_instances): other processes hold them")
    try:
        first = watched.scan()
        unwatched.scan()
        assert watched.scan() == first
        assert watched.last_hashed == 0 and watched.last_listed == 0
        unwatched.scan()
        assert unwatched.last_hashed == 0 and unwatched.last_listed > 0
    finally:
        watched.close()


def _inotify_instances() -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.exists(fd) and os.readlink(fd) == "anon_inode:inotify")


def test_more_trees_than_the_users_inotify_instances_are_all_watched(tmp_path: Path) -> None:
    # fs.inotify.max_user_instances (128 by default) counts every process of the user: one
    # instance per tree left every tree past a hundred or so stated in full at each rescan.
    trees = 200
    for number in range(trees):
        (tmp_path / f"t{number}" / "src").mkdir(parents=True)
        (tmp_path / f"t{number}" / "src" / "a.txt").write_text(f"tree {number}\n")
    if shared_inotify.problem():
        pytest.skip(f"this process cannot watch: {shared_inotify.problem()}")
    scanners = [TreeScanner(str(tmp_path / f"t{number}")) for number in range(trees)]
    try:
        assert all(scanner.watching for scanner in scanners)
        assert _inotify_instances() <= 1
        before = [scanner.scan() for scanner in scanners]
        (tmp_path / "t150" / "src" / "a.txt").write_text("tree 150, changed\n")
        after = [scanner.scan() for scanner in scanners]
        assert [number for number in range(trees) if after[number] != before[number]] == [150]
        assert scanners[150].last_listed == 1  # its watch saw the change: one directory listed
        assert sum(scanner.last_listed for scanner in scanners) == 1
        assert after[150] == digest_of(str(tmp_path / "t150"))
    finally:
        for scanner in scanners:
            scanner.close()


def test_two_scanners_of_one_tree_in_one_process_both_see_its_changes(tmp_path: Path) -> None:
    # One watch per directory in the kernel, two owners: each takes its own copy of the events.
    make_tree(tmp_path)
    first, second = TreeScanner(str(tmp_path)), TreeScanner(str(tmp_path))
    try:
        for scanner in (first, second):
            scanner.scan()
        (tmp_path / "src" / "pkg" / "main.py").write_text("print('changed')\n")
        expected = digest_of(str(tmp_path))
        assert first.scan() == expected and first.last_listed >= 1
        first.close()  # its watches go; the other's stay
        (tmp_path / "src" / "pkg" / "new.py").write_text("new\n")
        assert second.scan() == digest_of(str(tmp_path))
        assert 1 <= second.last_listed < 4
    finally:
        first.close()
        second.close()


def test_a_file_read_for_its_digest_is_the_one_listed_never_what_was_swapped_in(tmp_path: Path) -> None:
    # Between a scan's listing and its read, a model's background process can put a symlink in
    # place of a file or of a directory above it, or a FIFO: the digest (and the blob the content
    # service then serves) would be another file's, perhaps outside the workspace, or the read
    # would wait for a writer for ever.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not the workspace's\n")
    workspace = tmp_path / "ws"
    (workspace / "dir").mkdir(parents=True)
    (workspace / "link.txt").symlink_to(outside / "secret.txt")
    (workspace / "swapped").symlink_to(outside, target_is_directory=True)
    os.mkfifo(workspace / "fifo")
    for name, real in (("link.txt", None), ("swapped/secret.txt", str(workspace / "dir/secret.txt")),
                       ("fifo", None)):
        with pytest.raises(OSError, match="no longer the regular file"):
            hash_file(str(workspace / name), real)
    (workspace / "dir/plain.txt").write_text("read\n")
    assert hash_file(str(workspace / "dir/plain.txt"))[0] == Digest.of(b"read\n")


def test_a_workspace_reached_through_a_symlink_is_scanned_whole(tmp_path: Path) -> None:
    # Files are read at their real path: a root named through a link must still hash each one.
    make_tree(tmp_path / "real")
    (tmp_path / "named").symlink_to(tmp_path / "real", target_is_directory=True)
    scanner = TreeScanner(str(tmp_path / "named"), watch=False)
    try:
        tree = scanner.scan()
    finally:
        scanner.close()
    fresh = digest_of(str(tmp_path / "real"))
    assert tree.digest == fresh.digest and tree.skipped == fresh.skipped
