"""`mock-llm`: run the mock LLM server from the command line until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from codelane.commands import args as types
from session_server.llm.script import Script, ScriptError
from session_server.mock_llm.options import FAULTS, QUIRKS
from session_server.mock_llm.server import start_mock_llm


def build_parser() -> argparse.ArgumentParser:
    parser = types.Parser(
        prog="codelane mock-llm",
        description="Serve a model script over the OpenAI (/v1/chat/completions) and Anthropic "
        "(/v1/messages) APIs.",
        formatter_class=types.HelpFormatter,
    )
    parser.add_argument("--script", required=True, help="YAML or JSON script file")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=types.port, default=0, help="port (default: any free port, printed on start)")
    parser.add_argument("--latency", type=types.non_negative_float, default=0.0, help="seconds before the first token")
    parser.add_argument(
        "--token-rate", type=types.non_negative_float, default=0.0, help="tokens per second (0: as fast as possible)"
    )
    parser.add_argument(
        "--quirk", action="append", choices=QUIRKS, default=[], help="OpenAI stream quirk (repeatable)"
    )
    parser.add_argument("--fault", choices=FAULTS, help="fault to inject")
    parser.add_argument(
        "--fault-count", type=types.non_negative_int, default=1, help="requests the fault hits (0: all; default 1)"
    )
    parser.add_argument("--retry-after", type=types.non_negative_float, default=1.0,
                        help="seconds a 429 asks clients to wait")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        script = Script.load(args.script)
    except ScriptError as exc:
        print(f"mock-llm: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(script, args))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, or the host is not an address of this machine
        print(f"mock-llm: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(script: Script, args: argparse.Namespace) -> None:
    try:
        runner, url = await start_mock_llm(
            script,
            args.host,
            args.port,
            latency=args.latency,
            token_rate=args.token_rate,
            quirks=args.quirk,
            fault=args.fault,
            fault_count=args.fault_count,
            retry_after=args.retry_after,
        )
    except ValueError as exc:
        raise SystemExit(f"mock-llm: {exc}") from None
    print(
        f"mock-llm listening on {url} (OpenAI base URL {url}/v1, Anthropic base URL {url}); "
        f"{len(script.responses)} scripted responses",
        flush=True,
    )
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
