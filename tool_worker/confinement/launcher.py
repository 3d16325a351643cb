"""The sandbox of one server: probes what the host can enforce, starts each command confined,
ends everything a call started, and on start-up ends what a crash left behind.

Why bubblewrap, and not Landlock alone, for Execute commands: a writable workspace with
read-only holes in it (.git/hooks) and a readable filesystem with unreadable holes in it (the
deny list) are mounts over mounts; Landlock rights only ever add up down a tree, so it can express
neither. bubblewrap also gives each call a PID namespace, the one thing no process of the call can
leave: `setsid`, double forks and daemons all die with the namespace's first process.

How a call starts, so that no command runs before its limits apply:
1. bwrap is spawned with --info-fd and --block-fd; it builds the sandbox, reports the host pid of
   the sandbox's first process on the info pipe, and waits on the block pipe;
2. that process gets its rlimits (prlimit) and joins the call's cgroups;
3. one byte on the block pipe lets it start the command.
bwrap holds both ends of the block pipe, so if the server dies before step 3 the sandbox waits
for ever instead of running unlimited, until the restarted server ends it (reap_leftovers).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tool_worker.confinement import bwrap
from tool_worker.confinement.cgroups import CallCgroups, CgroupsUnavailable, CgroupTree
from tool_worker.confinement.children import fd_readable, start_child, wait_child
from tool_worker.confinement.policy import Limit, SandboxPolicy, SandboxSettings
from tool_worker.confinement.protected import off_the_loop_if_submodules
from tool_worker.confinement.readonly import ReadOnlyLauncher
from tool_worker.fds import write_all

log = logging.getLogger("codelane.sandbox")

_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# Sandboxes built ahead and kept waiting, at most (each is three sleeping processes).
_MAX_WARM = 8
_PIPE_BUFFER = 65536
# The sandbox's shell: reads the command's NUL-separated argv from a pipe, then becomes it.
_RUN_ARGV = 'mapfile -d "" -t argv <&{fd} && exec {fd}<&- && exec "${{argv[@]}}"'
_PROBE_TIMEOUT = 30.0
_INSTALL_BWRAP = (
    "bubblewrap (bwrap) is not installed: install it (Debian/Ubuntu: apt-get install bubblewrap; "
    "Fedora: dnf install bubblewrap), or run without a sandbox: --sandbox off --allow-unsandboxed"
)


class SandboxUnavailable(Exception):
    """The host cannot enforce the session's policy; the message names what is missing and how to
    enable it. Nothing was started."""


@dataclass(frozen=True)
class HostSupport:
    """What this host can enforce, found once per process."""

    bwrap: str | None
    bwrap_version: str
    # Why confined commands cannot run here; "" when they can.
    problem: str
    # How the processes and memory limits are enforced: "cgroup" (v1 pids and memory, as root)
    # or "rlimit" (RLIMIT_NPROC in bubblewrap's user namespace and RLIMIT_AS per process).
    limits: str


class RunningCommand:
    """A started command: its process (bwrap's monitor, or the command itself when off without
    bubblewrap), and what ends and accounts for everything it started."""

    def __init__(self, proc: subprocess.Popen[bytes], sandbox_pidfd: int | None, cgroups: CallCgroups | None,
                 output_fd: int) -> None:
        self.proc = proc
        self._pidfd = sandbox_pidfd
        self._cgroups = cgroups
        # The read end of the command's stdout and stderr, for the caller to read and close.
        self.output_fd = output_fd
        # Called once the call is over and cleaned up (a server then builds the next sandbox).
        self.on_close: Callable[[], None] | None = None
        self._usage_hit: list[Limit] = []
        self._closed = False

    def kill(self) -> None:
        """SIGKILL to every process of the call: the sandbox's first process takes its whole PID
        namespace with it; without a sandbox, the process group. Nothing once closed: the ids may
        name other processes by then."""
        if self._closed:
            return
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self._pidfd is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            elif self.proc.returncode is None:
                self.proc.kill()

    @property
    def returncode(self) -> int | None:
        """The command's exit code once it ended (bwrap reports a signal as 128 + its number)."""
        return self.proc.returncode

    async def wait(self) -> int:
        return await wait_child(self.proc)

    async def close(self) -> None:
        """Kills what is left, waits until every process of the call is gone, reads which limits
        were hit and removes the call's cgroups."""
        self.kill()
        await self.wait()
        self._closed = True
        if self._pidfd is not None:
            pidfd, self._pidfd = self._pidfd, None
            await fd_readable(pidfd, close=True)
        if self._cgroups is not None:
            self._usage_hit = self._cgroups.usage().limits_hit()
            self._cgroups.remove()
            self._cgroups = None
        if self.on_close is not None:
            self.on_close()

    def limits_hit(self, exit_code: int | None) -> list[Limit]:
        """Which limits stopped the call (after close): the cgroups' counters, and SIGXCPU, the
        signal of the CPU-time limit, as the command's own end (bwrap reports 128 + signal)."""
        hit = list(self._usage_hit)
        if exit_code in (128 + signal.SIGXCPU, -signal.SIGXCPU):
            hit.append(Limit.CPU_TIME)
        return hit


