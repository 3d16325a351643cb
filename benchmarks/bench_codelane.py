"""codelane's side of `codelane bench`: the mock model over HTTP, one server per worker count, and
one measured turn per (workload, mode).

Every mode talks to the same mock LLM (the OpenAI wire format over HTTP, a fixed latency before
each response) replaying the same script, so every run makes exactly the same calls. A run is one
turn of a new session: the model asks for the workload's calls, codelane runs them, the model
answers. Timing comes from the turn's events:

- `wall` (the tool phase): from the moment every call of the response is known (the mock
  finished writing it; or the first ToolCallStarted, if later) to the last ToolCallFinished, on
  the machine's clock. It holds everything codelane does for the calls
  (scheduling, dispatch, transport, the tools, event persistence) and nothing of the model's
  latency. Query calls start as soon as their arguments are complete, while the model still
  streams: that head start is free, and the peers, given the whole list at once, have none.
  Also recorded: `after_response`, from the moment the mock wrote the end of its response to the
  last result, and `head_start`, how long before that end the first call started (negative:
  after, i.e. the time the server took to read the response);
- `turn_wall`: the client's view, from `send()` to TurnFinished (two model responses included);
- per call: `queue_wait` and `run_time` from ToolCallFinished, and `transport` = (finished -
  started) - run_time: the hub->worker->hub round trip (or the in-process call path).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from benchmarks.bench_workloads import PLUGIN_MODULE, Workload, canonical, signature
from codelane import events as ev
from codelane.client import Client
from session_server.llm.script import Script, ScriptedResponse
from session_server.mock_llm.options import MockOptions
from session_server.mock_llm.server import MockLLM
from session_server.server import CodelaneServer, ServerConfig
from tool_worker.child_watcher import pidfd_child_watcher

MODEL = "openai:codelane-bench"
# The suffix of a workers-N mode that sends every Query call to a worker.
DISPATCH_ALL = "+dispatch-all"
WORKER_CONNECT_TIMEOUT = 90.0
SERVER_STOP_TIMEOUT = 15.0
TURN_TIMEOUT = 300.0


@dataclass(frozen=True)
class Mode:
    """One codelane configuration. `concurrency` is how many calls it can run at once."""

    name: str
    workers: int  # 0: no workers, Query calls run in the server process (local fallback)
    query_concurrency: int
    concurrency: int
    description: str
    # Every Query call to a worker (no local fallback, so no placement rule either); otherwise the
    # server's default placement: calls cheaper here than on a worker (small reads) run here.
    dispatch_all: bool = False

    @property
    def server(self) -> tuple[int, bool]:
        """Which server process runs the mode: modes that differ only in their sessions share one."""
        return (self.workers, self.dispatch_all)


def make_modes(names: Sequence[str], slots: int, query_concurrency: int) -> list[Mode]:
    modes = []
    for name in names:
        if name == "sequential":
            modes.append(Mode(name, 0, 1, 1, "query_concurrency=1, in-process (no workers)"))
        elif name == "parallel-local":
            modes.append(Mode(
                name, 0, query_concurrency, query_concurrency,
                f"query_concurrency={query_concurrency}, in-process fallback only (local_workers=0)",
            ))
        elif name.startswith("workers-") and (
            count := name.removeprefix("workers-").removesuffix(DISPATCH_ALL)
        ).isdigit():
            n = int(count)
            if n < 1:
                raise ValueError(f"mode {name}: at least one worker")
            dispatch_all = name.endswith(DISPATCH_ALL)
            placement = ("every Query call on a worker (no local fallback)" if dispatch_all else
                         "reads of small files in the server (the default placement rule), every other Query "
                         "call on a worker")
            modes.append(Mode(
                name, n, query_concurrency, min(n * slots, query_concurrency),
                f"{n} worker process{'es' if n > 1 else ''} x {slots} slot{'s' if slots > 1 else ''}, "
                f"query_concurrency={query_concurrency}, {placement}", dispatch_all,
            ))
        else:
            raise ValueError(f"unknown mode {name!r}: sequential, parallel-local, workers-N or workers-N{DISPATCH_ALL}")
    return modes


@dataclass
class RunRecord:
    """One measured run of one workload, by codelane or a peer."""

    wall: float  # seconds: the tool phase
    calls: int
    signature: str
    errors: int
    order_ok: bool | None
    run_times: list[float]  # in call order
    queue_waits: list[float]  # in call order
    transports: list[float] | None = None  # codelane only
    turn_wall: float | None = None  # codelane only
    # codelane only: from the end of the model's response (as the mock sent it) to the last result
    after_response: float | None = None
    # codelane only: how long before the response ended the first call started (negative: after)
    head_start: float | None = None
    workers: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "wall": self.wall, "turn_wall": self.turn_wall, "after_response": self.after_response,
            "head_start": self.head_start,
            "calls": self.calls, "signature": self.signature,
            "errors": self.errors, "order_ok": self.order_ok, "run_times": self.run_times,
            "queue_waits": self.queue_waits, "transports": self.transports, "workers": self.workers,
            "problems": self.problems,
        }


# -- the mock model ----------------------------------------------------------------------------


class WorkloadMock(MockLLM):
    """The mock LLM serving one script per workload: the first user message names the workload
    (`...workload L`), the number of assistant messages picks the response, as in MockLLM."""

    def __init__(self, scripts: Mapping[str, Script], options: MockOptions) -> None:
        super().__init__(next(iter(scripts.values())), options)
        self.scripts = dict(scripts)
        # (step, epoch seconds) of every streamed response once its last frame was written: the
        # moment the model "finished speaking". The benchmark runs one turn at a time.
        self.responses_sent: list[tuple[int, float]] = []
        self._step = 0

    def _response_for(self, messages: list[Any]) -> ScriptedResponse:
        first_user = next(
            (m.get("content") for m in messages if isinstance(m, Mapping) and m.get("role") == "user"), ""
        )
        text = first_user if isinstance(first_user, str) else str(first_user)
        key = text.rsplit(" ", 1)[-1]
        script = self.scripts.get(key, self.script)
        self._step = sum(1 for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant")
        return script.response_at(self._step)

    async def _stream(self, request, *args):  # type: ignore[no-untyped-def]
        step = self._step
        response = await super()._stream(request, *args)
        self.responses_sent.append((step, time.time()))
        return response


async def start_mock(workloads: Sequence[Workload], latency: float) -> tuple[web.AppRunner, str, WorkloadMock]:
    """Serve the workloads' scripts on 127.0.0.1; returns (runner, OpenAI base URL, mock)."""
    scripts = {w.key: Script.from_data(w.script(), source=f"workload {w.key}") for w in workloads}
    mock = WorkloadMock(scripts, MockOptions(latency=latency))
    runner = web.AppRunner(mock.app(), access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}/v1", mock


