"""How fast do events reach the clients that follow a session?

    python -m benchmarks.events_bench [--events 10000] [--subscribers 10] [--long-turn 24000]

A session server process with the in-process scripted model and the no-op plugin tool: a turn of
many steps of 250 no-op calls each makes about two events per call. Every event is stored before
it is sent (group commit), and sent in batches: the server's design, which this benchmark does not
check (tests/session/test_crash_recovery.py does: no event a client saw is lost to a kill -9).

1. Fan-out: `--subscribers` clients follow the session live (WatchEvents) while a turn of about
   `--events` events runs, each reading at full speed. Printed: deliveries per second in all,
   from the turn's first event to the last subscriber's TurnFinished (target >= 20,000/s).
2. A long, fast turn of about `--long-turn` events, read through its own SendMessage stream at
   full speed: it must arrive whole, gap-free, never cut.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from benchmarks import count
from codelane import events as ev
from codelane.client import CaughtUp, Client
from codelane.transport import create_channel
from codelane.v1 import session_pb2, session_pb2_grpc
from session_server.server import CodelaneServer, ServerConfig
from tool_worker.child_watcher import pidfd_child_watcher

CALLS_PER_STEP = 250
START_TIMEOUT = 60.0
TURN_TIMEOUT = 300.0
FANOUT_TARGET = 20_000


def write_script(path: Path, events: int) -> None:
    """Steps of CALLS_PER_STEP no-op calls until about `events` events, then a final answer."""
    steps = max(1, round(events / (2 * CALLS_PER_STEP + 3)))
    responses = [
        {"text": f"step {s}", "tool_calls": [{"id": f"c{s}_{i}", "name": "noop", "arguments": {}}
                                             for i in range(CALLS_PER_STEP)]}
        for s in range(steps)
    ]
    path.write_text(json.dumps({"responses": [*responses, {"text": "done"}]}))


async def start_server(scratch: Path, name: str, events: int) -> tuple[asyncio.subprocess.Process, Client]:
    script = scratch / f"{name}.json"
    write_script(script, events)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.events_bench", "--serve", str(script), "--data-dir", str(scratch / name),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
    return proc, Client(f"127.0.0.1:{line.split()[1].decode()}", timeout=30)


async def follow(client: Client, session_id: str, ready: asyncio.Event) -> tuple[int, float]:
    """Reads the session's live events to TurnFinished: (events, time of the last one)."""
    session = await client.get_session(session_id)
    count = 0
    async for item in session.watch(after=0, follow=True):
        if isinstance(item, CaughtUp):
            ready.set()
            continue
        count += 1
        if isinstance(item, ev.TurnFinished):
            return count, time.perf_counter()
    raise RuntimeError("the watch ended before TurnFinished")


async def fanout(scratch: Path, events: int, subscribers: int) -> tuple[float, int, float]:
    proc, client = await start_server(scratch, "fanout", events)
    try:
        session = await client.create_session(scratch, max_turns=1000)
        readers = [Client(client.address, timeout=30) for _ in range(subscribers)]
        readies = [asyncio.Event() for _ in readers]
        tasks = [asyncio.create_task(follow(r, session.id, ready)) for r, ready in zip(readers, readies, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in readies)), START_TIMEOUT)
        started = time.perf_counter()
        async for _ in session.send("go"):
            pass
        results = await asyncio.wait_for(asyncio.gather(*tasks), TURN_TIMEOUT)
        last = max(t for _, t in results)
        delivered = sum(n for n, _ in results)
        for reader in readers:
            await reader.close()
        return delivered / (last - started), delivered, last - started
    finally:
        await _stop(proc, client)


async def long_turn(scratch: Path, events: int) -> tuple[int, float, str | None]:
    """(events read, seconds, why the turn did not arrive whole through its own stream or None)."""
    proc, client = await start_server(scratch, "long", events)
    try:
        session = await client.create_session(scratch, max_turns=1000)
        # The SendMessage stream read as it is, not through `session.send`: the client mends a
        # stream the server cuts with a WatchEvents after the last event (none missed), which would
        # hide exactly the cut this measures.
        sequences: list[int] = []
        finished, cut = False, None
        channel = create_channel(client.address)
        try:
            call = session_pb2_grpc.SessionServiceStub(channel).SendMessage(
                session_pb2.SendMessageRequest(session_id=session.id, text="go"))
            started = time.perf_counter()
            try:
                async for reply in call:
                    for event in reply.events:
                        sequences.append(event.sequence)
                        finished = isinstance(ev.event_from_proto(event), ev.TurnFinished)
            except grpc.aio.AioRpcError as exc:
                cut = f"{exc.code().name}: {exc.details()}"
            elapsed = time.perf_counter() - started
        finally:
            await channel.close()
        return len(sequences), elapsed, long_turn_problem(sequences, finished, cut)
    finally:
        await _stop(proc, client)


def long_turn_problem(sequences: Sequence[int], finished: bool, cut: str | None) -> str | None:
    """Why the turn's own stream did not carry the whole turn (None: it did): cut by an error,
    a gap in the sequence numbers, or an end before TurnFinished."""
    if cut is not None:
        return f"the stream was cut after {len(sequences)} events ({cut})"
    if list(sequences) != list(range(1, len(sequences) + 1)):
        missing = next(i for i, s in enumerate(sequences, start=1) if s != i)
        return f"a gap in the events: sequence {sequences[missing - 1]} where {missing} was due"
    if not finished:
        return f"the stream ended after {len(sequences)} events, before TurnFinished"
    return None


async def _stop(proc: asyncio.subprocess.Process, client: Client) -> None:
    await client.close()
    proc.stdin.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 15)
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def main_async(args: argparse.Namespace) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="codelane-events-"))
    try:
        rate, delivered, seconds = await fanout(scratch, args.events, args.subscribers)
        verdict = "met" if rate >= FANOUT_TARGET else "MISSED"
        print(f"fan-out: {delivered} events to {args.subscribers} live subscribers in {seconds:.2f} s: "
              f"{rate:,.0f} events/s in all (target >= {FANOUT_TARGET:,}/s: {verdict})")
        count, seconds, problem = await long_turn(scratch, args.long_turn)
        print(f"long turn: {count} events through the turn's own SendMessage stream in {seconds:.2f} s "
              f"({count / seconds:,.0f}/s), {problem or 'gap-free and whole, never cut'} "
              f"(target: the whole turn arrives: {'met' if problem is None else 'MISSED'})")
        return 0 if problem is None else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def serve(script: Path, data_dir: Path) -> None:
    with pidfd_child_watcher():
        server = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=data_dir, model=f"scripted:{script}",
                                             local_worker_tools=["benchmarks.plugin_tools"]))
        await server.start()
        print(f"READY {server.port}", flush=True)
        try:
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
        finally:
            await server.stop(grace=1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.events_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=count, default=10_000)
    parser.add_argument("--subscribers", type=count, default=10)
    parser.add_argument("--long-turn", type=count, default=24_000)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.data_dir))
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