class _Prepared:
    """A sandbox built ahead of its call: its shell waits for the command's argv on a pipe."""

    def __init__(self, command: RunningCommand, argv_fd: int, layout: bwrap.Layout, anchors: list[int]) -> None:
        self.command = command
        self._argv_fd: int | None = argv_fd
        # What its mounts were built from (bwrap.layout): a call takes it only while that holds.
        self.layout = layout
        # Held while it waits (see _anchors).
        self._anchors = anchors

    def release(self) -> None:
        """Closes the anchors: once taken or discarded, it no longer waits to be checked."""
        anchors, self._anchors = self._anchors, []
        for fd in anchors:
            os.close(fd)

    async def start(self, argv: Sequence[str]) -> None:
        data = b"".join(arg.encode() + b"\0" for arg in argv)
        fd, self._argv_fd = self._argv_fd, None
        assert fd is not None, "a prepared sandbox runs one command"
        if len(data) > _PIPE_BUFFER:
            # The thread closes the pipe itself: a call cancelled meanwhile must not close it under
            # a write still blocked on it (the number, reused, would take the rest of the argv).
            await asyncio.to_thread(_write_all_and_close, fd, data)
            return
        try:
            os.write(fd, data)  # an empty pipe takes it whole, at once
        finally:
            os.close(fd)

    async def discard(self) -> None:
        """Ends it unused: its shell reads an empty argv, runs nothing and exits."""
        self.release()
        if self._argv_fd is not None:
            os.close(self._argv_fd)
            self._argv_fd = None
        os.close(self.command.output_fd)
        await self.command.close()


