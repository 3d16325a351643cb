"""Turning events into lines for a terminal, or into JSON objects for scripts."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from typing import Any, TextIO

from codelane import events as ev
from codelane.diffs import call_diff
from codelane.live import finished_status
from codelane.terminal import escape_controls, for_terminal

OUTPUT_PREVIEW_CHARS = 80


def event_json(event: ev.Event | ev.CaughtUp) -> str:
    data: dict[str, Any] = {"kind": event.kind, **dataclasses.asdict(event)}
    return json.dumps(data, ensure_ascii=False)


def _preview(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= OUTPUT_PREVIEW_CHARS else first[: OUTPUT_PREVIEW_CHARS - 1] + "…"


class PlainRenderer:
    """One line per event (model text streams inline), readable in a log or a terminal."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._in_text = False
        self._calls: dict[str, ev.ToolCall] = {}  # for the diffs of edits and writes

    def _line(self, text: str) -> None:
        if self._in_text:
            self._out.write("\n")
            self._in_text = False
        self._out.write(text + "\n")
        self._out.flush()

    def show(self, event: ev.Event | ev.CaughtUp) -> None:
        event = for_terminal(event)
        if isinstance(event, ev.TextDelta):
            if not self._in_text:
                self._out.write(f"[{event.sequence:>4}] model: ")
                self._in_text = True
            self._out.write(event.text)
            self._out.flush()
            return
        self._line(self.describe(event))
        if isinstance(event, (ev.ToolCallStarted, ev.ConfirmationRequired)) and event.call is not None:
            self._calls[event.call.call_id] = event.call
        elif isinstance(event, ev.ToolCallFinished) and event.result is not None and not event.result.is_error:
            call = self._calls.pop(event.call_id, None)
            for line in call_diff(call) if call is not None else []:
                self._line("       " + line)
        elif isinstance(event, ev.TurnFinished):
            self._calls.clear()

    @staticmethod
    def describe(event: ev.Event | ev.CaughtUp) -> str:
        if isinstance(event, ev.CaughtUp):
            return f"[----] caught up at sequence {event.last_sequence}"
        head = f"[{event.sequence:>4}]"
        if isinstance(event, ev.TurnStarted):
            # Made safe already (`show`): quoted on one line, not repr(), which showed each escape
            # the safety had written with its backslash doubled (`\\x1b`).
            return f"{head} turn started: '{escape_controls(event.user_text, keep_line_breaks=False)}'"
        if isinstance(event, ev.ToolCallStarted) and event.call is not None:
            attempt = f" attempt {event.attempt}" if event.attempt > 1 else ""
            return (f"{head} -> {event.call.tool_name:<10} {event.lane:<7} on {event.worker_id}{attempt}  "
                    f"{event.call.arguments_json}")
        if isinstance(event, ev.ToolCallFinished) and event.result is not None:
            # The live view's words: ok, error, timed out, cancelled, denied.
            status = finished_status(event.result, None)
            where = f" on {event.result.worker_id}" if event.result.worker_id else ""  # refused: ran nowhere
            return (f"{head} <- {event.tool_name:<10} {status:<9} {event.run_time * 1000:7.1f} ms "
                    f"(waited {event.queue_wait * 1000:.1f} ms){where}: {_preview(event.result.output)}")
        if isinstance(event, ev.ModelResponded):
            return f"{head} model asked for {len(event.tool_calls)} tool call(s) (step {event.step})"
        if isinstance(event, ev.ConfirmationRequired) and event.call is not None:
            until = time.strftime("%H:%M:%S", time.localtime(event.deadline)) if event.deadline else "-"
            why = f", {event.rule}" if event.rule else ""
            return (f"{head} confirmation required: {event.call.tool_name} {event.call.arguments_json} "
                    f"[{event.call.call_id}{why}] until {until}")
        if isinstance(event, ev.ConfirmationResolved):
            reason = f": {event.reason}" if event.reason else ""
            return f"{head} confirmation of {event.call_id}: {event.outcome.replace('_', ' ')}{reason}"
        if isinstance(event, ev.CallRetried):
            return f"{head} retry {event.call_id} attempt {event.attempt}: {event.reason}"
        if isinstance(event, ev.WorkerLost):
            return f"{head} worker {event.worker_id} lost: {event.reason}"
        if isinstance(event, ev.ErrorOccurred):
            return f"{head} error {event.reason}: {event.message}"
        if isinstance(event, ev.TurnFinished):
            return (f"{head} turn finished: {event.stop_reason}, {event.model_requests} model request(s), "
                    f"{event.tool_calls} tool call(s), tokens in {event.usage.input_tokens} "
                    f"out {event.usage.output_tokens}")
        return f"{head} {event.kind}"


class EventView:
    """Where a command's events go: "json" lines, "plain" lines, or the "live" view (rich).
    `choose()` picks from the usual --json/--plain/--live flags: live on a terminal by default."""

    def __init__(self, mode: str, out: TextIO | None = None) -> None:
        if mode not in ("json", "plain", "live"):
            raise ValueError(f"unknown view {mode!r}: json, plain or live")
        self.mode = mode
        self._out = out or sys.stdout
        self.plain = PlainRenderer(self._out)
        self.live = None
        if mode == "live":
            from rich.console import Console

            from codelane.live import LiveRenderer

            self.live = LiveRenderer(Console(file=self._out))

    @classmethod
    def choose(cls, *, json: bool = False, plain: bool = False, live: bool = False) -> EventView:
        if json:
            return cls("json")
        if live or (not plain and sys.stdout.isatty()):
            return cls("live")
        return cls("plain")

    def note(self, text: str) -> None:
        """A line about the run (not an event); JSON output carries events only."""
        if self.mode == "json":
            return
        if self.live is not None:
            self.live.console.print(text, style="dim", highlight=False, markup=False)
        else:
            self._out.write(text + "\n")
            self._out.flush()

    def show(self, event: ev.Event | ev.CaughtUp) -> None:
        if self.mode == "json":
            self._out.write(event_json(event) + "\n")
            self._out.flush()
        elif self.live is not None:
            self.live.show(event)
        else:
            self.plain.show(event)

    def running(self) -> contextlib.AbstractContextManager[Any]:
        """The context in which events are shown (the live area runs in it)."""
        return self.live if self.live is not None else contextlib.nullcontext()

    def paused(self) -> contextlib.AbstractContextManager[Any]:
        """A context without the live area, e.g. to ask a question on the terminal."""
        return self.live.pause() if self.live is not None else contextlib.nullcontext()
