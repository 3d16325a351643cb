"""What `codelane run` and `codelane chat` share: the options of a new session, opening one (or
continuing one), and running a turn at a terminal.

A turn is shown as its events come (see `EventView`). A call that waits for a confirmation is
asked about here when stdin is a terminal; otherwise the exact `codelane confirm` command that
answers it from another terminal is printed. Ctrl-C cancels the turn and the turn's last events
are still shown, so the view ends true (cancelled calls as cancelled); a second Ctrl-C stops
waiting for them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codelane import events as ev
from codelane.client import Client, CodelaneError, Session
from codelane.commands import args as types
from codelane.commands.common import StreamLost, command_line, workspace_path
from codelane.commands.config import Connection
from codelane.render import EventView

CANCEL_TIMEOUT = 5.0  # bound on the CancelTurn call after Ctrl-C
CANCEL_WAIT = 15.0  # after Ctrl-C, how long the cancelled turn's last events are awaited
ACTIONS = ("allow", "deny", "ask")

# Options that only set up a new session, with their "not given" values.
_NEW_SESSION_OPTIONS = {
    "model": "", "system_prompt": "", "max_turns": 0, "max_output_tokens": 0, "query_concurrency": 0,
    "labels": [], "lanes": [], "external_task_timeout": None, "ask": [], "deny": [], "allow": [],
    "default_action": None, "confirmation_timeout": None, "timeout_action": None, "sandbox": None, "network": None,
    "env": [],
}  # fmt: skip


def add_session_options(parser: argparse.ArgumentParser) -> None:
    """Where the conversation happens (--workspace, --session, --continue) and the settings of a
    new session (the SDK's create_session options)."""
    which = parser.add_argument_group("session")
    which.add_argument("--workspace", type=Path, default=None, metavar="DIR",
                       help="workspace directory on the server's machine (default: the current directory)")
    one = which.add_mutually_exclusive_group()
    one.add_argument("--session", metavar="ID", help="continue this session instead of creating one")
    one.add_argument("--continue", dest="continue_last", action="store_true",
                     help="continue the newest session of the workspace")
    new = parser.add_argument_group("a new session's settings (default: the server's)")
    new.add_argument("--model", default="", help="provider:name, e.g. openai:gpt-4o-mini or scripted:FILE")
    new.add_argument("--system-prompt", default="", metavar="TEXT", help="the system prompt")
    new.add_argument("--max-turns", type=types.non_negative_int, default=0, metavar="N",
                     help="model requests allowed per turn (0: the server's default)")
    new.add_argument("--max-output-tokens", type=types.non_negative_int, default=0, metavar="N",
                     help="most tokens per model response (0: 8192); lower it for a model whose limit is smaller")
    new.add_argument("--query-concurrency", type=types.non_negative_int, default=0, metavar="N",
                     help="Query calls of this session run at once (0: the server's default)")
    new.add_argument("--label", dest="labels", type=types.label, action="append", default=[], metavar="KEY=VALUE",
                     help="a label of the session (repeatable)")
    new.add_argument("--lane", dest="lanes", type=types.lane_mode, action="append", default=[], metavar="LANE=MODE",
                     help="run a lane's calls internal, external (a client runs them) or hybrid, e.g. "
                          "execute=external (repeatable)")
    new.add_argument("--external-task-timeout", type=types.positive_float, metavar="SECONDS",
                     help="how long an external task may take overall (default: the server's, 600)")
    rules = parser.add_argument_group("permissions of a new session (rules like `bash`, `bash(git *)`, "
                                      "`write(src/**)`; repeatable)")
    rules.add_argument("--ask", action="append", default=[], metavar="RULE",
                       help="calls that wait for a confirmation (asked here when stdin is a terminal)")
    rules.add_argument("--deny", action="append", default=[], metavar="RULE", help="calls that are refused")
    rules.add_argument("--allow", action="append", default=[], metavar="RULE", help="calls that just run")
    rules.add_argument("--default-action", choices=ACTIONS, help="for calls no rule matches (default: allow)")
    rules.add_argument("--confirmation-timeout", type=types.positive_float, metavar="SECONDS",
                       help="how long a confirmation waits (default: the server's, 60)")
    rules.add_argument("--timeout-action", choices=("allow", "deny"),
                       help="what an unanswered confirmation becomes (default: deny)")
    box = parser.add_argument_group("sandbox of a new session's bash and execute calls (default: the server's)")
    box.add_argument("--sandbox", choices=("workspace-write", "read-only", "off"),
                     help="what commands may change; off needs a server started with --allow-unsandboxed")
    box.add_argument("--network", choices=("off", "on"),
                     help="network for confined commands; on needs a server started with --sandbox-allow-network")
    box.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", type=types.variable,
                     help="an environment variable of the session's commands (repeatable)")


