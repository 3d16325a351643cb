"""Log lines that say which session, turn, call, worker and trace they belong to.

The ids live in context variables, set where a turn or a call runs (each runs in its own asyncio
task, which copies its context from the task that created it): every log line written inside
that task, and inside the tasks it starts, carries them. `--log-format json` writes one JSON
object per line with `time`, `level`, `logger`, `message` and whichever ids apply; the text
format stays the short human one.
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
import time
from collections.abc import Hashable
from contextvars import ContextVar
from types import TracebackType

from pythonjsonlogger.json import JsonFormatter

from codelane.terminal import escape_controls

session_id: ContextVar[str] = ContextVar("codelane_session_id", default="")
turn_id: ContextVar[str] = ContextVar("codelane_turn_id", default="")
call_id: ContextVar[str] = ContextVar("codelane_call_id", default="")
worker_id: ContextVar[str] = ContextVar("codelane_worker_id", default="")
trace_id: ContextVar[str] = ContextVar("codelane_trace_id", default="")

# The record attribute each variable becomes (only when set: a line has the ids that apply).
_FIELDS = (
    ("session_id", session_id),
    ("turn_id", turn_id),
    ("call_id", call_id),
    ("worker_id", worker_id),
    ("trace_id", trace_id),
)

LOG_FORMATS = ("text", "json")

# The format configure_logging set up, for the lines a command exits with (say()).
_format = "text"


def ids(*, session_id: str = "", turn_id: str = "", worker_id: str = "") -> dict[str, str]:
    """The ids of a line about a session, turn or worker written outside its task, where the
    context variables do not hold them: `log.info(..., extra=ids(session_id=...))`. A JSON line
    that named its session only in its message was missed by a search on `session_id`."""
    values = (("session_id", session_id), ("turn_id", turn_id), ("worker_id", worker_id))
    return {name: value for name, value in values if value}


class ContextFilter(logging.Filter):
    """Copies the ids that are set onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _FIELDS:
            value = var.get()
            if value:
                setattr(record, name, value)
        return True


class OneLineFormatter(logging.Formatter):
    """The text format, one line per message: control characters in the message are escaped
    (\\n, \\x1b...). A message quotes what others chose (a file name in a workspace, a tool
    name a model made up), and a line break in one wrote log lines that looked like the server's
    own. A traceback, added after the message, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = escape_controls(record.message, keep_line_breaks=False)
        if message is not record.message:
            record = copy.copy(record)
            record.message = message
        return super().formatMessage(record)


def json_formatter() -> logging.Formatter:
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, then the ids."""
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
        json_ensure_ascii=False,
    )


def configure_logging(level: str, log_format: str, text_format: str) -> None:
    """Sets up the root logger on stderr. Raises ValueError for an unknown level or format."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(json_formatter() if log_format == "json" else OneLineFormatter(text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    global _format
    _format = log_format
    if log_format == "json":
        # Everything else the process writes on stderr goes through the handler too, or a log
        # pipeline that reads one JSON object per line meets a traceback of a failed start (a
        # --tools module that raises) or a Python warning as lines of plain text.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        # Threads of its own (the store's checkpoints and readers, the semantic index's builder).
        threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, traceback)
        return
    logging.getLogger("codelane").critical("uncaught %s: %s", kind.__name__, error, exc_info=(kind, error, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "a thread"
    logging.getLogger("codelane").critical("uncaught %s in %s: %s", args.exc_type.__name__, name, args.exc_value,
                                           exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def say(prog: str, message: str, level: int = logging.ERROR) -> None:
    """The line a command exits with (or warns of, before it runs): `PROG: message` on stderr in
    the text format, as every command says it; one JSON object in the json format (level ERROR,
    logger `codelane`, and the `prog`), where a plain line broke a pipeline that reads objects."""
    if _format == "json":
        logging.getLogger("codelane").log(level, "%s", message, extra={"prog": prog})
    else:
        print(f"{prog}: {message}", file=sys.stderr, flush=True)


class Repeats:
    """What was logged lately, so that a condition that stands (a hub unreachable, a worker
    refused for good and retrying for ever) is logged once in `interval` seconds, not at every
    attempt. It remembers the last `capacity` things said; one forgotten is news again."""

    def __init__(self, interval: float, capacity: int = 1) -> None:
        self._interval = interval
        self._capacity = capacity
        self._said: dict[Hashable, float] = {}  # oldest first

    def lately(self, key: Hashable) -> bool:
        """Whether `key` was said less than `interval` seconds ago; if not, it counts as said now."""
        now = time.monotonic()
        said_at = self._said.get(key)
        if said_at is not None and now - said_at < self._interval:
            return True
        self._said.pop(key, None)
        self._said[key] = now
        while len(self._said) > self._capacity:
            del self._said[next(iter(self._said))]
        return False

    def forget(self) -> None:
        """Everything is news again (the condition ended: a worker connected, say)."""
        self._said.clear()