class Sandbox:
    """How this process runs commands under a SandboxPolicy: one per server (or worker).

    With `keep_warm` (a server), the next sandbox of each workspace and policy is built as soon as
    the previous call ends, so that a call only hands its argv to a sandbox already waiting.
    """

    def __init__(self, settings: SandboxSettings | None = None, *, keep_warm: bool = False) -> None:
        settings = settings or SandboxSettings()
        # Without a data dir to name it, a process's sandboxes are its own: they share no cgroups.
        self.settings = settings if settings.owner else settings.with_owner(f"pid{os.getpid()}")
        self.read_only = ReadOnlyLauncher(allow_unconfined=self.settings.allow_unsandboxed)
        self._as_root = os.geteuid() == 0
        self._support: HostSupport | None = None
        self._cgroups: CgroupTree | None = None
        self._probe_lock = threading.Lock()
        self._keep_warm = keep_warm
        self._warm: dict[tuple[Path, Path, SandboxPolicy], asyncio.Task[_Prepared]] = {}
        self._discarding: set[asyncio.Task[None]] = set()
        self._closing = False
        self._shell = shutil.which("bash") or ""

    # -- the host ------------------------------------------------------------------------------

    def support(self) -> HostSupport:
        """What the host can enforce; probed on first use (a trial sandbox, about 10 ms)."""
        with self._probe_lock:
            if self._support is None:
                self._support = self._probe()
            return self._support

    def start(self) -> HostSupport:
        """For a server starting: ends the sandboxes a crash of the same server (same data dir), or
        of any server now gone, left behind; then probes the host."""
        ended = reap_leftovers(self.settings.owner)
        if ended:
            log.warning("ended %d sandboxed process(es) left behind by a previous run", ended)
        return self.support()

    def close(self) -> None:
        """Removes this server's (empty) parent cgroups."""
        if self._cgroups is not None:
            self._cgroups.remove_parents()

    def describe(self) -> str:
        """One line for the server's start-up: which mechanism is active, or why none is."""
        support = self.support()
        settings = self.settings
        default = f"default {settings.default_mode.value}"
        network = "network allowed on request" if settings.allow_network else "no network"
        if support.problem:
            head = f"UNAVAILABLE ({support.problem}); bash and execute fail in confined sessions"
        else:
            limits = ("cgroup v1 pids+memory" if support.limits == "cgroup" else
                      "RLIMIT_NPROC in a user namespace, RLIMIT_AS per process")
            head = (f"bubblewrap {support.bwrap_version} (mount, PID, IPC and network namespaces); "
                    f"limits: {limits}, CPU time and open files per process")
        off = "; --sandbox off allowed" if settings.allow_unsandboxed else ""
        return f"sandbox: {head}; {default}, {network}{off}; Query tools: {self.read_only.describe()}"

    def _probe(self) -> HostSupport:
        if not sys.platform.startswith("linux"):
            return HostSupport(None, "", "the sandbox needs Linux (bubblewrap and namespaces)", "")
        path = shutil.which("bwrap")
        if path is None:
            return HostSupport(None, "", _INSTALL_BWRAP, "")
        if not self._shell:
            return HostSupport(None, "", "the sandbox starts each command from bash, which is not installed", "")
        version = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
        version = version.split()[-1] if version.split() else "?"
        limits = "rlimit"
        if self._as_root:
            try:
                tree = CgroupTree(self.settings.owner)
                tree.prepare()
                self._cgroups = tree
                limits = "cgroup"
            except (CgroupsUnavailable, OSError) as exc:
                return HostSupport(path, version, (
                    f"running as root, the process and memory limits need cgroups: {exc}; "
                    "mount the v1 pids and memory controllers, or run the server as a non-root user "
                    "(limits are then rlimits in a user namespace)"
                ), "")
        problem = self._trial(path)
        return HostSupport(path, version, problem, limits)

    def _trial(self, path: str) -> str:
        """Runs `true` in a default sandbox; "" when it works, else why not."""
        with tempfile.TemporaryDirectory(prefix="codelane-probe-") as workspace:
            real = Path(os.path.realpath(workspace))
            info_read, info_write = os.pipe()
            block_read, block_write = os.pipe()
            os.write(block_write, b"1")
            argv, fds = bwrap.confined_args(
                path, ["true"], workspace=real, cwd=real, policy=self.settings.default_policy(),
                settings=self.settings, info_fd=info_write, block_fd=block_read, as_root=self._as_root,
            )
            try:
                done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=_PROBE_TIMEOUT,
                                      pass_fds=(info_write, block_read, *fds), env=self._built_env())
            finally:
                for fd in (info_read, info_write, block_read, block_write, *fds):
                    os.close(fd)
        if done.returncode == 0:
            return ""
        reason = done.stderr.strip() or f"exit code {done.returncode}"
        return (
            f"bubblewrap cannot build a sandbox here ({reason}); it needs user namespaces when not run as root "
            "(sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 also "
            "kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for bwrap)"
        )

    # -- commands ------------------------------------------------------------------------------

    async def start_command(self, argv: Sequence[str], *, workspace: Path, cwd: Path,
                            policy: SandboxPolicy) -> RunningCommand:
        """Starts argv under `policy`, stdin empty; its stdout and stderr come out of the
        command's `output_fd` (a pipe the caller reads and closes).

        With `keep_warm`, the sandbox was built ahead, after the previous call of the same
        workspace and policy ended, and only waits for argv. Raises SandboxUnavailable when the
        policy cannot be enforced (nothing runs), OSError when the command cannot start.
        """
        support = self.support()
        if policy.confined and support.problem:
            raise SandboxUnavailable(support.problem)
        if not policy.confined:
            log.info("%s runs WITHOUT a sandbox (sandbox off) in %s", argv[0], workspace)
        if support.bwrap is None:
            output_read, output_write = os.pipe()
            try:
                proc = start_child(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output_write,
                                   stderr=output_write, start_new_session=True, env=self._inherited_env(policy))
            except BaseException:
                os.close(output_read)
                raise
            finally:
                os.close(output_write)
            return RunningCommand(proc, None, None, output_read)
        key = (workspace, cwd, policy)
        prepared = await self._take_warm(key) if self._keep_warm else None
        if prepared is None:
            prepared = await self._prepare(support.bwrap, workspace, cwd, policy)
        prepared.release()
        if self._keep_warm:
            prepared.command.on_close = lambda: self._warm_up(key)
        try:
            await prepared.start(argv)
        except BaseException:
            # Cancelled (or out of time) while the shell still read its argv, a byte at a time: it
            # would run what it got, whole or cut, with no one to end it or read its output.
            os.close(prepared.command.output_fd)
            await prepared.command.close()
            raise
        return prepared.command

    async def aclose(self) -> None:
        """For a server stopping: ends the sandboxes kept warm, then removes its cgroups."""
        self._closing = True
        warm = list(self._warm.values())
        self._warm.clear()
        for task in warm:
            self._discard(task)
        # A build stopped half-way ends what it started before its task ends.
        await asyncio.gather(*warm, *self._discarding, return_exceptions=True)
        self.close()

    async def warmed(self) -> None:
        """Waits until the sandboxes being built ahead are ready (a benchmark times calls apart
        from that work, which in a session happens while the model thinks)."""
        await asyncio.gather(*self._warm.values(), return_exceptions=True)

    async def _take_warm(self, key: tuple[Path, Path, SandboxPolicy]) -> _Prepared | None:
        task = self._warm.pop(key, None)
        if task is None:
            return None
        try:
            prepared = await task
        except Exception:
            log.exception("a sandbox built ahead failed; building one now")
            return None
        try:
            current = prepared.command.proc.poll() is None and prepared.layout == await off_the_loop_if_submodules(
                key[0], self._layout, key[0], key[2]
            )
        except BaseException:
            # Taken from the warm ones, it is this call's to end: cancelled (or failed) during the
            # check, in a thread, it waited unused for its argv until the server stopped.
            self._discard(task)
            raise
        if not current:
            self._discard(task)
            return None
        return prepared

    def _warm_up(self, key: tuple[Path, Path, SandboxPolicy]) -> None:
        """Builds the next sandbox of a workspace and policy, now that its previous call ended (so
        its protected paths are found as that call left them); keeps at most _MAX_WARM."""
        if self._closing:
            return
        support = self.support()
        assert support.bwrap is not None
        workspace, cwd, policy = key
        self._warm[key] = asyncio.create_task(self._prepare(support.bwrap, workspace, cwd, policy))
        while len(self._warm) > _MAX_WARM:
            self._discard(self._warm.pop(next(iter(self._warm))))

    def _discard(self, task: asyncio.Task[_Prepared]) -> None:
        """Ends a sandbox built ahead, or stops its building."""
        if not task.done():
            task.cancel()
            return
        if task.cancelled() or task.exception() is not None:
            return
        ending = asyncio.create_task(task.result().discard())
        self._discarding.add(ending)
        ending.add_done_callback(self._discarding.discard)

    async def _prepare(self, path: str, workspace: Path, cwd: Path, policy: SandboxPolicy) -> _Prepared:
        """Builds a sandbox whose shell waits for its command's argv on a pipe, limits applied."""
        argv_read, argv_write = os.pipe()
        output_read, output_write = os.pipe()
        info_read, info_write = os.pipe()
        block_read, block_write = os.pipe()
        fds: list[int] = []
        anchors: list[int] = []
        # Runs argv once it arrives, NUL-separated; an empty pipe (a server gone) runs nothing.
        waiting_shell = [self._shell, "-c", _RUN_ARGV.format(fd=argv_read)]
        try:
            layout, anchors, args, env, fds = await _settled_in_thread(
                self._plan, path, waiting_shell, workspace, cwd, policy, info_write, block_read
            )
            proc = start_child(
                args, stdin=subprocess.DEVNULL, stdout=output_write, stderr=output_write,
                pass_fds=(argv_read, info_write, block_read, block_write, *fds), start_new_session=True, env=env,
            )
        except BaseException:
            for fd in (argv_write, output_read, info_read, block_write, *anchors):
                os.close(fd)
            raise
        finally:
            for fd in (argv_read, output_write, info_write, block_read, *fds):
                os.close(fd)
        pidfd = None
        cgroups = None
        info = bytearray()
        try:
            await _read_all(info_read, info)
            if not info:
                # bwrap stopped before building anything; its message is in the output.
                return _Prepared(RunningCommand(proc, None, None, output_read), argv_write, layout, anchors)
            pid = json.loads(info)["child-pid"]
            pidfd = os.pidfd_open(pid)
            if self._cgroups is not None:
                cgroups = self._cgroups.create(policy.limits)
                cgroups.join(pid)
            self._apply_rlimits(pid, policy)
            os.write(block_write, b"1")
        except BaseException:
            if pidfd is None:
                # Cancelled before the sandbox was known: it waits for ever on its block pipe,
                # whatever happens to bwrap's monitor, so it must be found and ended here. The
                # monitor reports it right after cloning it.
                pidfd = _sandbox_pidfd(info_read, info)
            if pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                # Until it has ended, not only been sent the kill: a stopping server returns once
                # its sandboxes are gone.
                await fd_readable(pidfd, close=True)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await wait_child(proc)
            if cgroups is not None:
                cgroups.remove()
            for fd in (argv_write, output_read, *anchors):
                os.close(fd)
            raise
        finally:
            os.close(info_read)
            os.close(block_write)
        return _Prepared(RunningCommand(proc, pidfd, cgroups, output_read), argv_write, layout, anchors)

    def _plan(self, path: str, argv: Sequence[str], workspace: Path, cwd: Path, policy: SandboxPolicy,
              info_fd: int, block_fd: int) -> tuple[bwrap.Layout, list[int], list[str], dict[str, str], list[int]]:
        """The layout, its anchors and the command line of a sandbox to build (in a thread: a
        command may have made .git/modules hold 500,000 submodules whose paths to protect)."""
        # Before the mounts are worked out: a change in between makes it differ, never match.
        layout = self._layout(workspace, policy)
        anchors = _anchors(layout)
        try:
            return (layout, anchors, *self._command_line(path, argv, workspace, cwd, policy, info_fd, block_fd))
        except BaseException:
            for fd in anchors:
                os.close(fd)
            raise

    def _command_line(self, path: str, argv: Sequence[str], workspace: Path, cwd: Path, policy: SandboxPolicy,
                      info_fd: int, block_fd: int) -> tuple[list[str], dict[str, str], list[int]]:
        """bwrap's arguments, environment and extra descriptors for one call (a few stat calls:
        mounts need real paths). The session's variables reach the command, never bwrap itself."""
        fds: list[int] = []
        try:
            session_env = bwrap.env_args(policy.env, fds)
            if not policy.confined:
                args = bwrap.unconfined_args(path, argv, cwd=cwd, settings=self.settings, info_fd=info_fd,
                                             block_fd=block_fd, env=session_env)
                return args, dict(os.environ), fds
            args, mounts = bwrap.confined_args(
                path, argv, workspace=Path(os.path.realpath(workspace)), cwd=Path(os.path.realpath(cwd)),
                policy=policy, settings=self.settings, info_fd=info_fd, block_fd=block_fd, as_root=self._as_root,
                env=session_env,
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return args, self._built_env(), fds + mounts

    def _layout(self, workspace: Path, policy: SandboxPolicy) -> bwrap.Layout:
        """What the mounts of a sandbox built now would depend on (bwrap.layout; unconfined, none)."""
        return bwrap.layout(workspace, policy, self.settings) if policy.confined else []

    def _apply_rlimits(self, pid: int, policy: SandboxPolicy) -> None:
        limits = policy.limits
        wanted = {
            # soft < hard: SIGXCPU first, which results name; SIGKILL a second later if ignored.
            resource.RLIMIT_CPU: (limits.cpu_seconds, limits.cpu_seconds + 1),
            resource.RLIMIT_NOFILE: (limits.open_files, limits.open_files),
            # SIGXCPU and the OOM killer must not leave core files in the workspace.
            resource.RLIMIT_CORE: (0, 0),
        }
        if self._cgroups is None:
            wanted[resource.RLIMIT_NPROC] = (limits.processes, limits.processes)
            wanted[resource.RLIMIT_AS] = (limits.memory_bytes, limits.memory_bytes)
        for which, (soft, hard) in wanted.items():
            _, current_hard = resource.prlimit(pid, which)
            if current_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, current_hard), min(hard, current_hard)
            resource.prlimit(pid, which, (soft, hard))

    @staticmethod
    def _built_env() -> dict[str, str]:
        """A confined command's environment before the session's variables: built, never the
        server's (its keys and tokens)."""
        return {
            "PATH": os.environ.get("PATH", _DEFAULT_PATH),
            "HOME": os.path.expanduser("~"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "TERM": os.environ.get("TERM", "dumb"),
            "TMPDIR": "/tmp",
        }

    @staticmethod
    def _inherited_env(policy: SandboxPolicy) -> dict[str, str]:
        return {**os.environ, **dict(policy.env)}


_default: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox() -> Sandbox:
    """The sandbox of a process that made none (tools used as a library, tests): default settings."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Sandbox()
            atexit.register(_default.close)
        return _default


def reap_leftovers(owner: str) -> int:
    """SIGKILLs every sandbox process of this owner (a restart of the same server), and every one
    whose server is gone (a server that died before it let its sandbox run leaves it waiting for
    ever). Found by the marker in their command lines: bwrap's monitor, and each sandbox's first
    process, whose end ends its whole PID namespace. Returns how many it ended."""
    flag = f"\0--setenv\0{bwrap.OWNER_VARIABLE}\0".encode()
    ended = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
            if flag not in cmdline:
                continue
            value = cmdline.split(flag, 1)[1].split(b"\0", 1)[0].decode(errors="replace")
            their_owner, _, server = value.partition("/")
            server_pid = server.partition(".")[0]
            alive = server_pid.isdigit() and bwrap.process_identity(int(server_pid)) == server
            if their_owner == owner or not alive:
                os.kill(int(entry.name), signal.SIGKILL)
                ended += 1
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return ended


def _anchors(layout: bwrap.Layout) -> list[int]:
    """O_PATH descriptors of the paths a sandbox built ahead was built from, held while it waits.
    A path removed on the host loses its mount in the sandbox, and its inode, freed, may be the
    very one a path made again in its place gets: held, it is never reused, so the layout check
    sees any replacement (a .git removed and made again otherwise kept its identity, and lost its
    protection)."""
    anchors = []
    for path, identity in layout:
        if identity is not None:
            with contextlib.suppress(OSError):
                anchors.append(os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC))
    return anchors


async def _settled_in_thread(
    plan: Callable[..., tuple[bwrap.Layout, list[int], list[str], dict[str, str], list[int]]], *arguments: object
) -> tuple[bwrap.Layout, list[int], list[str], dict[str, str], list[int]]:
    """`plan(*arguments)` in a thread; when the caller is cancelled meanwhile, the descriptors the
    thread opened (its anchors and bwrap's) are closed once it ends."""
    running = asyncio.ensure_future(asyncio.to_thread(plan, *arguments))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        running.add_done_callback(_close_planned)
        raise


def _close_planned(done: asyncio.Future[tuple[bwrap.Layout, list[int], list[str], dict[str, str], list[int]]]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    _, anchors, _, _, fds = done.result()
    for fd in (*anchors, *fds):
        os.close(fd)


def _write_all_and_close(fd: int, data: bytes) -> None:
    """Writes all of `data`, then closes `fd` (a reader gone, its sandbox killed, ends it early)."""
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


async def _read_all(fd: int, into: bytearray) -> None:
    """Everything written to a pipe until its writers close it, without blocking the loop; what
    came is in `into` even if the wait is cancelled."""
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        if chunk:
            into.extend(chunk)
        elif not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)


def _sandbox_pidfd(info_fd: int, info: bytearray) -> int | None:
    """The rest of bwrap's report, read blocking (bwrap writes it right after its clone, then
    closes it), as a pidfd of the sandbox's first process; None when bwrap built none."""
    os.set_blocking(info_fd, True)
    while chunk := os.read(info_fd, 4096):
        info.extend(chunk)
    try:
        return os.pidfd_open(json.loads(info)["child-pid"])
    except (ValueError, KeyError, ProcessLookupError):
        return None