def check_session_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error when settings of a new session come with --session or --continue, or a
    workspace with --session (whose workspace is its own: the flag was silently ignored)."""
    if not (args.session or args.continue_last):
        return
    if args.session and args.workspace is not None:
        parser.error("--workspace picks where a new session (or --continue) works; --session continues one "
                     "whose workspace is fixed")
    given = [name for name, unset in _NEW_SESSION_OPTIONS.items() if getattr(args, name) != unset]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        which = "--session" if args.session else "--continue"
        parser.error(f"{flags} set up a new session; {which} continues one whose settings are fixed")


def new_session_options(args: argparse.Namespace) -> dict[str, Any]:
    """create_session's keyword arguments from the options."""
    permissions: dict[str, Any] = {key: getattr(args, key) for key in ACTIONS if getattr(args, key)}
    if args.default_action:
        permissions["default"] = args.default_action
    if args.confirmation_timeout is not None:
        permissions["confirmation_timeout"] = args.confirmation_timeout
    if args.timeout_action:
        permissions["timeout_action"] = args.timeout_action
    options: dict[str, Any] = {
        "model": args.model, "system_prompt": args.system_prompt, "max_turns": args.max_turns,
        "max_output_tokens": args.max_output_tokens, "query_concurrency": args.query_concurrency,
        "labels": dict(args.labels), "lanes": dict(args.lanes),
        "external_task_timeout": args.external_task_timeout,
    }  # fmt: skip
    if permissions:
        options["permissions"] = permissions
    sandbox = {key: getattr(args, attr) for key, attr in (("mode", "sandbox"), ("network", "network"))
               if getattr(args, attr)}
    if sandbox:
        options["sandbox"] = sandbox
    if args.env:
        options["env"] = dict(args.env)
    return options


async def open_session(client: Client, args: argparse.Namespace) -> Session:
    """The session to talk in: the one named by --session, the newest of the workspace with
    --continue, else a new one. CodelaneError NOT_FOUND when there is none to continue."""
    if args.session:
        return await client.get_session(args.session)
    workspace = workspace_path(args.workspace)
    if args.continue_last:
        async for info in client.list_sessions():
            if info.workspace == str(workspace):
                return await client.get_session(info.session_id)
        raise CodelaneError("NOT_FOUND", f"no session of {workspace} on {client.address} to continue: "
                                         "start one without --continue")
    return await client.create_session(workspace, **new_session_options(args))


@dataclass
class TurnOutcome:
    stop_reason: str = ""  # "" when the turn's end was not seen
    error: str = ""  # the last ErrorOccurred of the turn, "REASON: message"
    interrupted: bool = False  # Ctrl-C was pressed during it, or SIGTERM came
    terminated: bool = False  # SIGTERM came during it: the command ends once the turn is cancelled
    cancel_error: str = ""  # why the cancel after Ctrl-C did not go through, if it did not


