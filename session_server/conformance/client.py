"""`codelane conformance client -- COMMAND...`: does a client library follow the session protocol?

The kit starts a real session server on 127.0.0.1 whose default model is a script, runs COMMAND
with the server's address in `{server}` and $CODELANE_SERVER, and a workspace in
$CODELANE_CONFORMANCE_WORKSPACE. COMMAND plays the scenario of docs/protocol.md ("Client
conformance") and prints one line per step; each check compares those lines with what the server
itself recorded (its event log, read with the Python SDK).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from codelane.client import Client
from codelane.events import CaughtUp
from session_server.conformance.checks import DEFAULT_WITHIN, SCENARIO_WITHINS, CheckFailed, Outcome, run_all
from session_server.server import CodelaneServer, ServerConfig

# After this sequence the scenario asks for a replay (a resume): the turn has more events than it.
RESUME_AFTER = 2
FAR_SEQUENCE = 1_000_000
SCRIPT = {"responses": [
    {"text": "Reading.", "tool_calls": [{"name": "read", "arguments": {"file_path": "README.md"}}]},
    {"text": "Done."},
]}


@dataclass
class ClientContext:
    """What the checks share: the server, and what the command printed, by step."""

    server: CodelaneServer
    address: str
    lines: dict[str, list[list[str]]] = field(default_factory=dict)
    exit_code: int | None = None
    output: str = ""

    def printed(self, step: str) -> list[list[str]]:
        return self.lines.get(step, [])

    async def recorded(self, session_id: str) -> list[tuple[int, str]]:
        """(sequence, kind) of every event the server stored for the session."""
        async with Client(self.address) as client:
            session = await client.get_session(session_id)
            return [(item.sequence, item.kind) async for item in session.watch(after=0, follow=False)
                    if not isinstance(item, CaughtUp)]

    def session_id(self) -> str:
        sessions = self.printed("session")
        if len(sessions) != 1 or len(sessions[0]) != 1:
            raise CheckFailed(f"expected one line `session SESSION_ID`, got {sessions}")
        return sessions[0][0]


Check = Callable[[ClientContext], Awaitable[str]]


async def check_exit(ctx: ClientContext) -> str:
    if ctx.exit_code != 0:
        raise CheckFailed(f"the command exited with status {ctx.exit_code}: {ctx.output[-300:]!r}")
    return "the command ran the scenario and exited 0"


async def check_session(ctx: ClientContext) -> str:
    session_id = ctx.session_id()
    async with Client(ctx.address) as client:
        info = (await client.get_session(session_id)).info
    return f"session {session_id} created on workspace {info.workspace}"


async def check_turn(ctx: ClientContext) -> str:
    recorded = await ctx.recorded(ctx.session_id())
    seen = [_event(line, "turn") for line in ctx.printed("turn")]
    if seen != recorded:
        raise CheckFailed(f"the turn's events as printed {seen} differ from the server's {recorded}")
    if not seen or seen[0][1] != "turn_started" or seen[-1][1] != "turn_finished":
        raise CheckFailed(f"a turn runs from turn_started to turn_finished: {seen}")
    return f"{len(seen)} events, turn_started to turn_finished, in sequence order"


async def check_resume(ctx: ClientContext) -> str:
    recorded = [event for event in await ctx.recorded(ctx.session_id()) if event[0] > RESUME_AFTER]
    seen = [_event(line, "replay") for line in ctx.printed("replay")]
    if seen != recorded:
        raise CheckFailed(f"the events after sequence {RESUME_AFTER} as printed {seen} differ from the server's "
                          f"{recorded}")
    caught_up = ctx.printed("caught_up")
    last = recorded[-1][0] if recorded else RESUME_AFTER
    if caught_up != [[str(last)]]:
        raise CheckFailed(f"expected `caught_up {last}` once after the replay, got {caught_up}")
    return f"{len(seen)} events after sequence {RESUME_AFTER}, none missed or repeated, then caught_up {last}"


async def check_errors(ctx: ClientContext) -> str:
    expected = [["OUT_OF_RANGE", "SEQUENCE_OUT_OF_RANGE"], ["NOT_FOUND", "SESSION_NOT_FOUND"]]
    if ctx.printed("error") != expected:
        raise CheckFailed(f"expected the status and ErrorInfo reason of each error, {expected}, got "
                          f"{ctx.printed('error')}")
    return "OUT_OF_RANGE SEQUENCE_OUT_OF_RANGE and NOT_FOUND SESSION_NOT_FOUND, read from google.rpc.Status"


CHECKS: list[tuple[str, Check]] = [
    ("exit", check_exit),
    ("session", check_session),
    ("turn", check_turn),
    ("resume", check_resume),
    ("errors", check_errors),
]


def _event(words: list[str], step: str) -> tuple[int, str]:
    if len(words) != 2 or not words[0].isdigit():
        raise CheckFailed(f"expected `{step} SEQUENCE KIND`, got {' '.join([step, *words])!r}")
    return int(words[0]), words[1]


async def run_checks(command: Sequence[str], *, within: float = DEFAULT_WITHIN, log_dir: Path | None = None,
                     report: Callable[[Outcome], None] = lambda outcome: None) -> list[Outcome]:
    """Runs the scenario command against a scripted server and every check on what it printed."""
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="codelane-conformance-"))
    with tempfile.TemporaryDirectory(prefix="codelane-conformance-client-") as directory:
        root = Path(directory)
        workspace = root / "workspace"
        await asyncio.to_thread(_prepare, root, workspace)
        server = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=root / "data",
                                             model=f"scripted:{root / 'conformance.yaml'}"))
        port = await server.start()
        ctx = ClientContext(server, f"127.0.0.1:{port}")
        try:
            await _run_command(ctx, command, workspace, within * SCENARIO_WITHINS, log_dir)
            outcomes = await run_all(CHECKS, ctx, report)
        finally:
            await server.stop(grace=0.5)
    return outcomes


def _prepare(root: Path, workspace: Path) -> None:
    workspace.mkdir()
    (workspace / "README.md").write_text("# conformance\n\nA workspace for the client kit.\n")
    (root / "conformance.yaml").write_text(json.dumps(SCRIPT))


async def _run_command(ctx: ClientContext, command: Sequence[str], workspace: Path, within: float,
                       log_dir: Path) -> None:
    argv = [part.replace("{server}", ctx.address) for part in command]
    env = {**os.environ, "CODELANE_SERVER": ctx.address, "CODELANE_CONFORMANCE_WORKSPACE": str(workspace)}
    proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, env=env)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        ctx.output = out.decode(errors="replace") + f"\n[killed after {within:g}s]"
        ctx.exit_code = None
    else:
        ctx.output, ctx.exit_code = out.decode(errors="replace"), proc.returncode
    (log_dir / "client.log").write_text(ctx.output)
    for line in ctx.output.splitlines():
        step, *words = line.split() or [""]
        if step in ("session", "turn", "replay", "caught_up", "error"):
            ctx.lines.setdefault(step, []).append(words)
