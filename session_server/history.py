"""A session's conversation as the model sees it: loaded from the store once, then kept in memory
and appended as the store is, so a model step costs the same at message 20 and at message 2,000.

A history is loaded in one of the store's reader threads (`Store.read`), its messages converted
there too: read on the event loop, one of a gigabyte stalled every session of the server for about
a second, on the first turn after a restart or after the cache had dropped it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable
from functools import partial

from session_server.llm.base import ChatMessage, ModelToolCall
from session_server.store import Reads, Store, StoredMessage

# Histories kept in memory; the least recently used is dropped first (and reloaded when needed),
# once they are more than this many, or hold more than this many characters in all: a count alone
# let eight sessions of large tool results hold 486 Mi characters. The history a turn uses is
# never dropped for the others, however big.
MAX_CACHED_HISTORIES = 256
MAX_CACHED_HISTORY_CHARS = 64 * 1024 * 1024


def to_chat(message: StoredMessage) -> ChatMessage:
    if message.role == "assistant":
        calls = [ModelToolCall(c.call_id, c.tool_name, c.arguments_json) for c in message.tool_calls]
        return ChatMessage("assistant", text=message.text, tool_calls=calls)
    if message.role == "tool":
        result = message.tool_result
        return ChatMessage(
            "tool",
            text=result.output if result else message.text,
            tool_call_id=message.tool_call_id,
            is_error=bool(result and result.is_error),
        )
    return ChatMessage("user", text=message.text)


class History:
    """The chat messages of one session, in order. The list is shared with model requests, so
    providers must neither keep nor change it; only `append` grows it."""

    def __init__(self, store: Store, session_id: str, stored: Iterable[StoredMessage] = ()) -> None:
        """The history of `stored` messages, which `append` adds to: see `load`."""
        self._store = store
        self.session_id = session_id
        self.messages: list[ChatMessage] = [to_chat(m) for m in stored]
        # What the messages hold, in characters of text and arguments (the cache's measure).
        self.chars = sum(map(_chars, self.messages))
        # Every call id of the session so far: a new call gets one of its own (Turn._make_call).
        self.call_ids = {call.call_id for message in self.messages for call in message.tool_calls}

    @classmethod
    def load(cls, store: Store, session_id: str) -> asyncio.Future[History]:
        """The session's history as stored, read and converted in a reader thread."""
        return store.read(partial(cls._read, store, session_id))

    @classmethod
    def _read(cls, store: Store, session_id: str, reads: Reads) -> History:
        return cls(store, session_id, reads.get_messages(session_id))

    def append(self, messages: Iterable[StoredMessage]) -> None:
        """Stores the messages (atomically), then adds them here."""
        messages = list(messages)
        self._store.append_messages(self.session_id, messages)
        added = [to_chat(m) for m in messages]
        self.messages.extend(added)
        self.chars += sum(map(_chars, added))
        self.call_ids.update(call.call_id for message in added for call in message.tool_calls)


def _chars(message: ChatMessage) -> int:
    return len(message.text) + sum(len(call.arguments_json) for call in message.tool_calls)


class Histories:
    """The histories of the sessions used lately, by session id.

    The loop goes on while one loads: its callers must see to it that the session's history is
    not appended to meanwhile (`SessionManager.start_turn` loads none for a session that runs a
    turn, and starts none until the load is over), or the one cached would miss what was added."""

    def __init__(self, store: Store, limit: int = MAX_CACHED_HISTORIES,
                 max_chars: int = MAX_CACHED_HISTORY_CHARS) -> None:
        self._store = store
        self._limit = limit
        self._max_chars = max_chars
        self._cache: OrderedDict[str, History] = OrderedDict()
        # Loads under way, by session: whoever asks for the session meanwhile waits for the same
        # one, so that a session never has two histories (one of them missing the other's appends).
        self._loading: dict[str, asyncio.Future[History]] = {}

    async def get(self, session_id: str) -> History:
        """The session's history, from memory (without waiting: see `cached`) or loaded. Raises
        what the read raises (a sqlite3.Error when the store fails): the next `get` loads again."""
        history = self.cached(session_id)
        if history is None:
            loading = self._loading.get(session_id)
            if loading is None:
                loading = self._loading[session_id] = History.load(self._store, session_id)
                # Cached by the load itself, not by a caller: one that stops waiting (its client
                # gone) leaves the history to the others and to the next turn.
                loading.add_done_callback(partial(self._loaded, session_id))
            history = await asyncio.shield(loading)
            if self._cache.get(session_id) is history:
                self._trim()
        return history

    def cached(self, session_id: str) -> History | None:
        """The session's history if it is in memory (now the most recently used), else None."""
        history = self._cache.get(session_id)
        if history is not None:
            self._cache.move_to_end(session_id)
            self._trim()
        return history

    def _trim(self) -> None:
        # Checked when a turn starts: histories grow by appends in between.
        held = sum(h.chars for h in self._cache.values())
        while len(self._cache) > 1 and (len(self._cache) > self._limit or held > self._max_chars):
            held -= self._cache.popitem(last=False)[1].chars

    def __len__(self) -> int:
        return len(self._cache)

    def forget(self, session_id: str) -> None:
        """The session is deleted: its history goes, and so does a load under way (its callers
        still get what it reads)."""
        self._cache.pop(session_id, None)
        self._loading.pop(session_id, None)

    def _loaded(self, session_id: str, loading: asyncio.Future[History]) -> None:
        # A failed load is its callers' to report; retrieved here too, for a load nobody waits
        # for any more (else asyncio logs "exception was never retrieved").
        failure = loading.exception()
        if self._loading.get(session_id) is not loading:
            return  # forgotten meanwhile: the session was deleted
        del self._loading[session_id]
        if failure is None:  # else nothing is cached, and the next `get` reads again
            self._cache[session_id] = loading.result()
