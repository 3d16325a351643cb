"""The blocking Python SDK: the async SDK (`codelane.client`) run on an event loop in a background thread.

    from codelane.sync import Client

    with Client("127.0.0.1:50051") as client:
        session = client.create_session("/path/to/repo")
        for event in session.send("Find the TODOs"):
            print(event.kind, event.sequence)

Every method runs the async method of the same name on the client's loop and waits for it, so the
two APIs take the same arguments and raise the same `CodelaneError`; async generators become
iterators, and async `Session` objects come back as sync ones. Async methods without a sync
counterpart written out below (for instance ones added to the async SDK later) are forwarded the
same way by `__getattr__`. One client may be shared by many threads; each iterator should be
consumed by one thread at a time. Close the client (or use `with`) to stop its thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from codelane import client as aio
from codelane.client import (
    DEFAULT_ADDRESS,
    CodelaneError,
    LaneStats,
    Message,
    ServerInfo,
    SessionInfo,
    ToolInfo,
    WorkerInfo,
)
from codelane.events import CaughtUp, Event

__all__ = ["DEFAULT_ADDRESS", "Client", "CodelaneError", "Session"]

T = TypeVar("T")

CLOSE_TIMEOUT = 10.0  # bound on closing the channel and stopping the loop's thread
STOP_POLL = 0.2  # how often a threading.Event given as `stop` is checked
INTERRUPT_POLL = 0.2  # how often a waiting caller's thread checks for Ctrl-C


class _LoopThread:
    """An asyncio event loop running forever in a daemon thread, running coroutines for callers in
    any other thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="codelane-sync-loop", daemon=True)
        self._closed = False
        # Held while a coroutine is handed to the loop and while closing begins: every coroutine
        # handed over before `_closed` is set reaches the loop before the shutdown does (the
        # loop runs callbacks in order), so the shutdown sees and cancels its task.
        self._lock = threading.Lock()
        # Futures of coroutines handed to the loop and not done yet: those the loop never got to
        # run (it stopped first) are cancelled at close, so no caller waits for them for ever.
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def closed(self) -> bool:
        return self._closed

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs `coro` on the loop and waits for its result. An interrupt (Ctrl-C) of the waiting
        thread cancels the coroutine before it propagates."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("a codelane.sync method was called from its own event loop; use codelane.client")
        with self._lock:
            if self._closed:
                coro.close()
                raise RuntimeError("this codelane.sync.Client is closed")
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
            self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        try:
            while not future.done():
                # Waiting in slices lets Ctrl-C in: a lock wait without a timeout is not always
                # interrupted by a signal (never on Windows, nor when it lands on another thread).
                concurrent.futures.wait([future], INTERRUPT_POLL)
            return future.result()
        except concurrent.futures.CancelledError:
            if self._closed:
                raise CodelaneError("CANCELLED", "the client was closed while this call was running") from None
            raise
        except BaseException:
            future.cancel()
            raise

    def iterate(self, stream: AsyncIterator[Any], wrap: Any) -> Iterator[Any]:
        """A blocking iterator over an async one; closing it (or leaving a `for` loop) closes the
        async one, which cancels its RPC."""
        try:
            while True:
                try:
                    item = self.run(_anext(stream))
                except StopAsyncIteration:
                    return
                yield wrap(item)
        finally:
            self._aclose(stream)

    def _aclose(self, stream: AsyncIterator[Any]) -> None:
        aclose = getattr(stream, "aclose", None)
        if aclose is None or self._closed:
            return
        if self.in_loop_thread():  # a garbage collection in the loop's own thread: cannot block here
            self.loop.create_task(aclose())
            return
        try:
            self.run(aclose())
        except (RuntimeError, CodelaneError):
            if not self._closed:
                raise
            # Closed meanwhile: the shutdown cancelled the stream and its RPC already.

    def close(self, before: Coroutine[Any, Any, Any] | None = None) -> None:
        """Runs `before` (e.g. closing the channel), cancels what still runs, stops the loop and
        joins the thread. Idempotent."""
        with self._lock:
            if self._closed or not self._thread.is_alive() or self.in_loop_thread():
                if before is not None:
                    before.close()
                if not self._closed and self.in_loop_thread():  # cannot wait for ourselves: just stop
                    self.loop.stop()
                self._closed = True
                return
            # Set first: a caller whose call the shutdown cancels then sees a closed client.
            self._closed = True
            future = asyncio.run_coroutine_threadsafe(self._shutdown(before), self.loop)
        try:
            future.result(CLOSE_TIMEOUT)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(CLOSE_TIMEOUT)
            for waiting in list(self._pending):
                waiting.cancel()
            if not self._thread.is_alive():
                self.loop.close()

    async def _shutdown(self, before: Coroutine[Any, Any, Any] | None) -> None:
        if before is not None:
            await before
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.loop.shutdown_asyncgens()


