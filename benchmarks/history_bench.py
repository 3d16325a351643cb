"""Does a model step cost the server more as a session's history grows? It must not.

    python -m benchmarks.history_bench [--sizes 20,200,2000] [--samples 30]

One session server process with the in-process scripted model (no network, so the figure is the
server's own work). For each size, a session is brought to that many history messages by real
turns (each turn adds a user and an assistant message), then the median of `--samples` text-only
turns (one model step each, timed by the client from sending to TurnFinished; the sizes take
turns) is printed beside the smallest size's: flat means a ratio near 1.

A model behind HTTP is sent the whole history at every step, which no server can make flat; the
benchmark also prints what encoding that request body costs at each size, the way httpx's `json=`
does it and the way the providers do it (`session_server.llm.wire_json.encode_body`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from benchmarks import count
from benchmarks.tools_bench import paired_medians
from codelane.client import Client
from session_server.llm.base import ChatMessage, ModelRequest, ModelToolCall
from session_server.llm.openai import request_body
from session_server.llm.wire_json import encode_body
from session_server.server import CodelaneServer, ServerConfig
from tool_worker.child_watcher import pidfd_child_watcher

START_TIMEOUT = 60.0
# Met when the largest history's step costs at most this much more than the smallest's.
FLAT_RATIO = 1.25


async def turn(client: Client, session_id: str, text: str) -> float:
    session = await client.get_session(session_id)
    started = time.perf_counter()
    async for _ in session.send(text):
        pass
    return time.perf_counter() - started


async def main_async(args: argparse.Namespace) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="codelane-history-"))
    proc = None
    client = None
    try:
        script = scratch / "script.json"
        # Past its end the script answers every request with the same text: one step per turn.
        script.write_text(json.dumps({"responses": [{"text": "ok"}]}))
        (scratch / "ws").mkdir()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.history_bench", "--serve", str(script), "--data-dir",
            str(scratch / "data"), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        client = Client(f"127.0.0.1:{line.split()[1].decode()}", timeout=30)
        sessions: dict[int, str] = {}
        for size in args.sizes:
            session = await client.create_session(scratch / "ws")
            for i in range(size // 2):
                await turn(client, session.id, f"filler {i}")
            sessions[size] = session.id
        # Interleaved, a turn of each size in every round: a drift of this shared machine's speed
        # (or of the process's) then touches every size alike.
        samples: dict[int, list[float]] = {size: [] for size in args.sizes}
        for i in range(args.samples):
            for size, session_id in sessions.items():
                samples[size].append(await turn(client, session_id, f"measured {i}"))
        figures = {size: statistics.median(seconds) for size, seconds in samples.items()}
        base = figures[args.sizes[0]]
        # Each measured turn adds its two messages to the session it measures: a size's samples
        # see its history from `size` to `size + 2 x (samples - 1)` messages, which is printed.
        grown = 2 * (args.samples - 1)
        print(f"one model step (text-only turn), median of {args.samples}, by history size:")
        for size, seconds in figures.items():
            print(f"  {f'{size}-{size + grown}':>11} messages  {seconds * 1000:7.2f} ms   x{seconds / base:.2f}")
        ratio = figures[args.sizes[-1]] / base
        verdict = "met" if ratio <= FLAT_RATIO else "MISSED"
        print(f"target: flat (at most x{FLAT_RATIO:g} from {args.sizes[0]} to {args.sizes[-1]} messages): "
              f"x{ratio:.2f}, {verdict}")
        print_body_encoding(args.sizes, args.samples)
        return 0
    finally:
        if client is not None:
            await client.close()
        if proc is not None:
            proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 15)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def print_body_encoding(sizes: Sequence[int], samples: int) -> None:
    print("an OpenAI request body of the whole history (user, assistant with a read call, its 50-line result, "
          f"assistant; median of {samples}, alternating):")
    for size in sizes:
        body = request_body(ModelRequest("m", "You are a coding agent.", _history(size), []))
        encoded = encode_body(body)
        assert httpx.Request("POST", "http://model/", json=body).content == encoded
        by_httpx, ours = paired_medians(lambda body=body: httpx.Request("POST", "http://model/", json=body),
                                        lambda body=body: encode_body(body), samples)
        print(f"  {size:>6} messages  {len(encoded) / 1024:7.0f} KiB   httpx json= {by_httpx:7.2f} ms   "
              f"encode_body {ours:6.2f} ms   x{by_httpx / ours:.1f}")


def _history(size: int) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    result = "\n".join(f"{k:6}\tdef f{k}(x):  # é" for k in range(50))
    for i in range(max(1, size // 4)):
        call = ModelToolCall(f"c{i}", "read", f'{{"file_path": "m{i}.py"}}')
        messages += [
            ChatMessage("user", f"please look at module {i} ✓"),
            ChatMessage("assistant", "Reading it.", [call]),
            ChatMessage("tool", result, tool_call_id=f"c{i}"),
            ChatMessage("assistant", "It defines fifty functions."),
        ]
    return messages


async def serve(script: Path, data_dir: Path) -> None:
    with pidfd_child_watcher():
        await _serve_until_stopped(script, data_dir)


async def _serve_until_stopped(script: Path, data_dir: Path) -> None:
    server = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=data_dir, model=f"scripted:{script}"))
    await server.start()
    print(f"READY {server.port}", flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    finally:
        await server.stop(grace=1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.history_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: sorted(int(n) for n in s.split(",")), default=[20, 200, 2000])
    parser.add_argument("--samples", type=count, default=30)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.data_dir))
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