# -- servers and turns -------------------------------------------------------------------------


class CodelaneHarness:
    """The mock model (in this process), and one session server per worker count, each in its own
    process with its local workers (sequential and parallel-local share the one without workers).
    The servers run apart from this process so that the benchmark's client (and the peers, which
    run here) never share a core lock with them, as in a deployment. `close()` stops everything."""

    def __init__(self, modes: Sequence[Mode], slots: int, llm_latency: float, log=print) -> None:
        self.modes = list(modes)
        self.slots = slots
        self.llm_latency = llm_latency
        self.log = log
        self.servers: dict[int, asyncio.subprocess.Process] = {}
        self.clients: dict[int, Client] = {}
        self._runner: web.AppRunner | None = None
        self._mock: WorkloadMock | None = None
        self._data_dir: Path | None = None

    async def start(self, workloads: Sequence[Workload]) -> None:
        self._runner, base_url, self._mock = await start_mock(workloads, self.llm_latency)
        self._data_dir = Path(tempfile.mkdtemp(prefix="codelane-bench-servers-"))
        # The server's openai provider reads these when it is created (at the first turn).
        env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "codelane-bench"}
        for workers, dispatch_all in sorted({m.server for m in self.modes}):
            self.servers[workers, dispatch_all] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.bench_codelane", "--workers", str(workers),
                "--slots", str(self.slots),
                "--data-dir", str(self._data_dir / f"workers-{workers}{DISPATCH_ALL if dispatch_all else ''}"),
                *(["--dispatch-all"] if dispatch_all else []),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
            )
        for (workers, dispatch_all), proc in self.servers.items():
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), WORKER_CONNECT_TIMEOUT)
            except TimeoutError:
                raise RuntimeError(
                    f"the server with {workers} workers was not ready within {WORKER_CONNECT_TIMEOUT:g} s"
                ) from None
            words = line.decode().split()
            if len(words) != 2 or words[0] != "READY":
                raise RuntimeError(f"the server with {workers} workers did not start (said {line!r})")
            self.clients[workers, dispatch_all] = Client(f"127.0.0.1:{words[1]}")
        self.log(
            f"codelane: {len(self.servers)} server process(es), {sum(w for w, _ in self.servers)} worker process(es) x "
            f"{self.slots} slot(s), mock LLM at {base_url} ({self.llm_latency * 1000:g} ms per response)"
        )

    async def close(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        self.clients.clear()
        for proc in self.servers.values():
            # EOF on stdin asks the server to stop (it stops its workers); a kill if it lingers.
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.servers.values():
            try:
                await asyncio.wait_for(proc.wait(), SERVER_STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.servers.clear()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
            self._runner = None
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    async def run(self, mode: Mode, workload: Workload) -> RunRecord:
        client = self.clients[mode.server]
        session = await client.create_session(
            workload.workspace, model=MODEL, query_concurrency=mode.query_concurrency, max_turns=4
        )
        workload.reset()
        events: list[ev.Event] = []
        started = time.perf_counter()
        finished: float | None = None

        async def consume() -> None:
            nonlocal finished
            async for event in session.send(workload.prompt):
                events.append(event)
                if isinstance(event, ev.TurnFinished):
                    finished = time.perf_counter()

        if self._mock is not None:
            self._mock.responses_sent.clear()
        await asyncio.wait_for(consume(), TURN_TIMEOUT)
        response_end = None
        if self._mock is not None:
            self._mock.requests.clear()  # the mock records every request; nothing here reads them
            response_end = next((t for step, t in self._mock.responses_sent if step == 0), None)
        record = parse_turn(events, workload, mode, response_end)
        record.turn_wall = (finished or time.perf_counter()) - started
        return record


def parse_turn(
    events: Sequence[ev.Event], workload: Workload, mode: Mode, response_end: float | None = None
) -> RunRecord:
    """The run's figures from its events; anything unexpected is listed in `problems`.

    `response_end` is when the mock model wrote the end of its tool-calling response (epoch
    seconds), for `after_response` and `head_start`."""
    problems: list[str] = []
    calls: list[ev.ToolCall] = []
    responded: float | None = None
    for event in events:
        if isinstance(event, ev.ModelResponded) and event.step == 0:
            calls = list(event.tool_calls)
            responded = event.time
    started: dict[str, float] = {}
    finished: dict[str, ev.ToolCallFinished] = {}
    for event in events:
        if isinstance(event, ev.ToolCallStarted) and event.call is not None:
            started.setdefault(event.call.call_id, event.time)
        elif isinstance(event, ev.ToolCallFinished):
            finished[event.call_id] = event
        elif isinstance(event, ev.CallRetried | ev.WorkerLost):
            problems.append(f"{event.kind}: {event}")
        elif isinstance(event, ev.ErrorOccurred):
            problems.append(f"error {event.reason}: {event.message}")
    turn = next((e for e in events if isinstance(e, ev.TurnFinished)), None)
    if turn is None:
        problems.append("the turn did not finish")
    elif turn.stop_reason != "end_turn" or turn.model_requests != 2:
        problems.append(f"turn ended with {turn.stop_reason!r} after {turn.model_requests} model requests")
    if len(calls) != len(workload.calls):
        problems.append(f"the model asked for {len(calls)} calls, the workload has {len(workload.calls)}")
    run_times, queue_waits, transports, executed, workers = [], [], [], [], []
    errors = 0
    for call in calls:
        done = finished.get(call.call_id)
        if done is None or done.result is None or call.call_id not in started:
            problems.append(f"call {call.call_id} ({call.tool_name}) has no start or finish event")
            continue
        result = done.result
        errors += result.is_error
        run_times.append(done.run_time)
        queue_waits.append(done.queue_wait)
        transports.append(max(0.0, done.time - started[call.call_id] - done.run_time))
        executed.append((call.tool_name, call.arguments, result.output, result.is_error))
        workers.append(result.worker_id)
        if mode.workers and call.lane == "query" and result.worker_id == "local" and (
            mode.dispatch_all or call.tool_name != "read"
        ):
            problems.append(f"call {call.call_id} ({call.tool_name}) ran in-process although the mode has workers")
    # The tool phase starts when every call of the response is known: when the mock finished
    # writing the response, or at the first call if none started before it. Calls dispatched
    # while the model was still streaming have a head start that costs nothing; the peers, given
    # the whole list at once, can have none. The mock's clock, not ModelResponded: the server
    # reads the stream on the loop that also runs small calls inline (a small `read`), so its
    # ModelResponded comes after those calls ran and would hide them from the phase. Without a
    # mock's timestamp, ModelResponded.
    wall = 0.0
    if finished and started:
        known = response_end if response_end is not None else responded
        phase_start = max(min(started.values()), known if known is not None else 0.0)
        wall = max(f.time for f in finished.values()) - phase_start
    after_response = head_start = None
    if response_end is not None and finished and started:
        after_response = max(f.time for f in finished.values()) - response_end
        head_start = response_end - min(started.values())
    elif response_end is None:
        problems.append("the mock did not report the end of the model's response")
    return RunRecord(
        wall=wall,
        after_response=after_response,
        head_start=head_start,
        calls=len(calls),
        signature=signature(canonical(c.tool_name, c.arguments_json) for c in calls),
        errors=errors,
        order_ok=workload.order_ok(executed),
        run_times=run_times,
        queue_waits=queue_waits,
        transports=transports,
        workers=sorted(set(workers)),
        problems=problems,
    )


# -- the server process ------------------------------------------------------------------------


async def _serve(workers: int, slots: int, data_dir: Path, dispatch_all: bool) -> None:
    """One session server with `workers` local workers; prints `READY <port>` once they are all
    connected, and stops on EOF on stdin (the benchmark is done, or gone) or SIGTERM."""
    with pidfd_child_watcher():
        await _serve_until_stopped(workers, slots, data_dir, dispatch_all)


async def _serve_until_stopped(workers: int, slots: int, data_dir: Path, dispatch_all: bool) -> None:
    server = CodelaneServer(ServerConfig(
        listen="127.0.0.1:0",
        data_dir=data_dir,
        local_workers=workers,
        local_worker_slots=slots,
        local_worker_tools=[PLUGIN_MODULE],
        model=MODEL,
        # dispatch_all: a Query call that no worker can take fails rather than running here. The
        # default placement runs small reads here, and `parse_turn` reports any other Query call
        # that did.
        local_fallback=not dispatch_all,
    ))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def watch_stdin() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    await server.start()
    try:
        deadline = time.monotonic() + WORKER_CONNECT_TIMEOUT
        while len(server.pool.workers()) < workers:
            if time.monotonic() > deadline or stop.is_set():
                return
            await asyncio.sleep(0.05)
        print(f"READY {server.port}", flush=True)
        await stop.wait()
    finally:
        await server.stop(grace=2.0)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="a session server for codelane bench (internal)")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--dispatch-all", action="store_true")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.workers, args.slots, args.data_dir, args.dispatch_all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
