"""A session's conversation as the model sees it: loaded from the store once, then kept in memory
and appended as the store is, so a model step costs the same at message 20 and at message 2,000."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from session_server.llm.base import ChatMessage, ModelToolCall
from session_server.store import Store, StoredMessage

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

    def __init__(self, store: Store, session_id: str) -> None:
        self._store = store
        self.session_id = session_id
        self.messages: list[ChatMessage] = [to_chat(m) for m in store.get_messages(session_id)]
        # What the messages hold, in characters of text and arguments (the cache's measure).
        self.chars = sum(map(_chars, self.messages))

    def append(self, messages: Iterable[StoredMessage]) -> None:
        """Stores the messages (atomically), then adds them here."""
        messages = list(messages)
        self._store.append_messages(self.session_id, messages)
        added = [to_chat(m) for m in messages]
        self.messages.extend(added)
        self.chars += sum(map(_chars, added))


def _chars(message: ChatMessage) -> int:
    return len(message.text) + sum(len(call.arguments_json) for call in message.tool_calls)


class Histories:
    """The histories of the sessions used lately, by session id."""

    def __init__(self, store: Store, limit: int = MAX_CACHED_HISTORIES,
                 max_chars: int = MAX_CACHED_HISTORY_CHARS) -> None:
        self._store = store
        self._limit = limit
        self._max_chars = max_chars
        self._cache: OrderedDict[str, History] = OrderedDict()

    def get(self, session_id: str) -> History:
        history = self._cache.get(session_id)
        if history is None:
            history = self._cache[session_id] = History(self._store, session_id)
        else:
            self._cache.move_to_end(session_id)
        # Checked here, when a turn starts: histories grow by appends in between.
        held = sum(h.chars for h in self._cache.values())
        while len(self._cache) > 1 and (len(self._cache) > self._limit or held > self._max_chars):
            held -= self._cache.popitem(last=False)[1].chars
        return history

    def __len__(self) -> int:
        return len(self._cache)

    def forget(self, session_id: str) -> None:
        self._cache.pop(session_id, None)
