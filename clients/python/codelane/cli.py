"""The `codelane` command: one entry point, a subcommand per job.

Each subcommand's module is imported only when it runs, so `codelane worker` on a GPU host does
not load the server, and `codelane run` does not load the tools.
"""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module with a `main(argv) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("session_server.demo", "run the whole system on a sample project with a scripted model"),
    "run": ("codelane.commands.run", "create a session, send one prompt, show the turn as it happens"),
    "watch": ("codelane.commands.watch", "replay a session's events, then follow new ones"),
    "sessions": ("codelane.commands.sessions", "list the server's sessions"),
    "workers": ("codelane.commands.workers", "list the connected tool workers and the workspaces they see"),
    "stats": ("codelane.commands.stats", "show per-lane queue statistics and latencies"),
    "drain": ("codelane.commands.drain", "drain a tool worker: finish its calls, take no more, disconnect"),
    "server": ("session_server.main", "run a session server (with local tool workers)"),
    "worker": ("tool_worker.worker", "run a tool worker that dials a session server"),
    "mock-llm": ("session_server.mock_llm", "serve a scripted model over the OpenAI and Anthropic wire formats"),
    "bench": ("codelane.commands.bench", "benchmark parallel tool calls: modes, workers and peers, same calls"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: codelane SUBCOMMAND [options]\n\nsubcommands:")
        for name, (_, help_text) in SUBCOMMANDS.items():
            print(f"  {name:<12} {help_text}")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from codelane import __version__

        print(f"codelane {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"codelane: unknown subcommand {name!r}; see codelane --help", file=sys.stderr)
        return 2
    # Before any command imports gRPC: its core logs transport details (each failed TLS
    # handshake, say) to stderr itself; commands report errors in one line of their own.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
