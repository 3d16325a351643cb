"""A mock LLM server replaying a Script over the real OpenAI and Anthropic wire formats, with
optional latency, pacing, OpenAI-compatible-server quirks and injected faults."""

from session_server.mock_llm.cli import main
from session_server.mock_llm.options import FAULTS, QUIRKS, MockOptions
from session_server.mock_llm.server import MOCK_LLM_KEY, MockLLM, RecordedRequest, start_mock_llm

__all__ = [
    "FAULTS",
    "MOCK_LLM_KEY",
    "QUIRKS",
    "MockLLM",
    "MockOptions",
    "RecordedRequest",
    "main",
    "start_mock_llm",
]
