"""Writes to file descriptors (pipes, memfds, files written whole)."""

from __future__ import annotations

import os


def write_all(descriptor: int, data: bytes) -> None:
    """Writes all of `data`: os.write may take part of it (a pipe's buffer, a signal). The first
    write takes it whole in the common case, without a memoryview."""
    written = os.write(descriptor, data)
    if written < len(data):
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(descriptor, view):]
