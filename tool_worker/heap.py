"""The garbage collector in a long-running process: the session server, a tool worker.

Python's cyclic collector walks every tracked object on a full collection. A started server
tracks about 80,000 objects from its imports and start-up (modules, classes, functions, protobuf
and jsonschema tables) that live as long as the process does; walking them all is what made one
full collection take 57 ms (the event loop stands still meanwhile) in a process serving T turns.
Frozen once the process has started, they are left out of every later collection.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collects what start-up left as garbage, then exempts every object alive from later
    collections. For a process's entry point, once, after start-up: objects frozen are never
    collected, so a library (or a test process starting many servers) must not call it."""
    gc.collect()
    gc.freeze()
