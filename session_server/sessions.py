"""Sessions: their lifecycle, their turns, and their event streams. Domain logic, no grpc.

Every event goes through the event log (`eventlog.EventLog`): stored first, then published to
live subscribers, so whatever a client saw can be replayed, and whatever it missed is stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from session_server.admission import Admission
from session_server.agent import Turn, TurnContext, directory_identity
from session_server.bus import SUBSCRIBER_BUFFER, SUBSCRIBER_BUFFER_BYTES, EventBus, SessionClosed, Subscription
from session_server.config import (
    InvalidArgument,
    SessionSettings,
    SettingsRequest,
    build_sandbox_policy,
    build_settings,
    refuse_server_paths,
    resolve_workspace,
)
from session_server.confirmations import Confirmations
from session_server.eventlog import EventLog
from session_server.events import (
    ConfirmationRequired,
    ConfirmationResolved,
    EventPayload,
    ExternalTaskCompleted,
    ExternalTaskInfo,
    ExternalTaskPending,
    ModelResponded,
    StoredEvent,
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
    TurnFinished,
    TurnStarted,
)
from session_server.external import (
    DEFAULT_LEASE,
    MAX_CLAIM_TASKS,
    MAX_CLAIM_WAIT,
    MAX_LEASE,
    MIN_LEASE,
    WITHDRAWN_AT_STOP,
    ExternalTasks,
)
from session_server.history import Histories, History
from session_server.limits import (
    MAX_CLIENT_ID_CHARS,
    MAX_CONFIRMATION_REASON_CHARS,
    MAX_RESPONSE_TEXT_CHARS,
    bound_event,
    check_prompt,
    cut,
)
from session_server.llm.base import ModelProvider, Usage
from session_server.models import Models
from session_server.pool import WorkerPool
from session_server.snapshots import SnapshotRegistry, WorkspaceSnapshots
from session_server.stats import LaneStats
from session_server.store import (
    MAX_READ_PAGE_CHARS,
    EventPage,
    SessionRecord,
    Store,
    StoredMessage,
    store_unavailable,
)
from session_server.telemetry import Telemetry
from session_server.workspace_locks import WorkspaceLocks
from tool_worker.confinement.policy import SandboxPolicy
from tool_worker.registry import ToolRegistry
from tool_worker.telemetry import logs as log_context
from tool_worker.tools.base import ErrorKind, ToolResult

log = logging.getLogger("codelane.sessions")
# What the log keeps of a CancelTurn's reason (the request may carry a megabyte of it).
MAX_CANCEL_REASON_LOGGED = 1024

# Concurrent LLM requests across all sessions (the Generate lane).
DEFAULT_GENERATE_LIMIT = 16
MAX_PAGE_SIZE = 1000
# What one session keeps of its creation request, each bounded so that a page of sessions (and
# the session itself, echoed back) always fits in a gRPC message.
MAX_CONFIG_CHARS = 1024 * 1024
MAX_LABELS_CHARS = 64 * 1024
DEFAULT_MESSAGES_PAGE = 200


class SessionNotFound(LookupError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session {session_id!r}: it never existed or was deleted")
        self.session_id = session_id


class TurnInProgress(Exception):
    """The session already runs a turn."""


class ModelUnavailable(Exception):
    """The session's model cannot be used now (e.g. its script file is gone)."""

    def __init__(self, model: str, why: str) -> None:
        super().__init__(f"model {model!r} is unavailable: {why}")
        self.model = model


class SequenceOutOfRange(Exception):
    def __init__(self, after: int, last: int) -> None:
        super().__init__(f"after_sequence {after} is beyond the session's last event ({last})")
        self.after = after
        self.last = last


@dataclass(frozen=True)
class CaughtUp:
    """Marks the end of a replay: everything up to last_sequence has been sent."""

    last_sequence: int


