"""`codelane show SESSION`: a session and its history, as a conversation.

    codelane show [--server HOST:PORT] [--profile NAME] [--full] [--json] SESSION

Each user message, the model's text and the calls it asked for, and each call's result folded to
its first line (`--full` shows every line). `--json` prints the session, then one object per
message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Iterable

from codelane.client import Client, Message, SessionInfo
from codelane.commands import args as types
from codelane.commands.common import add_connection_options, client_main
from codelane.terminal import for_terminal

PROG = "codelane show"
PREVIEW_CHARS = 100
INDENT = "    "


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Show a session's history: messages, tool calls, and results folded to one line.")
    add_connection_options(p)
    p.add_argument("--full", action="store_true", help="show whole tool results, not their first line")
    p.add_argument("--json", action="store_true", help="the session, then one JSON object per message")
    p.add_argument("session", help="the session's id (see `codelane sessions`)")
    return p


def _cut(line: str) -> str:
    return line if len(line) <= PREVIEW_CHARS else line[: PREVIEW_CHARS - 1] + "…"


def _indented(text: str, prefix: str = INDENT) -> list[str]:
    return [prefix + line for line in text.splitlines()] or [prefix.rstrip()]


def header(info: SessionInfo) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))
    return (f"session {info.session_id} · {info.workspace} · {info.model or '-'} · {info.state} · "
            f"{info.message_count} message(s) · created {created}")


def conversation(messages: Iterable[Message], *, full: bool) -> list[str]:
    """The history as lines of text."""
    lines: list[str] = []
    tools: dict[str, str] = {}  # call id -> tool name, to name each result
    turn = ""
    for message in messages:
        if message.turn_id != turn:
            turn = message.turn_id
            lines.append("")
        if message.role == "user":
            lines.append("you>")
            lines.extend(_indented(message.text))
        elif message.role == "assistant":
            lines.append("model>")
            if message.text.strip():
                lines.extend(_indented(message.text))
            for call in message.tool_calls:
                tools[call.call_id] = call.tool_name
                arguments = " ".join(call.arguments_json.split())
                lines.append(f"{INDENT}-> {call.tool_name} {_cut(arguments)}  [{call.call_id}]")
        elif message.role == "tool":
            result = message.tool_result
            output = result.output if result is not None else ""
            if result is not None and result.is_error:
                mark = f"error ({result.error_kind or 'tool_error'})"
            else:
                mark = "ok"
            name = tools.get(message.tool_call_id, "?")
            out_lines = output.splitlines()
            if full:
                lines.append(f"{INDENT}<- {name} {mark}  [{message.tool_call_id}]")
                lines.extend(_indented(output, INDENT * 2))
            else:
                first = _cut(out_lines[0].strip()) if out_lines else "(no output)"
                more = f"  (+{len(out_lines) - 1} lines)" if len(out_lines) > 1 else ""
                lines.append(f"{INDENT}<- {name} {mark}: {first}{more}  [{message.tool_call_id}]")
        else:
            lines.append(f"{message.role}>")
            lines.extend(_indented(message.text))
    return lines


async def show(client: Client, args: argparse.Namespace) -> int:
    session = await client.get_session(args.session)
    messages = await session.messages()
    if args.json:
        print(json.dumps(dataclasses.asdict(session.info), ensure_ascii=False))
        for message in messages:
            print(json.dumps(dataclasses.asdict(message), ensure_ascii=False))
        return 0
    # What a model wrote and a tool read may hold escape sequences the terminal would obey.
    print(header(for_terminal(session.info)))
    for line in conversation(for_terminal(messages), full=args.full):
        print(line)
    if not messages:
        print("(no messages yet)")
    return 0


def main(argv: list[str]) -> int:
    return client_main(build_parser(), argv, show)
