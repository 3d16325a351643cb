"""`codelane tools`: the tools a session's model is offered, their lanes and where each one runs.

    codelane tools SESSION_ID [--server HOST:PORT] [--profile NAME] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from codelane.client import Client, ToolInfo
from codelane.commands import args as types
from codelane.commands.common import add_connection_options, client_main, print_table

PROG = "codelane tools"


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "List the tools a session's model is offered, their lanes and where each runs.")
    p.add_argument("session_id", metavar="SESSION_ID", help="the session (see `codelane sessions`)")
    add_connection_options(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per tool, with its description and argument schema, for scripts")
    return p


def runs_on(tool: ToolInfo) -> str:
    """Where the tool's calls run, in a few words."""
    if tool.runner == "workers":
        fallback = ", else the server" if tool.server_fallback else ""
        return f"workers ({', '.join(tool.worker_ids)}){fallback}"
    if tool.runner == "external_client":
        return "a client (external task)"
    return "the server"


async def list_tools(client: Client, args: argparse.Namespace) -> int:
    tools = await client.list_tools(args.session_id)
    if args.json:
        for tool in tools:
            print(json.dumps(dataclasses.asdict(tool), ensure_ascii=False))
        return 0
    rows = [
        (t.name, t.lane, t.lane_mode, runs_on(t), ",".join(f"{k}={v}" for k, v in sorted(t.required_labels.items()))
         or "-", ", ".join(sorted(t.parameters.get("properties", {}))) or "-")
        for t in tools
    ]
    print_table(("TOOL", "LANE", "MODE", "RUNS ON", "NEEDS LABELS", "ARGUMENTS"), rows,
                empty=f"session {args.session_id} is offered no tools")
    return 0


def main(argv: list[str]) -> int:
    return client_main(build_parser(), argv, list_tools)
