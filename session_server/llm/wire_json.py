"""A model request's body, the whole history, encoded at every model step: orjson, in C, where it
writes what httpx's `json=` would; the standard library where orjson refuses (lone surrogates,
integers past 64 bits), so that what can be sent, and how the rest fails, stay as they were.

(Parsing the streamed chunks stays with the standard library: orjson reads an integer past 64
bits as a float, where json.loads keeps it exact, and a chunk is small.)"""

from __future__ import annotations

import json
from typing import Any

import orjson


def encode_body(body: Any) -> bytes:
    """The JSON text of `body`, compact and UTF-8 (non-ASCII unescaped), as httpx's `json=` sends
    it; a float may be spelled differently (1e-7 for 1e-07), never valued differently. (A NaN
    would go as null where httpx refuses it: the bodies hold no float but a tool schema's.)"""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
