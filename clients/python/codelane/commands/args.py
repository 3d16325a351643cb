"""Option types and help shared by every `codelane` subcommand: each value is checked when the
command line is parsed, so a bad one is a one-line usage error (exit 2) before anything starts.

Each type is a function from the option's text to its value that raises
`argparse.ArgumentTypeError` with a message a person can act on.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from codelane.transport import parse_address

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LANES = ("query", "execute")
LANE_MODES = ("internal", "external", "hybrid")

# Label keys and values: no spaces, commas or equals signs, which the `k=v,k=v` form cannot carry.
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9._/:@+-]*")


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help when it has a default worth showing and its help
    does not already give one. A flag's (an option taking no value) is not: `--no-follow`'s
    default, True, is that of what it turns off."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or action.nargs == 0
            or default in (None, False, [], {}, "", argparse.SUPPRESS)
            or text == argparse.SUPPRESS
        ):
            return action.help
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (what is wrong, and where help is), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parser(prog: str, description: str) -> Parser:
    """A Parser with the shared help formatter."""
    return Parser(prog=prog, description=description, formatter_class=HelpFormatter)


def _type(name: str, check: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in some messages
    return convert


address = _type("address", parse_address)
listen_address = _type("address", lambda text: parse_address(text, listen=True))


def _integer(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < lowest:
        raise ValueError(f"{value} is too small: it must be {lowest} or more")
    return value


def _number(text: str, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")) or value < 0 or (positive and value == 0):
        raise ValueError(f"{text!r} must be a {'positive' if positive else 'non-negative'} finite number")
    return value


def _port(text: str) -> int:
    value = _integer(text, 0)
    if value > 65535:
        raise ValueError(f"{value} is not a port: ports go from 0 to 65535")
    return value


port = _type("port", _port)
positive_int = _type("positive_int", lambda text: _integer(text, 1))
non_negative_int = _type("non_negative_int", lambda text: _integer(text, 0))
positive_float = _type("positive_float", lambda text: _number(text, positive=True))
non_negative_float = _type("non_negative_float", lambda text: _number(text, positive=False))


def parse_size(text: str) -> int:
    """'10GiB', '512MB', '2G', '1000' -> bytes: K, M, G and T alone or with iB are powers of
    1024, with B alone powers of 1000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"{text!r} is not a size such as 10GiB, 512MB, 4G or 1000000")
    number, unit, suffix = float(match[1]), match[2].upper(), match[3].lower()
    base = 1024 if suffix.startswith("i") or (unit and not suffix) else 1000
    return int(number * base ** " KMGT".index(unit or " "))


def _positive_size(text: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise ValueError(f"{text!r} is no size: give more than 0, e.g. 4G")
    return size


# One spelling of sizes for every command: the server took "4G" only and the worker "4GiB" too.
positive_size = _type("size", _positive_size)


def _otlp_endpoint(text: str) -> str:
    """OTLP/gRPC's endpoint as the exporter takes it: http:// or https:// and a host (a port
    too, or the scheme's), or HOST:PORT. Anything else was taken, and no span ever left."""
    if "://" not in text:
        parse_address(text)
        return text
    url = urllib.parse.urlsplit(text)
    try:
        port = url.port
    except ValueError:
        port = -1
    if url.scheme not in ("http", "https") or not url.hostname or port == -1:
        raise ValueError(f"{text!r} is not an OTLP/gRPC endpoint such as http://collector:4317 or collector:4317")
    return text


otlp_endpoint = _type("otlp_endpoint", _otlp_endpoint)


def directory_to_make(example: str) -> Callable[[str], Path]:
    """A directory the command creates on first use (--data-dir, --cache-dir). Empty (an unset
    variable: `--data-dir "$DIR"`) it was the current directory, which then got the store or the
    synced copies; a file there failed later, at start or at every call."""

    def check(text: str) -> Path:
        if not text.strip():
            raise ValueError(f"the directory is empty: give one, e.g. {example}")
        path = Path(text)
        if path.exists() and not path.is_dir():
            raise ValueError(f"{text}: not a directory")
        return path

    return _type("directory", check)


def _existing_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"{text}: no such directory")
    if not path.is_dir():
        raise ValueError(f"{text}: not a directory")
    return path.resolve()


