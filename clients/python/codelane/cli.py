"""The `codelane` command: one entry point, a subcommand per job.

Each subcommand's module is imported only when it runs, so `codelane worker` on a GPU host does
not load the server, and `codelane run` does not load the tools.
"""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module with a `main(argv) -> int`, its parser's factory as "module:function", one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "chat": ("codelane.commands.chat", "codelane.commands.chat:build_parser",
             "talk with a session at the terminal: each line is a turn"),
    "run": ("codelane.commands.run", "codelane.commands.run:build_parser",
            "send one prompt (new session, --session or --continue) and show the turn as it happens"),
    "cancel": ("codelane.commands.cancel", "codelane.commands.cancel:build_parser",
               "cancel the turn a session is running"),
    "confirm": ("codelane.commands.confirm", "codelane.commands.confirm:build_parser",
                "approve or reject a call that waits for a confirmation"),
    "show": ("codelane.commands.show", "codelane.commands.show:build_parser",
             "show a session's history, tool results folded"),
    "watch": ("codelane.commands.watch", "codelane.commands.watch:build_parser",
              "replay a session's events, then follow new ones"),
    "sessions": ("codelane.commands.sessions", "codelane.commands.sessions:build_parser",
                 "list the server's sessions"),
    "delete": ("codelane.commands.delete", "codelane.commands.delete:build_parser",
               "delete sessions and their history"),
    "tools": ("codelane.commands.tools", "codelane.commands.tools:build_parser",
              "list the tools a session's model is offered, their lanes and where each runs"),
    "conformance": ("session_server.conformance.cli", "session_server.conformance.cli:build_parser",
                    "check that a tool worker or a client follows the codelane protocol"),
    "workers": ("codelane.commands.workers", "codelane.commands.workers:build_parser",
                "list the connected tool workers and the workspaces they see"),
    "drain": ("codelane.commands.drain", "codelane.commands.drain:build_parser",
              "drain a tool worker: finish its calls, take no more, disconnect"),
    "stats": ("codelane.commands.stats", "codelane.commands.stats:build_parser",
              "show per-lane queue statistics and latencies"),
    "health": ("codelane.commands.health", "codelane.commands.health:build_parser",
               "check that the server is up and serving"),
    "version": ("codelane.commands.version", "codelane.commands.version:build_parser",
                "show the versions of this client and of the server"),
    "completion": ("codelane.commands.completion", "codelane.commands.completion:build_parser",
                   "print a shell completion script (bash, zsh, tcsh)"),
    "demo": ("session_server.demo", "session_server.demo:build_parser",
             "run the whole system on a sample project with a scripted model"),
    "server": ("session_server.main", "session_server.main:build_parser",
               "run a session server (with local tool workers)"),
    "worker": ("tool_worker.worker", "tool_worker.worker:build_parser",
               "run a tool worker that dials a session server"),
    "mock-llm": ("session_server.mock_llm", "session_server.mock_llm.cli:build_parser",
                 "serve a scripted model over the OpenAI and Anthropic wire formats"),
    "bench": ("codelane.commands.bench", "benchmarks.bench:build_parser",
              "benchmark parallel tool calls: modes, workers and peers, same calls"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: codelane SUBCOMMAND [options]\n\nsubcommands:")
        for name, (_, _, help_text) in SUBCOMMANDS.items():
            print(f"  {name:<12} {help_text}")
        print("\n`codelane SUBCOMMAND --help` shows its options. Client commands read their server, token and TLS\n"
              "files from flags, then $CODELANE_SERVER, $CODELANE_TOKEN, $CODELANE_TLS_*, then a profile of\n"
              "~/.config/codelane/config.toml (--profile NAME). `codelane completion bash` prints tab completion.")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from codelane import __version__

        print(f"codelane {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"codelane: unknown subcommand {name!r}; see codelane --help", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    # Commands report a failure in one line of their own; gRPC's C core would add its log lines (a
    # failed TLS handshake, for one) to stderr. Set before gRPC is loaded: clients want none of
    # them, servers and workers its errors.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE" if module_name.startswith("codelane.commands.") else "ERROR")
    try:
        module = importlib.import_module(module_name)
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        # Ctrl-C before a command has its own handling (a server or worker still importing,
        # loading --tools or binding): what it had started is stopped on the way out, and a
        # traceback would add nothing. 130, as the client commands exit after Ctrl-C.
        return 130


if __name__ == "__main__":
    sys.exit(main())
