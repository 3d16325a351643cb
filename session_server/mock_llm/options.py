"""How the mock behaves: pacing, quirks of OpenAI-compatible servers, and injected faults."""

from __future__ import annotations

from dataclasses import dataclass, field

# OpenAI stream quirks (see LLM_WIRE.md): each call's arguments in one chunk (Ollama), no `index`
# (old Ollama), the name in every delta (vLLM), no ids (vLLM), finish_reason "stop" with calls.
QUIRKS = ("whole_arguments", "missing_index", "repeated_name", "no_ids", "finish_stop")

# HTTP errors (429 carries retry-after headers; quota is an exhausted account), an error event
# after the first output, a stream that ends without its final events, a chunk of the wrong shape
# (`{"choices": ["x"]}`), and token counts sent as strings: what broken servers send. `max_tokens`
# is the output token limit reached: the last tool call ends right after its name (no arguments),
# or, without calls, the text halfway; the stream ends as the API ends it then (finish_reason
# "length", stop_reason "max_tokens"; streams only).
FAULTS = (
    "429", "quota", "500", "529", "error_mid_stream", "cut_stream", "malformed_chunk", "string_usage", "max_tokens"
)


@dataclass(frozen=True)
class MockOptions:
    latency: float = 0.0  # seconds before the first token
    token_rate: float = 0.0  # tokens per second; 0 = as fast as possible
    quirks: frozenset[str] = field(default_factory=frozenset)
    fault: str | None = None
    fault_count: int = 1  # the fault hits the first N requests; 0 = every request
    retry_after: float = 1.0  # seconds, sent with 429 as retry-after and retry-after-ms

    def __post_init__(self) -> None:
        unknown = set(self.quirks) - set(QUIRKS)
        if unknown:
            raise ValueError(f"unknown quirks {sorted(unknown)}; known: {', '.join(QUIRKS)}")
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; known: {', '.join(FAULTS)}")
        if self.latency < 0 or self.token_rate < 0 or self.fault_count < 0 or self.retry_after < 0:
            raise ValueError("latency, token_rate, fault_count and retry_after must not be negative")

    def faulty(self, request_number: int) -> bool:
        """Whether the fault hits the request with this 1-based number."""
        return self.fault is not None and (self.fault_count == 0 or request_number <= self.fault_count)
