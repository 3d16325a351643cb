"""A tool module whose import is interrupted by Ctrl-C, as a server's or worker's start may be:
it sends SIGINT to its own process while it loads."""

from __future__ import annotations

import os
import signal

from tool_worker.tools.base import Tool

# A terminal's Ctrl-C meets Python's default handler; a test run in the background may have
# inherited SIGINT ignored.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.kill(os.getpid(), signal.SIGINT)

TOOLS: list[Tool] = []
