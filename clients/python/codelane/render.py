"""Turning events into lines for a terminal, or into JSON objects for scripts."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TextIO

from codelane import events as ev

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

    def _line(self, text: str) -> None:
        if self._in_text:
            self._out.write("\n")
            self._in_text = False
        self._out.write(text + "\n")
        self._out.flush()

    def show(self, event: ev.Event | ev.CaughtUp) -> None:
        if isinstance(event, ev.TextDelta):
            if not self._in_text:
                self._out.write(f"[{event.sequence:>4}] model: ")
                self._in_text = True
            self._out.write(event.text)
            self._out.flush()
            return
        self._line(self.describe(event))

    @staticmethod
    def describe(event: ev.Event | ev.CaughtUp) -> str:
        if isinstance(event, ev.CaughtUp):
            return f"[----] caught up at sequence {event.last_sequence}"
        head = f"[{event.sequence:>4}]"
        if isinstance(event, ev.TurnStarted):
            return f"{head} turn started: {event.user_text!r}"
        if isinstance(event, ev.ToolCallStarted) and event.call is not None:
            attempt = f" attempt {event.attempt}" if event.attempt > 1 else ""
            return (f"{head} -> {event.call.tool_name:<10} {event.lane:<7} on {event.worker_id}{attempt}  "
                    f"{event.call.arguments_json}")
        if isinstance(event, ev.ToolCallFinished) and event.result is not None:
            mark = "x" if event.result.is_error else "ok"
            return (f"{head} <- {event.tool_name:<10} {mark:<2} {event.run_time * 1000:7.1f} ms "
                    f"(waited {event.queue_wait * 1000:.1f} ms) on {event.result.worker_id}: "
                    f"{_preview(event.result.output)}")
        if isinstance(event, ev.ModelResponded):
            return f"{head} model asked for {len(event.tool_calls)} tool call(s) (step {event.step})"
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
