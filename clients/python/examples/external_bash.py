"""External lane: the session's Execute calls run here, in this client's environment.

The session is created with the Execute lane in EXTERNAL mode: every side-effecting call the
model makes becomes an external task, which this client claims, runs, and completes with its
result (`Session.run_external_tasks`). The policy withholds the other Execute tools (write, edit,
...) from the model, so `bash` is the only one it sees, and refuses `rm` outright. Commands run
with `bash -c` in LOCAL_DIR (default: the current directory) of the machine running this script,
which need not be the server's.

Run a server with the example's scripted model (no API key needed), from the repository root:

    codelane server --model scripted:clients/python/examples/external_bash.yaml &
    python clients/python/examples/external_bash.py [WORKSPACE [LOCAL_DIR]]

WORKSPACE (a directory of the server's machine) defaults to the current directory;
$CODELANE_SERVER overrides the server's address (default 127.0.0.1:50051).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from codelane.client import Client
from codelane.events import Event, ExternalTask, TextDelta, ToolCallFinished, ToolCallStarted, ToolResult, TurnFinished

PROMPT = "Where do your commands run?"
CLIENT_ID = f"external-bash-{os.getpid()}"
SHELL = shutil.which("bash") or "/bin/sh"
DEFAULT_TIMEOUT_MS = 120_000
MAX_TIMEOUT_MS = 600_000
MAX_OUTPUT_CHARS = 30_000
# run_external_tasks renews the lease while a command runs; if this client dies, another client
# gets the task within this many seconds.
LEASE = 30.0
# Execute tools this client does not run: withheld from the model by the session's policy.
NOT_RUN_HERE = ["write", "edit", "delete", "move", "copy", "execute"]


def bash_handler(cwd: Path) -> Callable[[ExternalTask], Awaitable[ToolResult]]:
    """A handler for `run_external_tasks` that runs `bash` calls with `bash -c` in `cwd`."""

    async def run(task: ExternalTask) -> ToolResult:
        if task.call.tool_name != "bash":
            return ToolResult(f"{task.call.tool_name} is not run by this client; only bash is", is_error=True,
                              error_kind="unknown_tool")
        arguments = task.call.arguments
        command = arguments.get("command")
        if not isinstance(command, str) or not command.strip():
            return ToolResult("bash needs a non-empty 'command' string", is_error=True, error_kind="invalid_arguments")
        timeout_ms = min(int(arguments.get("timeout", DEFAULT_TIMEOUT_MS)), MAX_TIMEOUT_MS)
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            SHELL, "-c", command, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout_ms / 1000)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
            return ToolResult(f"bash timed out after {timeout_ms} ms and was killed", is_error=True,
                              error_kind="timeout", run_time=time.perf_counter() - started)
        finally:
            if proc.returncode is None:  # cancelled: leave no process behind
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
        text = out.decode("utf-8", errors="replace")
        truncated = len(text) > MAX_OUTPUT_CHARS
        if truncated:
            half = MAX_OUTPUT_CHARS // 2
            text = f"{text[:half]}\n... [{len(text) - MAX_OUTPUT_CHARS} characters cut] ...\n{text[-half:]}"
        code = proc.returncode
        if code != 0:
            text += f"\n[exit code {code}]"
        return ToolResult(text, is_error=code != 0, error_kind="tool_error" if code != 0 else "", exit_code=code,
                          truncated=truncated, run_time=time.perf_counter() - started,
                          metadata={"host": os.uname().nodename, "cwd": str(cwd)})

    return run


def show(event: Event) -> None:
    if isinstance(event, TextDelta):
        print(f"model: {event.text}")
    elif isinstance(event, ToolCallStarted) and event.call is not None:
        print(f"-> {event.call.tool_name} {json.dumps(event.call.arguments)} claimed by {event.worker_id}")
    elif isinstance(event, ToolCallFinished) and event.result is not None:
        print(f"<- {event.tool_name}: {event.result.output.strip()}")
    elif isinstance(event, TurnFinished):
        print(f"turn finished: {event.stop_reason}")


async def main(workspace: str, local_dir: str) -> int:
    address = os.environ.get("CODELANE_SERVER", "127.0.0.1:50051")
    async with Client(address, timeout=10) as client:
        session = await client.create_session(
            workspace, lanes={"execute": "external"}, permissions={"deny": [*NOT_RUN_HERE, "bash(rm *)"]},
        )
        print(f"session {session.id}: Execute calls run here, in {local_dir}")
        stop = asyncio.Event()
        runner = asyncio.create_task(
            session.run_external_tasks(CLIENT_ID, bash_handler(Path(local_dir)), stop=stop, lease=LEASE)
        )
        finished: TurnFinished | None = None
        try:
            async for event in session.send(PROMPT):
                show(event)
                if isinstance(event, TurnFinished):
                    finished = event
        finally:
            stop.set()
            ran = await runner
        print(f"{ran} external task(s) ran in this client")
    return 0 if finished is not None and finished.stop_reason == "end_turn" else 1


if __name__ == "__main__":
    workspace = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
    local_dir = os.path.abspath(sys.argv[2] if len(sys.argv) > 2 else ".")
    sys.exit(asyncio.run(main(workspace, local_dir)))