class SessionManager:
    def __init__(
        self,
        store: Store,
        pool: WorkerPool,
        registry: ToolRegistry,
        stats: LaneStats,
        *,
        default_model: str = "",
        local_fallback: bool = True,
        local_query_tools: frozenset[str] = frozenset(),
        local_cheap_calls: bool = False,
        generate_limit: int = DEFAULT_GENERATE_LIMIT,
        subscriber_buffer: int = SUBSCRIBER_BUFFER,
        subscriber_buffer_bytes: int = SUBSCRIBER_BUFFER_BYTES,
        scripts_dirs: Sequence[Path] = (),
        workspace_roots: Sequence[Path] = (),
        data_dir: Path | None = None,
        telemetry: Telemetry | None = None,
        admission: Admission | None = None,
        on_store_state: Callable[[bool, str], None] | None = None,
        snapshots: SnapshotRegistry | None = None,
    ) -> None:
        self.store = store
        self.snapshots = snapshots
        self.pool = pool
        self.registry = registry
        self.stats = stats
        self.default_model = default_model
        self.local_fallback = local_fallback
        self.local_query_tools = local_query_tools
        self.local_cheap_calls = local_cheap_calls
        self.telemetry = telemetry
        self.admission = admission
        metrics = self._metrics = telemetry.metrics if telemetry is not None else None
        self.bus = EventBus(self._catch_up_page, subscriber_buffer, subscriber_buffer_bytes, metrics=metrics)
        self.events = EventLog(store, self.bus, metrics=metrics, on_store_state=on_store_state)
        self.histories = Histories(store)
        self._generate = asyncio.Semaphore(generate_limit)
        self.models = Models(default_model, self._generate, scripts_dirs, telemetry, stats)
        # Resolved once: workspaces are compared with their symlinks resolved.
        self.workspace_roots = tuple(Path(os.path.realpath(root)) for root in workspace_roots)
        self.data_dir = Path(os.path.realpath(data_dir)) if data_dir is not None else None
        self._turns: dict[str, tuple[Turn, asyncio.Task[None]]] = {}
        # Sessions whose DeleteSession waits for their turn to end: gone for every new request.
        self._deleting: set[str] = set()
        self.confirmations = Confirmations()
        self.workspace_locks = WorkspaceLocks()
        self.external = ExternalTasks(metrics=metrics)

    # -- lifecycle -----------------------------------------------------------------------------

    async def recover(self) -> int:
        """Ends the turns a crash cut off, as interrupted. Returns how many there were.

        The log is left as a turn that ran to its end would leave it (docs/protocol.md, "Within a
        turn"): every call the turn announced (in ModelResponded) or started gets its one
        ToolCallFinished, whether it ran, waited behind another call, or never started; before
        it, a ConfirmationRequired still unanswered gets its ConfirmationResolved and an
        ExternalTaskPending its ExternalTaskCompleted, or a client replaying the log would go on
        asking for the confirmation, or running the task. The commit that stores the TurnFinished
        marks the session idle; should it fail (a full disk), the session stays running until the
        event log's retry stores it, or for the next start to finish. A turn whose TurnFinished
        is stored already (a store written before that commit marked it idle: the crash came
        between the two) is only marked idle: a second TurnFinished would end it twice.
        """
        interrupted = self.store.interrupted_turns()
        for session_id, turn_id in interrupted:
            await self._end_interrupted(session_id, turn_id)
            self.events.flush()
        return len(interrupted)

    async def _end_interrupted(self, session_id: str, turn_id: str) -> None:
        unfinished: dict[str, str] = {}
        texts: dict[int, list[str]] = {}
        responded: dict[int, ModelResponded] = {}
        results: dict[str, ToolResult] = {}
        confirming: dict[str, str] = {}
        tasks: dict[str, ExternalTaskInfo] = {}
        started = False
        for event in self._turn_events_stored(session_id, turn_id):
            payload = event.payload
            if isinstance(payload, TurnStarted):
                started = True
            elif isinstance(payload, TurnFinished):
                self.store.set_session_state(session_id, "idle", turn_id)
                return
            elif isinstance(payload, TextDelta):
                texts.setdefault(payload.step, []).append(payload.text)
            elif isinstance(payload, ModelResponded):
                responded[payload.step] = payload
                for call in payload.tool_calls:
                    # An early Query call often finished before its response was complete: it
                    # has its one ToolCallFinished, and its result goes to the history as it was.
                    if call.call_id not in results:
                        unfinished.setdefault(call.call_id, call.tool_name)
            elif isinstance(payload, ToolCallStarted):
                unfinished.setdefault(payload.call.call_id, payload.call.tool_name)
            elif isinstance(payload, ToolCallFinished):
                unfinished.pop(payload.call_id, None)
                results[payload.call_id] = payload.result
            elif isinstance(payload, ConfirmationRequired):
                confirming[payload.call.call_id] = payload.call.tool_name
                # An early Query call asks before its response's ModelResponded is stored: a crash
                # then leaves it named nowhere else, and it too gets its ToolCallFinished.
                unfinished.setdefault(payload.call.call_id, payload.call.tool_name)
            elif isinstance(payload, ConfirmationResolved):
                confirming.pop(payload.call_id, None)
            elif isinstance(payload, ExternalTaskPending):
                tasks[payload.task.task_id] = payload.task  # a re-offer: the later attempt
                unfinished.setdefault(payload.task.call.call_id, payload.task.call.tool_name)
            elif isinstance(payload, ExternalTaskCompleted):
                tasks.pop(payload.task_id, None)
        if not started:
            # The crash came after the turn was marked running but before its first event was
            # stored: its TurnStarted (with the user's text, if the history holds it) comes first.
            text = next((m.text for m in self.store.get_messages(session_id)
                         if m.turn_id == turn_id and m.role == "user"), "")
            self._emit(session_id, turn_id, TurnStarted(text))
        for call_id in confirming:
            self._emit(session_id, turn_id, ConfirmationResolved(
                call_id, "cancelled", "the session server stopped before anyone answered; the call did not run"))
        for task in tasks.values():
            result = ToolResult.error(ErrorKind.CANCELLED, f"{task.call.tool_name} {WITHDRAWN_AT_STOP}")
            self._emit(session_id, turn_id, ExternalTaskCompleted(
                task.task_id, task.call.call_id, dataclasses.replace(result, attempt=task.attempt), ""))
        for call_id, tool_name in unfinished.items():
            results[call_id] = ToolResult.error(
                ErrorKind.CANCELLED,
                f"{tool_name} was interrupted: the session server stopped before it finished; "
                "if it had started, its effects may be partial",
            )
        await self._record_cut_step(session_id, turn_id, responded, texts, results)
        for call_id, tool_name in unfinished.items():
            self._emit(session_id, turn_id, ToolCallFinished(call_id, tool_name, results[call_id], 0.0, 0.0))
        # Counted from the log, as the turn would have counted them: steps run from 0, so a step's
        # event means as many requests were made (one cut before its first word is not seen);
        # the calls are those of the responses the history now holds, the cut one included.
        steps = set(texts) | set(responded)
        usage = sum((r.usage for r in responded.values()), Usage())
        tool_calls = sum(len(r.tool_calls) for r in responded.values())
        self._emit(session_id, turn_id, TurnFinished("interrupted", usage, max(steps) + 1 if steps else 0,
                                                     tool_calls, ""))
        log.warning("session %s: turn %s was interrupted by a server stop", session_id, turn_id,
                    extra=log_context.ids(session_id=session_id, turn_id=turn_id))

    async def _record_cut_step(self, session_id: str, turn_id: str, responded: dict[int, ModelResponded],
                               texts: dict[int, list[str]], results: dict[str, ToolResult]) -> None:
        """Writes to the history the model response the crash cut off, with its calls' results,
        as `Turn` does after a CancelTurn: its calls may have changed the workspace (a write that
        finished, a bash cut half-way), and a next turn whose model does not see them would do
        them again. A step is written once all its results are in, in one transaction, so the
        response that needs it is the turn's first not in the history; a crash before this
        commit finds it missing again, one after finds it there."""
        history = await self.histories.get(session_id)
        recorded = sum(1 for m in self.store.get_messages(session_id) if m.turn_id == turn_id and m.role == "assistant")
        response = responded.get(recorded)
        if response is None:
            return  # the crash came before the response was complete: its early Query calls read only
        text = "".join(texts.get(response.step, []))
        if len(text) > MAX_RESPONSE_TEXT_CHARS:
            text = cut(text, MAX_RESPONSE_TEXT_CHARS, "model text")
        messages = [StoredMessage(role="assistant", text=text, tool_calls=list(response.tool_calls), turn_id=turn_id)]
        messages += [
            StoredMessage(role="tool", tool_call_id=c.call_id, tool_result=results[c.call_id], turn_id=turn_id)
            for c in response.tool_calls
        ]
        history.append(messages)

    def _turn_events_stored(self, session_id: str, turn_id: str):
        """The stored events of one turn, read a page at a time."""
        return (event for event in self.store.events_after(session_id) if event.turn_id == turn_id)

    def running_turns(self) -> int:
        return len(self._turns)

    async def shutdown(self, grace: float = 0.0, hurry: asyncio.Event | None = None) -> None:
        """Gives running turns `grace` seconds to finish (cut short once `hurry` is set), ends the
        others (marked interrupted), ends the event streams and the claims that would wait on
        (ShuttingDown, once a turn's stream has its TurnFinished), and closes the model providers."""
        if grace > 0 and self._turns:
            await _until_done_or(hurry, [task for _, task in self._turns.values()], grace)
        self.external.interrupting()
        for turn, task in list(self._turns.values()):
            turn.cancel_reason = "interrupted"
            task.cancel()
        await asyncio.gather(*(task for _, task in self._turns.values()), return_exceptions=True)
        self.events.flush()
        lost = self.events.close()
        if lost:
            # Their sessions are still running in the store: the next start ends their turns.
            log.error("%d events of %d sessions could not be stored before the stop and are lost; the next start "
                      "ends their turns as interrupted: %s", sum(lost.values()), len(lost), ", ".join(sorted(lost)))
        self.bus.stop(unstored=set(lost))
        self.external.stop()
        await self.models.aclose()

    # -- sessions ------------------------------------------------------------------------------

    async def create_session(
        self, workspace: str, request: SettingsRequest, labels: dict[str, str]
    ) -> SessionRecord:
        """Raises config.InvalidArgument naming the bad field, admission.AtCapacity or ShuttingDown."""
        path = resolve_workspace(workspace, self.workspace_roots, self.data_dir)
        settings = build_settings(request, self.default_model, self.known_tools(), self.registry.sandbox.settings)
        config = settings.to_dict()
        size = len(json.dumps(config))
        if size > MAX_CONFIG_CHARS:
            raise InvalidArgument("config", f"takes {size:,} characters as stored; at most {MAX_CONFIG_CHARS:,}")
        size = sum(len(key) + len(value) for key, value in labels.items())
        if size > MAX_LABELS_CHARS:
            raise InvalidArgument("labels", f"hold {size:,} characters; at most {MAX_LABELS_CHARS:,}")
        await self.models.check(settings.model)
        if self.admission is not None:
            self.admission.check_session()
        now = time.time()
        record = SessionRecord(
            session_id=f"s_{uuid.uuid4().hex[:16]}",
            workspace=str(path),
            config=config,
            labels=dict(labels),
            created=now,
            updated=now,
        )
        self.store.create_session(record)
        if self.admission is not None:
            self.admission.session_added()
        return record

    def get_session(self, session_id: str) -> SessionRecord:
        record = self.store.get_session(session_id)
        if record is None or session_id in self._deleting:
            raise SessionNotFound(session_id)
        return record

    def list_sessions(self, page_size: int, page_token: str) -> tuple[list[SessionRecord], str]:
        """Raises ValueError for a bad page size or token."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise ValueError(f"page_size {page_size} is out of range [0, {MAX_PAGE_SIZE}]")
        return self.store.list_sessions(page_size, page_token)

    async def delete_session(self, session_id: str) -> None:
        """Raises SessionNotFound, or a sqlite3.Error when the store cannot delete it: the session
        is then left as it was, with its events (stored or waiting to be)."""
        self.get_session(session_id)
        # Gone before the wait for its turn: a SendMessage landing once the turn had ended, the
        # session not yet deleted, started a turn that failed on the deleted session.
        self._deleting.add(session_id)
        try:
            entry = self._turns.get(session_id)
            if entry is not None:
                entry[1].cancel()
                await asyncio.gather(entry[1], return_exceptions=True)
            # Deleted from the store first: what is forgotten below is the session's only
            # while the store still has it.
            if self.store.delete_session(session_id) and self.admission is not None:
                self.admission.session_removed()
            self.external.close_session(session_id)
            self.events.forget(session_id)
            self.histories.forget(session_id)
            self.bus.close_session(session_id)
        finally:
            self._deleting.discard(session_id)

    def messages(self, session_id: str, offset: int, limit: int) -> tuple[list[StoredMessage], int]:
        """A page of history and the offset of the next page (0 when this is the last)."""
        record = self.get_session(session_id)
        if limit < 0 or limit > MAX_PAGE_SIZE:
            raise ValueError(f"page_size {limit} is out of range [0, {MAX_PAGE_SIZE}]")
        limit = limit or DEFAULT_MESSAGES_PAGE
        page = self.store.get_messages(session_id, offset, limit, MAX_READ_PAGE_CHARS)
        following = offset + len(page)
        return page, following if following < record.message_count else 0

    # -- turns ---------------------------------------------------------------------------------

    async def start_turn(self, session_id: str, text: str) -> tuple[str, AsyncIterator[list[StoredEvent]]]:
        """Starts a turn; returns its id and its events in batches, the last ending with TurnFinished.

        The turn runs on its own: dropping the stream does not stop it. Raises admission.AtCapacity
        or ShuttingDown when no turn may start now, store.StoreUnavailable while the last turn's
        events wait to be stored, and a sqlite3.Error when the store fails to read its history.
        """
        # Checked, and the turn counted, before the session's history is loaded (when it is not
        # in memory): no load starts beside the session's running turn, which appends to the
        # history meanwhile, nor for a turn refused anyway. A stopping server says so first: its
        # refusal is the one a retry elsewhere, or after the restart, gets past.
        if self.admission is not None:
            self.admission.check_open()
        record, settings, provider, model_name = self._turn_inputs(session_id, text)
        if self.admission is not None:
            self.admission.acquire_turn()
        try:
            history = self.histories.cached(session_id)
            if history is None:
                history = await self.histories.get(session_id)
                # Checked again: meanwhile another turn may have started (its history the same,
                # loaded once), the session been deleted, the server begun to stop.
                record, settings, provider, model_name = self._turn_inputs(session_id, text)
                if self.admission is not None:
                    self.admission.check_open()
            return self._start_turn(session_id, record, settings, provider, model_name, text, history)
        except BaseException:
            if self.admission is not None:
                self.admission.release_turn()
            raise

    def _turn_inputs(self, session_id: str, text: str) -> tuple[SessionRecord, SessionSettings, ModelProvider, str]:
        """What a turn of the session would start from, or the exception that refuses it."""
        record = self.get_session(session_id)
        if session_id in self._turns:
            raise TurnInProgress(f"session {session_id} is already running a turn: wait for it or CancelTurn")
        failure = self.events.commit_failure(session_id)
        if failure is not None:
            # The last turn is over in memory, not in the store: a turn started now would follow
            # events that may never be stored (a stop now ends that turn as interrupted).
            raise store_unavailable(failure, f"session {session_id}'s last turn has ended, but its last events are "
                                             "not stored yet, so no turn may start; they are stored, and its "
                                             "TurnFinished sent, once the store takes writes again")
        if not text.strip():
            raise ValueError("text is empty: send the user's message")
        check_prompt(text)
        if self.workspace_roots:
            # A session created before the operator narrowed --workspace-root runs no more turns.
            resolve_workspace(record.workspace, self.workspace_roots, self.data_dir)
        else:
            # Nor one created in the data directory (by a server before this check, or given
            # another --data-dir since), or whose path now leads there or into /proc: its workspace
            # is stored resolved, but a command of a session on a directory above may since have
            # put a symlink in its place.
            refuse_server_paths(Path(os.path.realpath(record.workspace)), self.data_dir)
        settings = self.settings_of(record)
        try:
            provider, model_name = self.models.provider(settings.model)
        except ValueError as exc:
            raise ModelUnavailable(settings.model, str(exc)) from None
        return record, settings, provider, model_name

    def _start_turn(self, session_id: str, record: SessionRecord, settings: SessionSettings,
                    provider: ModelProvider, model_name: str, text: str, history: History
                    ) -> tuple[str, AsyncIterator[list[StoredEvent]]]:
        turn_id = f"t_{uuid.uuid4().hex[:12]}"
        # Held until the turn ends (`_turn_ended`), or released below if it never starts.
        snapshots = self.snapshots.of(record.workspace, hold=True) if self.snapshots is not None else None
        try:
            return self._start_turn_holding(session_id, turn_id, record, settings, provider, model_name, text,
                                            history, snapshots)
        except BaseException:
            if self.snapshots is not None:
                self.snapshots.release(record.workspace)
            raise

    def _start_turn_holding(self, session_id: str, turn_id: str, record: SessionRecord, settings: SessionSettings,
                            provider: ModelProvider, model_name: str, text: str, history: History,
                            snapshots: WorkspaceSnapshots | None) -> tuple[str, AsyncIterator[list[StoredEvent]]]:
        ctx = TurnContext(
            session_id=session_id,
            turn_id=turn_id,
            workspace=Path(record.workspace),
            workspace_identity=directory_identity(record.workspace),
            settings=settings,
            provider=provider,
            model_name=model_name,
            pool=self.pool,
            registry=self.registry,
            stats=self.stats,
            local_fallback=self.local_fallback,
            emit=lambda payload: self._emit(session_id, turn_id, payload),
            history=history,
            confirmations=self.confirmations,
            external=self.external,
            telemetry=self.telemetry,
            admission=self.admission,
            snapshots=snapshots,
            local_query_tools=self.local_query_tools,
            local_cheap_calls=self.local_cheap_calls,
            workspace_locks=self.workspace_locks,
        )
        turn = Turn(ctx)
        # Before the subscription: a store that cannot take it (sqlite3.Error) leaves nothing to undo.
        self.store.set_session_state(session_id, "running", turn_id)
        # From the last event assigned, stored or not: the turn's own events all come after it.
        subscription = self.bus.subscribe(session_id, self.events.last_assigned(session_id), reads_to_the_end=True)
        task = asyncio.create_task(self._run_turn(session_id, turn, text), name=f"turn-{turn_id}")
        # A callback, not the coroutine's own finally: a task cancelled before its first step (a
        # CancelTurn or DeleteSession right behind SendMessage) never runs its coroutine, and the
        # turn stayed running for good, its slot taken, its stream open, without TurnFinished.
        task.add_done_callback(lambda _: self._turn_ended(session_id, turn, text))
        self._turns[session_id] = (turn, task)
        return turn_id, self._turn_events(subscription, turn_id)

    async def _run_turn(self, session_id: str, turn: Turn, text: str) -> None:
        try:
            await turn.run(text)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("session %s: turn failed unexpectedly", session_id,
                          extra=log_context.ids(session_id=session_id, turn_id=turn.ctx.turn_id))

    def _turn_ended(self, session_id: str, turn: Turn, text: str) -> None:
        if not turn.started:
            turn.finish_unstarted(text)  # cancelled before it ran: its clients still see it end
        self._turns.pop(session_id, None)
        if self.admission is not None:
            self.admission.release_turn()
        if self.snapshots is not None and turn.ctx.snapshots is not None:
            self.snapshots.release(turn.ctx.snapshots.workspace)
        # Now, not at the end of the loop turn: the commit storing TurnFinished marks the session
        # idle, and a SendMessage in between would find it over in memory and not in the store.
        # Should the commit fail, the session stays running until the retry stores it.
        self.events.flush()

    @staticmethod
    async def _turn_events(subscription: Subscription, turn_id: str) -> AsyncIterator[list[StoredEvent]]:
        try:
            async for batch in subscription.batches():
                mine = [event for event in batch if event.turn_id == turn_id]
                end = next((i for i, event in enumerate(mine) if isinstance(event.payload, TurnFinished)), None)
                if end is not None:
                    yield mine[: end + 1]
                    return
                if mine:
                    yield mine
        finally:
            subscription.close()

    def cancel_turn(self, session_id: str, reason: str = "") -> bool:
        """Cancels the running turn (False when the session is idle). The client's reason is for
        the record: the server's log says which turn was cancelled, and why."""
        self.get_session(session_id)
        entry = self._turns.get(session_id)
        if entry is None:
            return False
        turn, task = entry
        shown = reason if len(reason) <= MAX_CANCEL_REASON_LOGGED else f"{reason[:MAX_CANCEL_REASON_LOGGED]} [... cut]"
        log.info("session %s: turn %s cancelled by a client: %s", session_id, turn.ctx.turn_id,
                 shown or "(no reason given)", extra=log_context.ids(session_id=session_id, turn_id=turn.ctx.turn_id))
        task.cancel()
        return True

    def confirm(self, session_id: str, call_id: str, approve: bool, reason: str) -> None:
        """Answers a call waiting for confirmation. Raises SessionNotFound, config.InvalidArgument
        (a reason over MAX_CONFIRMATION_REASON_CHARS) or ConfirmationNotFound."""
        self.get_session(session_id)
        if len(reason) > MAX_CONFIRMATION_REASON_CHARS:
            raise InvalidArgument("reason", f"is {len(reason):,} characters; at most {MAX_CONFIRMATION_REASON_CHARS:,}")
        self.confirmations.answer(session_id, call_id, approve, reason)

    async def claim_external_tasks(
        self, session_id: str, client_id: str, max_tasks: int, lease: float | None, wait: float | None
    ) -> list[ExternalTaskInfo]:
        """Leases pending external tasks to a client (see external.ExternalTasks.claim).

        Raises SessionNotFound, or config.InvalidArgument naming the bad request field.
        """
        self.get_session(session_id)
        if not client_id.strip():
            raise InvalidArgument("client_id", "is empty: name the claiming client; only it may complete its tasks")
        if len(client_id) > MAX_CLIENT_ID_CHARS:
            raise InvalidArgument("client_id", f"is {len(client_id):,} characters; at most {MAX_CLIENT_ID_CHARS}")
        if not 0 <= max_tasks <= MAX_CLAIM_TASKS:
            raise InvalidArgument("max_tasks", f"{max_tasks} is out of range [0, {MAX_CLAIM_TASKS}]")
        lease = _checked_lease(lease)
        wait = wait or 0.0
        if not 0 <= wait <= MAX_CLAIM_WAIT:
            raise InvalidArgument(
                "wait", f"{wait:g}s is out of range [0s, {MAX_CLAIM_WAIT:g}s]; claim again to wait longer"
            )
        return await self.external.claim(session_id, client_id, max_tasks or 1, lease, wait)

    def renew_external_task_lease(
        self, session_id: str, task_id: str, client_id: str, lease: float | None
    ) -> ExternalTaskInfo:
        """Raises SessionNotFound, config.InvalidArgument, external.TaskNotFound or external.LeaseNotHeld."""
        self.get_session(session_id)
        return self.external.renew(session_id, task_id, client_id, _checked_lease(lease))

    def complete_external_task(self, session_id: str, task_id: str, client_id: str, result: ToolResult) -> None:
        """Raises SessionNotFound, external.TaskNotFound or external.LeaseNotHeld."""
        self.get_session(session_id)
        self.external.complete(session_id, task_id, client_id, result)

    async def watch(
        self, session_id: str, after_sequence: int, follow: bool
    ) -> AsyncIterator[list[StoredEvent] | CaughtUp]:
        """Stored events after `after_sequence` (in batches), a CaughtUp marker, then (if follow)
        live ones.

        A watcher that falls behind catches up from the store on its own (see `bus`); it is
        never cut off for being slow. Raises admission.AtCapacity or ShuttingDown when no more
        streams may open, and bus.SessionClosed when the session is deleted while it runs.
        """
        last = self.get_session(session_id).last_sequence
        if after_sequence < 0:
            raise ValueError(f"after_sequence is {after_sequence}: it must be 0 (everything) or a seen sequence")
        if after_sequence > last:
            raise SequenceOutOfRange(after_sequence, last)
        if self.admission is not None:
            self.admission.acquire_subscriber()
        cursor = after_sequence
        subscription = None
        try:
            # What was stored when the call came is read in reader threads: clients resuming
            # together after a restart, each replaying on the loop, would stall every session.
            while cursor < last:
                page = await self._catch_up_page(session_id, cursor)
                if not page.events:
                    break  # deleted meanwhile: said below
                cursor = page.events[-1].sequence
                yield page.events
            # The end, on the loop (mostly nothing by now): read in the same step as the
            # subscription that follows it.
            while True:
                page = self._event_page(session_id, cursor)
                cursor = page.events[-1].sequence if page.events else cursor
                if not page.more:
                    if self.store.get_session(session_id) is None:
                        # Deleted during the replay: its pages ran out early, and a subscription
                        # made now would wait for good (the session's subscribers were closed).
                        raise SessionClosed(session_id)
                    # Same synchronous step as the read: every later event reaches the subscription.
                    subscription = self.bus.subscribe(session_id, cursor) if follow else None
                    if page.events:
                        yield page.events
                    break
                yield page.events
            yield CaughtUp(cursor)
            if subscription is None:
                return
            async for batch in subscription.batches():
                yield batch
        finally:
            if subscription is not None:
                subscription.close()
            if self.admission is not None:
                self.admission.release_subscriber()

    # -- internals -----------------------------------------------------------------------------

    def _event_page(self, session_id: str, after: int) -> EventPage:
        """A page of stored events at the end of a WatchEvents replay, read on the loop: in the
        same step as the subscription that follows the last one (see `watch`)."""
        return self._observed(self.store.event_page(session_id, after))

    async def _catch_up_page(self, session_id: str, after: int) -> EventPage:
        """A page of stored events for a subscriber catching up, or a replay, read in a reader
        thread: hundreds of idle followers of one busy session, each reading its page on the loop,
        stalled it for up to 2 s."""
        return self._observed(await self.store.read(lambda reads: reads.event_page(session_id, after)))

    def _observed(self, page: EventPage) -> EventPage:
        if self._metrics is not None:
            self._metrics.event_replay_page_chars.observe(page.chars)
        return page

    def _emit(self, session_id: str, turn_id: str, payload: EventPayload) -> None:
        self.events.append(session_id, turn_id, bound_event(payload))

    @functools.cached_property
    def default_sandbox(self) -> SandboxPolicy:
        """The sandbox policy of a session that names none: one created now without asking, or
        one stored before sandboxes existed (see SessionSettings.from_dict)."""
        return build_sandbox_policy(None, {}, self.registry.sandbox.settings)

    def settings_of(self, record: SessionRecord) -> SessionSettings:
        """The stored session's settings, defaults of this server filled in."""
        return SessionSettings.from_dict(record.config, self.default_sandbox)

    def known_tools(self) -> set[str]:
        """Tools a permission rule may name: this server's and those its workers offer now."""
        return {*self.registry.names(), *self.pool.offered_tools()}


def _checked_lease(lease: float | None) -> float:
    """A requested lease in seconds (the default when unset); InvalidArgument when out of range."""
    lease = DEFAULT_LEASE if lease is None else lease
    if not MIN_LEASE <= lease <= MAX_LEASE:
        raise InvalidArgument("lease", f"{lease:g}s is out of range [{MIN_LEASE:g}s, {MAX_LEASE:g}s]")
    return lease


async def _until_done_or(hurry: asyncio.Event | None, tasks: list[asyncio.Task[Any]], grace: float) -> None:
    """Waits until every task is done, `hurry` is set or `grace` seconds pass; cancels none of
    the tasks."""
    if hurry is None:
        await asyncio.wait(tasks, timeout=grace)
        return
    done = asyncio.ensure_future(asyncio.wait(tasks))
    hurried = asyncio.ensure_future(hurry.wait())
    try:
        await asyncio.wait([done, hurried], timeout=grace, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Cancelling asyncio.wait leaves the turns' tasks running: only the waits end.
        done.cancel()
        hurried.cancel()
