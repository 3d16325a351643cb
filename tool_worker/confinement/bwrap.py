"""The bubblewrap command line that confines one call.

Confined (workspace-write, read-only), in this order, later mounts covering earlier ones:
- the whole filesystem read-only, and without devices (the host's /dev shows, but opening a
  device there fails), then null, zero, full, random, urandom and tty bound back usable; a /proc
  of the call's own PID namespace, whose files that change the kernel (sys, sysrq-trigger, irq,
  bus) are read-only;
- empty private tmpfs on /tmp, /var/tmp, /dev/shm and /run (where the host's daemons keep their
  sockets): they vanish with the call, and count towards its memory limit;
- each denied path that exists replaced by an empty directory or file of mode 000, so that
  reading it fails with "Permission denied" (capabilities are dropped: root is refused too);
- the workspace bound read-write (workspace-write) or read-only, then each directory between it
  and a protected or denied path bound onto itself (a mount point cannot be renamed, and a renamed
  directory would take the mounts below it along, out of the paths the lists name), then its
  protected paths bound read-only over it, then the denied paths inside it hidden again;
- new PID and IPC namespaces, a new network namespace unless the network is on, a new session
  (no terminal to inject keystrokes into), every capability dropped, and SIGKILL for the whole
  sandbox when the server dies (--die-with-parent).

Off: the real filesystem, network and environment, in a PID namespace all the same, so that no
process outlives its call.

Every sandbox carries `CODELANE_SANDBOX_OWNER=<owner>/<server pid>.<its start time>` in its
command line: a restarted server ends the ones of its own owner id, and any server ends those
whose server is gone (see launcher.reap_leftovers).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from tool_worker.confinement.policy import NetworkAccess, SandboxPolicy, SandboxSettings
from tool_worker.confinement.protected import protected_targets, within
from tool_worker.fds import write_all

OWNER_VARIABLE = "CODELANE_SANDBOX_OWNER"
# Replaced by private, empty tmpfs in confined modes.
TMPFS_DIRS = (Path("/tmp"), Path("/var/tmp"), Path("/run"))
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def confined_args(
    bwrap: str,
    command: Sequence[str],
    *,
    workspace: Path,
    cwd: Path,
    policy: SandboxPolicy,
    settings: SandboxSettings,
    info_fd: int,
    block_fd: int,
    as_root: bool,
    env: Sequence[str] = (),
) -> tuple[list[str], list[int]]:
    """The arguments, and the file descriptors bwrap must inherit besides info_fd and block_fd
    (the caller closes them once bwrap has started). `workspace` and `cwd` are real paths; `env`
    gives the command the session's variables (env_args)."""
    fds: list[int] = []
    args = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc"]
    if policy.network is NetworkAccess.OFF:
        args.append("--unshare-net")
    if as_root:
        # As root, bubblewrap keeps every capability unless told otherwise.
        args += ["--cap-drop", "ALL"]
    args += ["--ro-bind", "/", "/"]
    for device in _DEVICES:
        args += ["--dev-bind", f"/dev/{device}", f"/dev/{device}"]
    size = str(policy.limits.memory_bytes)
    args += ["--size", size, "--tmpfs", "/dev/shm", "--proc", "/proc"]
    args += _kernel_files_read_only()
    for directory in TMPFS_DIRS:
        args += ["--size", size, "--tmpfs", str(directory)]
    if policy.network is NetworkAccess.ON:
        args += _resolver_args()
    denied = _existing_denied(settings)
    outside = [p for p in denied if not within(p, workspace) and not any(within(p, t) for t in TMPFS_DIRS)]
    inside = [p for p in denied if within(p, workspace) and p != workspace]
    args += _hidden(outside, fds)
    if policy.writes_workspace:
        args += ["--bind", str(workspace), str(workspace)]
        pinned = _git_dir_pinned(workspace)
        args += pinned
        protected = _protected_mounts(workspace, settings.protect)
        for path in _directories_above(workspace, [*protected, *inside]):
            if str(path) not in pinned:
                args += ["--bind", str(path), str(path)]
        for path in protected:
            args += ["--ro-bind", str(path), str(path)]
    else:
        args += ["--ro-bind", str(workspace), str(workspace)]
    args += _hidden(inside, fds)
    args += [
        *env,
        "--chdir", str(cwd),
        "--setenv", OWNER_VARIABLE, owner_marker(settings.owner),
        "--info-fd", str(info_fd),
        "--block-fd", str(block_fd),
        "--", *command,
    ]  # fmt: skip
    return args, fds


Layout = list[tuple[Path, "tuple[int, int, int] | None"]]


def layout(workspace: Path, policy: SandboxPolicy, settings: SandboxSettings) -> Layout:
    """What a confined sandbox's mounts are built from besides its policy: the workspace, its
    `.git`, the denied and protected paths and the directories above them, each with the identity
    of what is there (device, inode, type; None when nothing is). A sandbox built ahead of its call
    is used only if this has not changed since: a denied file or a repository made in between was
    neither hidden nor protected in it, and a workspace removed and made again (a fresh clone)
    left its commands in the removed directory."""
    real = Path(os.path.realpath(workspace))
    denied = _existing_denied(settings)
    paths = [real, real / ".git", *denied]
    if policy.writes_workspace:
        protected = _protected_mounts(real, settings.protect)
        inside = [p for p in denied if within(p, real) and p != real]
        paths += [*protected, *_directories_above(real, [*protected, *inside])]
    return [(path, _identity(path)) for path in paths]


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, stat.S_IFMT(info.st_mode)


