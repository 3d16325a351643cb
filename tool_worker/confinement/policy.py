"""What a sandboxed command may do: a session's policy and the operator's settings. No I/O.

A session chooses its `SandboxPolicy` within what the operator's `SandboxSettings` allow; the
launcher (`tool_worker.confinement.launcher`) turns the two into a confined process.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

MIB = 1024 * 1024
GIB = 1024 * MIB

# Per call, unless the operator or the session says otherwise. Generous for builds and test
# suites; a fork bomb or a runaway allocation stops well before the host does.
DEFAULT_MAX_PROCESSES = 512
DEFAULT_MAX_MEMORY = 4 * GIB
DEFAULT_MAX_CPU_SECONDS = 600
DEFAULT_MAX_OPEN_FILES = 4096
# Below these a shell cannot even start its command.
MIN_PROCESSES = 8
MIN_MEMORY = 32 * MIB
MIN_CPU_SECONDS = 1
MIN_OPEN_FILES = 32

# Read-only even inside a writable workspace: what git runs or obeys on the user's next commit.
# Relative entries are taken from each workspace's root, and may use `*` within one component.
DEFAULT_PROTECTED = (".git/hooks", ".git/config", ".git/modules/*/hooks", ".git/modules/*/config")
# Credentials every command is denied, whoever runs the server (relative to its home directory):
# codelane's own CLI keeps its servers' tokens in .config/codelane/config.toml.
HOME_SECRETS = (".ssh", ".aws", ".config/gcloud", ".config/codelane")


class SandboxMode(enum.StrEnum):
    """How much of the machine a command may change. Mirrors codelane.v1.SandboxMode."""

    # Writes only inside the workspace (protected paths excepted) and a private /tmp.
    WORKSPACE_WRITE = "workspace-write"
    # Writes only to the private /tmp.
    READ_ONLY = "read-only"
    # No confinement: the server's own permissions, environment and network.
    OFF = "off"


class NetworkAccess(enum.StrEnum):
    """Whether a confined command may use the network. Mirrors codelane.v1.SandboxNetwork."""

    OFF = "off"
    ON = "on"


class Limit(enum.StrEnum):
    """A limit that stopped a call, by the name results use for it ("limits_hit"). Running out of
    open files is not among them: nothing counts it, the command just sees EMFILE."""

    PROCESSES = "processes"
    MEMORY = "memory"
    CPU_TIME = "cpu_time"


@dataclass(frozen=True)
class ResourceLimits:
    """Limits of one call: every process it starts together (processes, memory), or each of
    them (CPU seconds, open files)."""

    processes: int = DEFAULT_MAX_PROCESSES
    memory_bytes: int = DEFAULT_MAX_MEMORY
    cpu_seconds: int = DEFAULT_MAX_CPU_SECONDS
    open_files: int = DEFAULT_MAX_OPEN_FILES


@dataclass(frozen=True)
class SandboxPolicy:
    """How one session's commands run: mode, network, limits and its own environment variables."""

    mode: SandboxMode = SandboxMode.WORKSPACE_WRITE
    network: NetworkAccess = NetworkAccess.OFF
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    # The session's own variables, added to the built environment (sorted, so equal policies hash alike).
    env: tuple[tuple[str, str], ...] = ()

    @property
    def confined(self) -> bool:
        return self.mode is not SandboxMode.OFF

    @property
    def writes_workspace(self) -> bool:
        return self.mode is not SandboxMode.READ_ONLY


@dataclass(frozen=True)
class SandboxSettings:
    """The operator's choices for every session of a server (flags of `codelane server`)."""

    # The mode of sessions that do not choose one.
    default_mode: SandboxMode = SandboxMode.WORKSPACE_WRITE
    # Whether `off` may be used at all (--allow-unsandboxed); it is never a silent fallback.
    allow_unsandboxed: bool = False
    # Whether sessions may turn the network on for their commands.
    allow_network: bool = False
    # Defaults for sessions, and the most a session may ask for.
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    # Absolute paths no confined command may read (nor write): the server's data dir, its TLS
    # files, the operator's additions. HOME_SECRETS are always added (see `denied_paths`).
    deny_read: tuple[Path, ...] = ()
    # Paths that stay read-only inside the workspace, for commands and for the file tools.
    protect: tuple[str, ...] = DEFAULT_PROTECTED
    # Marks this server's sandboxes, so that a restart finds and ends those a crash left behind.
    owner: str = ""

    def default_policy(self) -> SandboxPolicy:
        return SandboxPolicy(mode=self.default_mode, limits=self.limits)

    def denied_paths(self) -> tuple[Path, ...]:
        """The deny list: the operator's paths plus the usual credentials in the server's home."""
        home = Path(os.path.expanduser("~"))
        return tuple(dict.fromkeys([*self.deny_read, *(home / name for name in HOME_SECRETS)]))

    def with_owner(self, owner: str) -> SandboxSettings:
        return replace(self, owner=owner)
