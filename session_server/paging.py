"""Page tokens of the List RPCs (ListSessions, ListWorkers).

A token is opaque to clients; inside, the sort keys of a page's last entry, from which the next
page continues (keyset paging: stable while entries are added or removed between pages).
"""

from __future__ import annotations

import base64
import binascii
import json
import math

_BAD_TOKEN = (
    "invalid page token {token}: pass the next_page_token of the previous {rpc} response "
    "unchanged, or an empty token for the first page"
)
# Characters of a bad token the error quotes: a token may be as long as a request (megabytes), and
# a status message travels in a trailer that has to stay small.
_QUOTED_TOKEN_CHARS = 64


def encode_page_token(*keys: str | float) -> str:
    # Not ensure_ascii: a key of non-ASCII text would take up to 12 bytes a character, not 4.
    return base64.urlsafe_b64encode(json.dumps(keys, ensure_ascii=False).encode()).decode()


def decode_page_token(token: str, rpc: str, *kinds: type[str] | type[float]) -> tuple[str | float, ...]:
    """The keys of a token `encode_page_token` gave, one of each of `kinds` (a float key may be
    written as an integer). Raises ValueError, naming `rpc` and what to pass, for any other."""
    try:
        keys = json.loads(base64.urlsafe_b64decode(token.encode()))
    # RecursionError: JSON arrays nested deeper than the interpreter's stack (`[[[[...`).
    except (binascii.Error, UnicodeError, ValueError, TypeError, RecursionError) as exc:
        raise ValueError(_bad_token(token, rpc)) from exc
    if not isinstance(keys, list) or len(keys) != len(kinds) or not all(map(_is_a, keys, kinds)):
        raise ValueError(_bad_token(token, rpc))
    return tuple(float(key) if kind is float else key for key, kind in zip(keys, kinds, strict=True))


def _bad_token(token: str, rpc: str) -> str:
    quoted = repr(token)
    if len(token) > _QUOTED_TOKEN_CHARS:
        quoted = f"{token[:_QUOTED_TOKEN_CHARS]!r}... ({len(token):,} characters)"
    return _BAD_TOKEN.format(token=quoted, rpc=rpc)


def _is_a(key: object, kind: type) -> bool:
    # Only what `encode_page_token` writes: JSON also reads NaN, Infinity, integers too big for
    # a float (float() raises OverflowError) and lone surrogates ("\ud800", which no database
    # or message can encode), all of which only a forged token holds.
    if kind is float:
        if not isinstance(key, int | float) or isinstance(key, bool):
            return False
        try:
            return math.isfinite(key)
        except OverflowError:
            return False
    if isinstance(key, str):
        try:
            key.encode()
        except UnicodeEncodeError:
            return False
    return isinstance(key, kind)