class TurnConsole:
    """Runs a session's turns at this terminal, one at a time."""

    def __init__(self, session: Session, view: EventView, connection: Connection, prog: str) -> None:
        self.session = session
        self.view = view
        self.connection = connection
        self.prog = prog
        self.ask_here = sys.stdin.isatty()
        self._held: deque[ev.Event] = deque()  # events that came while a question was on screen
        self._question: asyncio.Task[None] | None = None
        self._question_call = ""

    async def send(self, text: str) -> TurnOutcome:
        """Runs one turn and shows it; returns how it ended. Ctrl-C cancels the turn."""
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        assert me is not None
        outcome = TurnOutcome()
        cancelling: list[asyncio.Task[None]] = []
        showing = True  # the turn's events are still being shown: stopping them is still useful

        def stop_showing() -> None:
            if showing:
                me.cancel()

        async def cancel_turn() -> None:
            """After Ctrl-C: cancels the turn, then gives its last events CANCEL_WAIT seconds."""
            why = "SIGTERM" if outcome.terminated else "Ctrl-C"
            try:
                await asyncio.wait_for(self.session.cancel(f"interrupted ({why}) in {self.prog}"), CANCEL_TIMEOUT)
            except (CodelaneError, TimeoutError) as exc:
                if showing:  # (else the turn ended meanwhile, and this call was cancelled with it)
                    outcome.cancel_error = str(exc) or f"no answer within {CANCEL_TIMEOUT:g}s"
                    stop_showing()
                return
            await asyncio.sleep(CANCEL_WAIT)
            stop_showing()

        def interrupt() -> None:
            if outcome.interrupted:  # a second Ctrl-C: stop waiting for the turn's end
                stop_showing()
                return
            outcome.interrupted = True
            cancelling.append(loop.create_task(cancel_turn()))

        def terminate() -> None:
            # As Ctrl-C (`timeout 60 codelane run ...`): killed outright, the command left its turn
            # running, a call waiting for a confirmation keeping the session busy.
            outcome.terminated = True
            interrupt()

        loop.add_signal_handler(signal.SIGINT, interrupt)
        loop.add_signal_handler(signal.SIGTERM, terminate)
        last = 0  # the last event shown
        try:
            with self.view.running():
                async for event in self.session.send(text):
                    last = event.sequence
                    await self._take(event)
                    if isinstance(event, ev.TurnFinished):
                        outcome.stop_reason = event.stop_reason
                    elif isinstance(event, ev.ErrorOccurred):
                        outcome.error = f"{event.reason}: {event.message}"
        except CodelaneError as exc:
            # Lost mid-turn (past the SDK's resumes): the turn goes on without us, say where to pick it up.
            lost = StreamLost.of(exc, self.session.id, last, delivered=last > 0, turn=True)
            if lost is None:
                raise
            raise lost from exc
        except asyncio.CancelledError:
            if not outcome.interrupted:
                raise
            me.uncancel()  # we stopped waiting on purpose: the caller goes on
        finally:
            showing = False
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
            await self._close_question()
            for task in cancelling:
                task.cancel()
            await asyncio.gather(*cancelling, return_exceptions=True)
        if outcome.interrupted:
            if outcome.cancel_error:
                sys.stderr.write(f"{self.prog}: interrupted, but the turn could not be cancelled: "
                                 f"{outcome.cancel_error}\n")
            elif outcome.stop_reason:
                sys.stderr.write(f"{self.prog}: interrupted; the turn was cancelled\n")
            else:
                watch = command_line("codelane watch", self.session.id, connection=self.connection)
                sys.stderr.write(f"{self.prog}: interrupted; the turn was cancelled, its end was not awaited "
                                 f"(see it with `{watch}`)\n")
        return outcome

    # -- events and confirmations --------------------------------------------------------------

    async def _take(self, event: ev.Event) -> None:
        if self._question is not None:
            ends_it = isinstance(event, ev.TurnFinished) or (
                isinstance(event, ev.ConfirmationResolved) and event.call_id == self._question_call)
            if not ends_it:
                self._held.append(event)  # shown once the question is off the screen
                return
            await self._close_question()
        pending = [*self._held, event]
        self._held.clear()
        for i, item in enumerate(pending):
            self.view.show(item)
            if isinstance(item, ev.ConfirmationRequired) and item.call is not None:
                later = pending[i + 1:]
                if any(isinstance(e, ev.ConfirmationResolved) and e.call_id == item.call.call_id for e in later):
                    continue  # answered while another question was on screen
                if self.ask_here:
                    self._question_call = item.call.call_id
                    self._question = asyncio.create_task(self._ask(item))
                    self._held.extend(later)
                    return
                self._tell_how_to_answer(item)

    async def _close_question(self) -> None:
        """Ends the question on screen: its answer was sent, or someone else answered first."""
        question, self._question = self._question, None
        if question is None:
            return
        if not question.done():
            question.cancel()
        await asyncio.gather(question, return_exceptions=True)

    async def _ask(self, event: ev.ConfirmationRequired) -> None:
        """Asks the person at the terminal whether the call may run, and tells the server."""
        call = event.call
        assert call is not None
        why = f" ({event.rule})" if event.rule else ""
        within = f", answer by {time.strftime('%H:%M:%S', time.localtime(event.deadline))}" if event.deadline else ""
        answered = False
        with self.view.paused():
            sys.stderr.write(f"{self.prog}: allow {call.tool_name} {call.arguments_json}?{why}{within} [y/N] ")
            sys.stderr.flush()
            try:
                answer = await _read_line()
                answered = True
            finally:
                if not answered:  # the question was closed: the server decided, or someone else did
                    sys.stderr.write("\n")
                    sys.stderr.flush()
        approve = answer.strip().lower() in ("y", "yes")
        try:
            await self.session.confirm(call.call_id, approve)
        except CodelaneError as exc:
            sys.stderr.write(f"{self.prog}: could not answer for {call.call_id}: {' '.join(str(exc).split())}\n")

    def _tell_how_to_answer(self, event: ev.ConfirmationRequired) -> None:
        call = event.call
        assert call is not None
        until = time.strftime("%H:%M:%S", time.localtime(event.deadline)) if event.deadline else "its deadline"
        why = f" ({event.rule})" if event.rule else ""
        approve = command_line("codelane confirm", self.session.id, call.call_id, "--approve",
                               connection=self.connection)
        with self.view.paused():
            sys.stderr.write(f"{self.prog}: {call.tool_name} {' '.join(call.arguments_json.split())} waits for a "
                             f"confirmation{why} until {until}; nobody can answer at this terminal. Answer it "
                             f"with: {approve}  (or --reject)\n")
            sys.stderr.flush()


async def _read_line() -> str:
    """A line from stdin without blocking the loop; "" at the end of input."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()
    fd = sys.stdin.fileno()

    def readable() -> None:
        if not line.done():
            line.set_result(sys.stdin.readline())

    loop.add_reader(fd, readable)
    try:
        return await line
    finally:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(fd)