async def _anext(stream: AsyncIterator[T]) -> T:
    return await stream.__anext__()


async def _invoke(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Calls an async SDK method inside the loop (gRPC's asyncio objects belong to it)."""
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


class _Facade:
    """What Client and Session share: forwarding calls to the wrapped async object."""

    _runner: _LoopThread
    _target: Any

    def _call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Runs the async method `name` with these arguments and returns its result made sync."""
        fn = getattr(self._target, name)
        args = tuple(_unwrap(a) for a in args)
        kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
        return self._wrap(self._runner.run(_invoke(fn, args, kwargs)))

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, aio.Session):
            return Session(self._runner, value)
        if hasattr(value, "__aiter__"):
            return self._runner.iterate(value, self._wrap)
        return value

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not defined here: forward public async methods.
        if name.startswith("_"):
            raise AttributeError(name)
        target = self.__dict__.get("_target")
        value = getattr(target, name)  # AttributeError if the async object lacks it too
        if not callable(value):
            return value

        def method(*args: Any, **kwargs: Any) -> Any:
            return self._call(name, *args, **kwargs)

        method.__name__ = name
        method.__doc__ = getattr(value, "__doc__", None)
        return method

    def __dir__(self) -> list[str]:
        own = set(super().__dir__())
        return sorted(own | {n for n in dir(self.__dict__.get("_target")) if not n.startswith("_")})


def _close(runner: _LoopThread, target: aio.Client) -> None:
    runner.close(before=target.close())


def _unwrap(value: Any) -> Any:
    return value._target if isinstance(value, Session) else value


class Client(_Facade):
    """A blocking connection to a codelane server: `codelane.client.Client` run on a background
    thread's event loop. Reuse one per process; close it (or use `with`).

    Options are those of the async client: `token` (bearer token), `tls_ca`, `tls_cert`, `tls_key`
    (TLS, mTLS with a client cert), `timeout` (seconds allowed to each unary call; None = none)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **options: Any) -> None:
        self._runner = _LoopThread()
        try:
            self._target = self._runner.run(_invoke(aio.Client, (address,), options))
        except BaseException:
            self._runner.close()
            raise
        self.address = address
        # A client dropped without close() still closes its channel and stops its thread.
        self._finalizer = weakref.finalize(self, _close, self._runner, self._target)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<codelane.sync.Client {self.address} {state}>"

    @property
    def closed(self) -> bool:
        return self._runner.closed

    def close(self) -> None:
        """Closes the channel, cancels calls still running in other threads (they raise
        CodelaneError CANCELLED) and stops the background thread. Idempotent."""
        self._finalizer()

    def create_session(self, workspace: str | Path, **config: Any) -> Session:
        """Creates a session on a workspace directory of the server's machine. `config` takes the
        async client's options (model, system_prompt, max_turns, query_concurrency, labels, ...)."""
        return self._call("create_session", workspace, **config)

    def get_session(self, session_id: str) -> Session:
        """The session with this id (CodelaneError NOT_FOUND if there is none)."""
        return self._call("get_session", session_id)

    def list_sessions(self, page_size: int = 50) -> Iterator[SessionInfo]:
        """Every session, newest first, fetched a page at a time as you iterate."""
        return self._call("list_sessions", page_size)

    def delete_session(self, session_id: str) -> None:
        """Deletes a session and its history."""
        return self._call("delete_session", session_id)

    def list_tools(self, session_id: str) -> list[ToolInfo]:
        """The tools a session's model is offered now, sorted by name, with where each runs."""
        return self._call("list_tools", session_id)

    def list_workers(self) -> list[WorkerInfo]:
        """The connected tool workers, with their verdict on each workspace."""
        return self._call("list_workers")

    def drain_worker(self, worker_id: str, reason: str = "") -> None:
        """Asks a worker to finish its calls, take no more, and disconnect."""
        return self._call("drain_worker", worker_id, reason)

    def queue_stats(self) -> list[LaneStats]:
        """Per lane: calls pending, active, completed, failed, and latency percentiles (seconds)."""
        return self._call("queue_stats")

    def server_info(self) -> ServerInfo:
        """The server's version and start time."""
        return self._call("server_info")

    def health(self, service: str = "") -> str:
        """The gRPC health status ("SERVING", ...) of the server or of one of its services."""
        return self._call("health", service)


class Session(_Facade):
    """One session, blocking: `send()` runs a turn, `watch()` replays and follows its events.
    Get one from `Client.create_session` or `Client.get_session`."""

    def __init__(self, runner: _LoopThread, session: aio.Session) -> None:
        self._runner = runner
        self._target = session

    def __repr__(self) -> str:
        return f"<codelane.sync.Session {self.id} {self.info.state}>"

    @property
    def id(self) -> str:
        return self._target.id

    @property
    def info(self) -> SessionInfo:
        """What the server said about the session when last fetched (see `refresh()`)."""
        return self._target.info

    def send(self, text: str) -> Iterator[Event]:
        """Sends a user message now, and returns an iterator of the turn's events, ending with
        TurnFinished. The turn starts when `send` is called, whether its events are read then,
        later or never (errors of the call itself come out of the iteration). Leaving the loop
        early stops listening, not the turn: resume with `watch(after=last_sequence_seen)`, or
        stop the turn with `cancel()`."""
        return self._call("send", text)

    def watch(self, after: int = 0, *, follow: bool = True) -> Iterator[Event | CaughtUp]:
        """Stored events with sequence > after, a CaughtUp marker, then live ones (if follow)."""
        return self._call("watch", after, follow=follow)

    def cancel(self, reason: str = "") -> bool:
        """Cancels the running turn; False when none was running."""
        return self._call("cancel", reason)

    def tools(self) -> list[ToolInfo]:
        """The tools this session's model is offered now, sorted by name, with where each runs."""
        return self._call("tools")

    def refresh(self) -> SessionInfo:
        """Fetches the session again and returns (and keeps in `info`) its current state."""
        return self._call("refresh")

    def messages(self) -> list[Message]:
        """The whole history, in order."""
        return self._call("messages")

    def run_external_tasks(
        self, client_id: str, handler: Callable[[Any], Any], *, stop: threading.Event | None = None, **options: Any
    ) -> int:
        """Serves this session's external tasks until `stop` is set (or forever), as the async
        method does, with a plain function: `handler(task) -> ToolResult` runs in a worker thread
        (an async handler runs on the client's loop). `options` are the async method's (max_tasks,
        lease, wait). Returns how many tasks were completed; Ctrl-C stops it."""

        async def serve() -> int:
            async def run(task: Any) -> Any:
                if inspect.iscoroutinefunction(handler):
                    return await handler(task)
                return await asyncio.to_thread(handler, task)

            stopped, watcher = None, None
            if stop is not None:
                stopped = asyncio.Event()
                watcher = asyncio.ensure_future(_mirror(stop, stopped))
            try:
                return await self._target.run_external_tasks(client_id, run, stop=stopped, **options)
            finally:
                if watcher is not None:
                    watcher.cancel()

        return self._runner.run(serve())


async def _mirror(flag: threading.Event, event: asyncio.Event) -> None:
    """Sets `event` once `flag` is set. A threading.Event cannot wake the loop by itself: it is
    waited for in a worker thread, STOP_POLL seconds at a time so cancelling this stays prompt."""
    while not await asyncio.to_thread(flag.wait, STOP_POLL):
        pass
    event.set()
