"""A live terminal view of a turn, with rich: the model's text as it streams, a table of the
step's tool calls updating in place, a progress line while they run, and the turn's summary.

What is finished (whole lines of text, a step's final table, notices, the summary) is printed
above the live area and stays in the terminal's scrollback; the live area holds only what still
changes, so a long turn never overflows the screen.

    with LiveRenderer(Console()) as view:
        async for event in session.send(prompt):
            view.show(event)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from codelane import events as ev
from codelane.diffs import call_diff
from codelane.terminal import for_terminal

REFRESH_PER_SECOND = 8
ARGUMENTS_PREVIEW_CHARS = 60

STATUS_STYLES = {
    "queued": "dim",
    "running": "yellow",
    "ok": "green",
    "error": "bold red",
    "timed out": "bold red",
    "retried": "magenta",
    "confirm?": "bold cyan",
    "cancelled": "dim",
    "approved": "cyan",
    "rejected": "red",
    "denied": "red",
}

# Statuses of a call that has not ended: "cancelled" if the turn ends first.
_IN_PROGRESS = ("queued", "running", "retried", "confirm?", "approved")
# ... of those, the ones that count as running (a queued call waits behind an Execute call).
_RUNNING = ("running", "retried", "confirm?", "approved")


def finished_status(result: ev.ToolResult, confirmed: str | None) -> str:
    """How a finished call shows: ok, or why not. `confirmed`: how its confirmation ended, if it
    needed one ("approved", "rejected", "timed_out_rejected", ...)."""
    if not result.is_error:
        return "ok"
    if result.error_kind == "cancelled":
        return "cancelled"
    if result.error_kind == "timeout":
        return "timed out"
    if result.error_kind == "permission_denied":
        return "rejected" if confirmed is not None else "denied"
    return "error"


@dataclass
class CallRow:
    """One tool call of the current step, as the table shows it."""

    call_id: str
    tool: str
    arguments: str = ""
    lane: str = ""
    worker: str = ""
    status: str = "running"
    index: int = 1 << 30  # its place in the model's response; unknown until the call is seen
    attempt: int = 1
    started: float | None = None  # client clock, when it started (for a running duration)
    duration: float | None = None  # server-measured run time, once finished
    retried: bool = False


def _preview(arguments_json: str) -> str:
    text = " ".join(arguments_json.split())
    return text if len(text) <= ARGUMENTS_PREVIEW_CHARS else text[: ARGUMENTS_PREVIEW_CHARS - 1] + "…"


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


class LiveRenderer:
    """Shows a turn's events on a rich Console. Use as a context manager to run the live area;
    without it (as in tests) finished output goes straight to the console and the live area can
    be rendered on demand with `console.print(renderer)`."""

    def __init__(self, console: Console, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self._clock = clock
        # rich refreshes the live area from its own thread, holding its lock while it renders us; so
        # we never call into the console while holding ours (the two locks would deadlock).
        self._lock = threading.RLock()
        self._outbox: list[RenderableType] = []  # what to print once our lock is released
        self._live: Live | None = None
        self._text = ""  # the model's current unfinished line
        self._rows: dict[str, CallRow] = {}  # the current step's calls, in start order
        self._step = 0  # the model step those calls belong to
        self._turn_started: float | None = None
        self._finished = False
        self._spinner = Spinner("dots", style="dim")  # one object: its frame follows its own clock
        self._calls: dict[str, ev.ToolCall] = {}  # this turn's calls, for the diffs of edits and writes
        self._confirmed: dict[str, str] = {}  # call id -> how its confirmation ended
        self.done = 0
        self.failed = 0
        self.cancelled = 0
        self.refused = 0  # denied by the policy, or rejected at confirmation
        self.retried = 0

    # -- the live area ------------------------------------------------------------------------

    def __enter__(self) -> LiveRenderer:
        # Transient: the area is erased when it stops, and what it held is printed for good then.
        self._live = Live(self, console=self.console, refresh_per_second=REFRESH_PER_SECOND, transient=True,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stops the live area; an unfinished step (a turn interrupted) stays on screen as it was."""
        if self._live is None:
            return
        self._erase()
        with self._lock:
            self._commit_step()
        self._flush()

    def _erase(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def pause(self) -> _Paused:
        """A context in which the live area is gone, e.g. to ask a question on the terminal."""
        return _Paused(self)

    def __rich__(self) -> RenderableType:
        with self._lock:
            parts: list[RenderableType] = []
            if self._text:
                parts.append(Text(self._text))
            if self._rows:
                parts.append(self.table())
            if self._turn_started is not None and not self._finished:
                self._spinner.update(text=Text(self.progress(), style="dim"))
                parts.append(self._spinner)
            return Group(*parts)

    # -- state ---------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(1 for r in self._rows.values() if r.status in _RUNNING)

    @property
    def queued(self) -> int:
        return sum(1 for r in self._rows.values() if r.status == "queued")

    def progress(self) -> str:
        """E.g. "2 queued · 3 running · 5 done · 1 failed · 2.4 s"."""
        with self._lock:
            parts = [f"{self.running} running", f"{self.done} done", f"{self.failed} failed"]
            if self.queued:
                parts.insert(0, f"{self.queued} queued")
            for count, what in ((self.cancelled, "cancelled"), (self.refused, "refused"), (self.retried, "retried")):
                if count:
                    parts.append(f"{count} {what}")
            if not self.running and not self.queued:
                parts.insert(0, "waiting for the model")
            if self._turn_started is not None:
                parts.append(_duration(self._clock() - self._turn_started))
            return " · ".join(parts)

    def table(self) -> Table:
        """The current step's tool calls."""
        with self._lock:
            # Full width, the arguments column taking what the others leave, so only it gets cut.
            table = Table(box=None, pad_edge=False, header_style="bold dim", expand=True)
            for name in ("tool", "lane", "worker", "status", "attempt", "duration"):
                table.add_column(name, no_wrap=True)
            table.add_column("arguments", no_wrap=True, overflow="ellipsis", ratio=1)
            now = self._clock()
            for row in sorted(self._rows.values(), key=lambda r: r.index):
                if row.duration is not None:
                    duration = _duration(row.duration)
                elif row.started is not None and row.status == "running":
                    duration = _duration(now - row.started)
                else:
                    duration = ""
                attempt = str(row.attempt) + (" ↻" if row.retried else "")
                # Text, not str: a tool's name is the model's, not rich's markup (`[red]grep`).
                table.add_row(Text(row.tool), Text(row.lane), Text(row.worker),
                              Text(row.status, style=STATUS_STYLES.get(row.status, "")), attempt, duration,
                              Text(row.arguments, style="dim"))
            return table

    def _print(self, renderable: RenderableType) -> None:
        """Queues a renderable for `_flush`, which prints it once our lock is released."""
        self._outbox.append(renderable)

    def _flush(self) -> None:
        """Prints what was committed: above the live area while it runs, straight out otherwise."""
        with self._lock:
            out, self._outbox = self._outbox, []
        for renderable in out:
            self.console.print(renderable, highlight=False)

    # What is committed leaves the live state before it is printed: printing redraws the live
    # area, which must not show it a second time.

    def _commit_text(self, everything: bool) -> None:
        """Prints the model's finished lines (and, if everything, the unfinished one too)."""
        if everything:
            done, self._text = self._text, ""
        elif "\n" in self._text:
            done, self._text = self._text.rsplit("\n", 1)
        else:
            return
        if done:
            self._print(Text(done))

    def _enter_step(self, step: int) -> None:
        """A step's table stays live until the next step shows up (its text or its response):
        whether the response event comes before or after the step's calls, they are all done then."""
        if step != self._step:
            self._commit_step()
            self._step = step

    def _commit_step(self) -> None:
        self._commit_text(everything=True)
        if self._rows:
            table = self.table()
            self._rows.clear()
            self._print(table)

    def _row(self, call_id: str, tool: str) -> CallRow:
        row = self._rows.get(call_id)
        if row is None:
            row = self._rows[call_id] = CallRow(call_id, tool)
        return row

    def _known_call(self, call: ev.ToolCall) -> CallRow:
        """The row of a call the events just described in full (arguments, lane, place)."""
        self._calls[call.call_id] = call
        row = self._row(call.call_id, call.tool_name)
        row.arguments, row.index = _preview(call.arguments_json), call.index
        row.lane = row.lane or call.lane
        return row

    def _print_diff(self, call_id: str) -> None:
        call = self._calls.get(call_id)
        lines = call_diff(call) if call is not None else []
        if not lines:
            return
        text = Text(lines[0], style="bold")
        for line in lines[1:]:
            style = "green" if line.startswith("+") else "red" if line.startswith("-") else "dim"
            text.append("\n" + line, style=style)
        self._print(text)

    # -- events --------------------------------------------------------------------------------

    def show(self, event: ev.Event | ev.CaughtUp) -> None:
        """Takes one event into the view."""
        event = for_terminal(event)
        with self._lock:
            self._take(event)
        self._flush()
        if self._live is not None:
            self._live.refresh()

    def _take(self, event: ev.Event | ev.CaughtUp) -> None:
        if isinstance(event, ev.CaughtUp):
            self._print(Text(f"caught up at sequence {event.last_sequence}", style="dim"))
        elif isinstance(event, ev.TurnStarted):
            self._turn_started, self._finished, self._step = self._clock(), False, 0
            self.done = self.failed = self.cancelled = self.refused = self.retried = 0
            self._calls.clear()
            self._confirmed.clear()
            self._print(Text(f"> {event.user_text}", style="bold cyan"))
        elif isinstance(event, ev.TextDelta):
            self._enter_step(event.step)
            self._text += event.text
            self._commit_text(everything=False)
        elif isinstance(event, ev.ToolCallStarted) and event.call is not None:
            self._commit_text(everything=True)
            row = self._known_call(event.call)
            row.lane, row.worker, row.attempt = event.lane or event.call.lane, event.worker_id, event.attempt
            row.status, row.started, row.duration = "running", self._clock(), None
        elif isinstance(event, ev.CallRetried):
            row = self._rows.get(event.call_id)
            if row is not None:
                row.status, row.attempt, row.retried = "retried", event.attempt, True
            self.retried += 1
        elif isinstance(event, ev.ToolCallFinished):
            row = self._row(event.call_id, event.tool_name)
            result = event.result or ev.ToolResult("")
            row.status = finished_status(result, self._confirmed.get(event.call_id))
            row.duration = event.run_time
            row.worker = result.worker_id or row.worker
            row.attempt = max(row.attempt, result.attempt)
            if row.status == "ok":
                self.done += 1
                self._print_diff(event.call_id)
            elif row.status == "cancelled":
                self.cancelled += 1
            elif row.status in ("rejected", "denied"):
                self.refused += 1
            else:
                self.failed += 1
        elif isinstance(event, ev.ModelResponded):
            self._enter_step(event.step)
            self._commit_text(everything=True)  # the step's text is complete; its calls may still run
            for call in event.tool_calls:
                # Calls not started yet wait: behind an Execute call, or for a free slot.
                row = self._known_call(call)
                if row.status == "running" and row.started is None:
                    row.status = "queued"
        elif isinstance(event, ev.ConfirmationRequired) and event.call is not None:
            self._commit_text(everything=True)
            row = self._known_call(event.call)
            row.status = "confirm?"
        elif isinstance(event, ev.ConfirmationResolved):
            self._confirmed[event.call_id] = event.outcome
            row = self._rows.get(event.call_id)
            if row is not None and row.status == "confirm?":
                row.status = (
                    "approved" if event.outcome.endswith("approved")
                    else "cancelled" if event.outcome == "cancelled" else "rejected"
                )
            self._print(Text(f"confirmation of {event.call_id}: {event.outcome.replace('_', ' ')}"
                             + (f" ({event.reason})" if event.reason else ""), style="cyan"))
        elif isinstance(event, ev.WorkerLost):
            self._print(Text(f"worker {event.worker_id} lost: {event.reason}", style="magenta"))
        elif isinstance(event, ev.ErrorOccurred):
            self._print(Text(f"error {event.reason}: {event.message}", style="bold red"))
        elif isinstance(event, ev.ExternalTaskPending) and event.call is not None:
            self._print(Text(f"external task {event.task_id}: {event.call.tool_name} waits for a client",
                             style="cyan"))
        elif isinstance(event, ev.ExternalTaskCompleted):
            self._print(Text(f"external task {event.task_id} completed by {event.client_id or 'a client'}",
                             style="cyan"))
        elif isinstance(event, ev.TurnFinished):
            for row in self._rows.values():
                if row.status in _IN_PROGRESS:
                    row.status = "cancelled"
            self._commit_step()
            self._finished = True
            self._print(self.summary(event))

    def summary(self, event: ev.TurnFinished) -> Text:
        """The turn in one line: how it ended, what it did, what it cost, how long it took."""
        style = "bold green" if event.stop_reason == "end_turn" else "bold yellow"
        calls = f"{event.tool_calls} tool call(s)"
        extra = [f"{n} {what}" for n, what in ((self.failed, "failed"), (self.cancelled, "cancelled"),
                                                (self.refused, "refused"), (self.retried, "retried")) if n]
        if extra:
            calls += f" ({', '.join(extra)})"
        parts = [f"turn finished: {event.stop_reason}", f"{event.model_requests} model request(s)", calls,
                 f"tokens in {event.usage.input_tokens} out {event.usage.output_tokens}"]
        if self._turn_started is not None:
            parts.append(_duration(self._clock() - self._turn_started))
        return Text(" · ".join(parts), style=style)


class _Paused:
    def __init__(self, renderer: LiveRenderer) -> None:
        self._renderer = renderer
        self._was_live = False

    def __enter__(self) -> None:
        self._was_live = self._renderer._live is not None
        self._renderer._erase()  # it comes back below whatever is written meanwhile

    def __exit__(self, *exc_info: object) -> None:
        if self._was_live:
            self._renderer.__enter__()