def _existing_denied(settings: SandboxSettings) -> list[Path]:
    denied = [Path(os.path.realpath(p)) for p in settings.denied_paths()]
    return [p for p in denied if os.path.lexists(p)]


# The parts of /proc that change the kernel itself. Writing them takes no capability, only the
# owner's write bit, so a command run as root (uid 0, every capability dropped) could: a core
# pattern piped to a workspace script had the kernel run it as the host's root, outside every
# namespace. bubblewrap covers these itself only when it finds them writable, and as root without
# capabilities it does not.
_KERNEL_FILES = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus")


def _kernel_files_read_only() -> list[str]:
    """Each of _KERNEL_FILES the host has, bound read-only over the call's own /proc."""
    args: list[str] = []
    for path in _KERNEL_FILES:
        if os.path.lexists(path):
            args += ["--ro-bind", path, path]
    return args


def unconfined_args(
    bwrap: str, command: Sequence[str], *, cwd: Path, settings: SandboxSettings, info_fd: int, block_fd: int,
    env: Sequence[str] = (),
) -> list[str]:
    """Off: only the PID namespace (and death with the server), so nothing outlives the call."""
    return [
        bwrap, "--die-with-parent", "--unshare-pid", "--dev-bind", "/", "/",
        *env,
        "--chdir", str(cwd),
        "--setenv", OWNER_VARIABLE, owner_marker(settings.owner),
        "--info-fd", str(info_fd),
        "--block-fd", str(block_fd),
        "--", *command,
    ]  # fmt: skip


def env_args(env: Sequence[tuple[str, str]], fds: list[int]) -> list[str]:
    """The session's variables for the sandboxed command: `--setenv` pairs bwrap reads from a
    memfd (`--args FD`, the descriptor appended to `fds`). Never bwrap's own environment: its
    dynamic loader reads that on the host before any confinement (a session's LD_PRELOAD would run
    there, with the server's rights). Nor its command line, which every local user can read."""
    if not env:
        return []
    if any("\0" in name or "\0" in value for name, value in env):  # one would inject bwrap options
        raise ValueError("an environment variable holds a NUL character")
    data = b"".join(b"--setenv\0%s\0%s\0" % (name.encode(), value.encode()) for name, value in env)
    fd = os.memfd_create("codelane-env", os.MFD_CLOEXEC)
    fds.append(fd)
    write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return ["--args", str(fd)]


def owner_marker(owner: str) -> str:
    """The value each sandbox of this process carries: the owner id, and this process's identity."""
    return f"{owner}/{process_identity(os.getpid())}"


def process_identity(pid: int) -> str:
    """pid.start-time: names one process, even after its pid is reused; "" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # Field 22 (start time) counts from the fields after the command name's ")".
            return f"{pid}.{f.read().rsplit(b')', 1)[1].split()[19].decode()}"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return ""


def _hidden(paths: list[Path], fds: list[int]) -> list[str]:
    """Mode-000 stand-ins for denied paths; a file's is filled from an empty descriptor (opened
    here, appended to `fds`)."""
    args = []
    for path in paths:
        if path.is_dir():
            args += ["--perms", "0000", "--size", "4096", "--tmpfs", str(path), "--remount-ro", str(path)]
        else:
            fds.append(os.open(os.devnull, os.O_RDONLY))
            args += ["--perms", "0000", "--ro-bind-data", str(fds[-1]), str(path)]
    return args


def _git_dir_pinned(workspace: Path) -> list[str]:
    """The repository's `.git` made a mount point of its own: a command may change what is in it
    (commits), but cannot rename or remove it (EBUSY) to put a `.git` with a configuration of its
    choosing in its place, which the user's next git command would run. A `.git` file (a linked
    worktree's or a submodule's pointer) is bound read-only: where it points is git's config too."""
    git = workspace / ".git"
    if git.is_symlink() or not git.exists():
        return []
    kind = "--bind" if git.is_dir() else "--ro-bind"
    return [kind, str(git), str(git)]


def _directories_above(workspace: Path, mounts: Sequence[Path]) -> list[Path]:
    """The directories between the workspace and each of `mounts` (denied and protected paths
    inside it), parents first, to be bound onto themselves: renaming a directory above a mount
    point takes the mount along, and `mv deploy d2` left a denied deploy/key at d2/key, where the
    deny list, which names paths, reached it no more. A mount point cannot be renamed (EBUSY)."""
    above: dict[Path, None] = {}
    for mount in mounts:
        for parent in reversed(mount.parents):
            if parent != workspace and within(parent, workspace):
                above[parent] = None
    return sorted(above, key=lambda path: len(path.parts))


def _protected_mounts(workspace: Path, patterns: Sequence[str]) -> list[Path]:
    """What to bind read-only: each protected path that exists, else its nearest existing
    ancestor below the workspace root (a repository without .git/hooks gets all of .git
    read-only). A path whose whole parent chain is missing up to the root has nothing to bind."""
    mounts = []
    for target in protected_targets(workspace, patterns):
        if not within(target, workspace) or target == workspace:
            continue
        while not os.path.lexists(target) and target.parent != workspace:
            target = target.parent
        if os.path.lexists(target) and target not in mounts:
            mounts.append(target)
    return mounts


def _resolver_args() -> list[str]:
    """With the network on, /etc/resolv.conf may point into /run, which the sandbox replaces."""
    resolver = Path(os.path.realpath("/etc/resolv.conf"))
    if resolver.exists() and any(within(resolver, t) for t in TMPFS_DIRS):
        return ["--ro-bind", str(resolver), str(resolver)]
    return []