def _readable_file(text: str) -> str:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"{text}: no such file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{text}: not readable (permission denied)")
    return str(path)


def check_token(text: str) -> str:
    """A bearer token gRPC can send: printable ASCII. gRPC refuses any other character in a header,
    on every call and in its own words: a worker retried forever, a client ended in a traceback.
    The usual one is the line end of the file the token was read from."""
    bad = next((char for char in text if not " " <= char <= "~"), None)
    if bad is not None:
        what = "a line end (the last line's, of the file it was read from?)" if bad in "\r\n" else f"{bad!r}"
        raise ValueError(f"the token holds {what}: a bearer token is printable ASCII")
    return text


bearer_token = _type("bearer_token", check_token)
existing_dir = _type("existing_dir", _existing_dir)
readable_file = _type("readable_file", _readable_file)


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"{text!r} is not a log level: use one of {', '.join(LOG_LEVELS)}")
    return level


log_level = _type("log_level", _log_level)


def parse_label(item: str) -> tuple[str, str]:
    """One `key=value` label; ValueError naming the part that is wrong."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"label {item!r} is not key=value")
    if not _LABEL_KEY.fullmatch(key):
        raise ValueError(f"label key {key!r} (in {item!r}) must be letters, digits, '.', '_', '/' or '-'")
    if not _LABEL_VALUE.fullmatch(value):
        raise ValueError(f"label value {value!r} (in {item!r}) may not hold spaces, commas or '='")
    return key, value


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k=v` labels; ValueError for an empty item, a repeated key or a malformed label."""
    labels: dict[str, str] = {}
    for item in text.split(","):
        if not item:
            raise ValueError(f"{text!r} has an empty label (two commas in a row, or one at an end)")
        key, value = parse_label(item)
        if key in labels:
            raise ValueError(f"label {key!r} is given twice in {text!r}")
        labels[key] = value
    return labels


labels = _type("labels", parse_labels)
label = _type("label", parse_label)


def _variable(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"{text!r} is not NAME=VALUE")
    return name, value


variable = _type("variable", _variable)


def _lane_mode(text: str) -> tuple[str, str]:
    lane, sep, mode = text.partition("=")
    lane, mode = lane.strip().lower(), mode.strip().lower()
    if not sep or lane not in LANES or mode not in LANE_MODES:
        raise ValueError(f"{text!r} is not LANE=MODE with LANE one of {', '.join(LANES)} and MODE one of "
                         f"{', '.join(LANE_MODES)}, e.g. execute=external")
    return lane, mode


lane_mode = _type("lane_mode", _lane_mode)


# Where `Renamed` leaves its notices in the parsed arguments (see `renamed_notices`).
_RENAMED_NOTICES = "_renamed_notices"


def renamed_notices(args: argparse.Namespace) -> list[str]:
    """What the old spellings used on a command line should tell the user, e.g. "--workers is
    deprecated: use --local-workers"."""
    return list(getattr(args, _RENAMED_NOTICES, ()))


def say_renamed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each of `renamed_notices(args)` as a line on stderr, for commands that only write text."""
    for notice in renamed_notices(args):
        print(f"{parser.prog}: {notice}", file=sys.stderr)


class Renamed(argparse.Action):
    """An old spelling of an option that still works. Add it after the new option, with the same
    `dest` (`append=True` for a repeatable one). It prints nothing while parsing, when the command's
    log format is not known yet (a plain line in `--log-format json` broke a reader of objects):
    the command says `renamed_notices(args)` once it is."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, append: bool = False,
                 **kwargs: Any) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.new = new
        self.append = append

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        notice = f"{option_string} is deprecated: use {self.new}"
        setattr(namespace, _RENAMED_NOTICES, [*renamed_notices(namespace), notice])
        if self.append:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)
