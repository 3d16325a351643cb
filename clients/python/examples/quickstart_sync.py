"""Quickstart (sync SDK): create a session, send a prompt, print its events as they come, stop
listening half-way, then resume from the last sequence seen with a watch, and read the history.

The same as quickstart_async.py, blocking: `codelane.sync.Client` runs the async SDK on an event
loop in a background thread, for scripts and notebooks that do not use asyncio.

Run a server with the examples' scripted model (no API key needed), from the repository root:

    codelane server --model scripted:clients/python/examples/quickstart.yaml --local-workers 2 &
    codelane workers        # until it lists local-1 and local-2 (a few seconds)
    python clients/python/examples/quickstart_sync.py [WORKSPACE]

The turn's read-only calls then run in parallel on those two workers; sent before they connect,
they run in the server itself (their events name worker `local`).

WORKSPACE defaults to the current directory (a directory of the server's machine);
$CODELANE_SERVER overrides the server's address (default 127.0.0.1:50051).
"""

from __future__ import annotations

import os
import sys

from codelane import CaughtUp, Event, TextDelta, ToolCallFinished, ToolCallStarted, TurnFinished
from codelane.sync import Client

PROMPT = "What is in this workspace, and are there TODOs?"


def show(event: Event) -> None:
    if isinstance(event, TextDelta):
        print(f"[{event.sequence}] model: {event.text}")
    elif isinstance(event, ToolCallStarted) and event.call is not None:
        print(f"[{event.sequence}] -> {event.call.tool_name} {event.call.arguments_json} on {event.worker_id}")
    elif isinstance(event, ToolCallFinished) and event.result is not None:
        status = "error" if event.result.is_error else "ok"
        print(f"[{event.sequence}] <- {event.tool_name} {status} in {event.run_time * 1000:.1f} ms")
    elif isinstance(event, TurnFinished):
        print(f"[{event.sequence}] turn finished: {event.stop_reason}, {event.tool_calls} tool call(s)")
    else:
        print(f"[{event.sequence}] {event.kind}")


def main(workspace: str) -> int:
    address = os.environ.get("CODELANE_SERVER", "127.0.0.1:50051")
    with Client(address, timeout=10) as client:
        session = client.create_session(os.path.abspath(workspace))
        print(f"session {session.id} on {session.info.workspace} ({session.info.model})")

        # Listen to the turn until its first tool call starts, then stop listening, as if the
        # connection had dropped. The turn goes on on the server.
        last_seen = 0
        for event in session.send(PROMPT):
            show(event)
            last_seen = event.sequence
            if isinstance(event, ToolCallStarted):
                break
        print(f"-- stopped listening after sequence {last_seen}; resuming from there --")

        # Every event is stored with a gap-free sequence: pick up exactly where we left off.
        finished: TurnFinished | None = None
        for event in session.watch(after=last_seen):
            if isinstance(event, CaughtUp):
                print(f"-- caught up at sequence {event.last_sequence}; now live --")
                continue
            show(event)
            if isinstance(event, TurnFinished):
                finished = event
                break

        for message in session.messages():
            text = message.tool_result.output if message.tool_result is not None else message.text
            first_line = text.strip().splitlines()[0] if text.strip() else ""
            print(f"history #{message.index} {message.role}: {first_line[:70]}")
    return 0 if finished is not None and finished.stop_reason == "end_turn" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
