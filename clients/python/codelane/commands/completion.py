"""`codelane completion SHELL`: a tab-completion script for bash, zsh or tcsh, made by shtab from
the parsers of every subcommand (so it always matches them).

    codelane completion bash > ~/.local/share/bash-completion/completions/codelane
    codelane completion zsh > ~/.zfunc/_codelane        # with fpath+=(~/.zfunc) before compinit
"""

from __future__ import annotations

import argparse
import importlib

from codelane.commands import args as types
from codelane.commands.common import quiet_broken_pipe

PROG = "codelane completion"
SHELLS = ("bash", "zsh", "tcsh")


def build_parser() -> argparse.ArgumentParser:
    p = types.parser(PROG, "Print a shell completion script for codelane.")
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    return p


def codelane_parser() -> argparse.ArgumentParser:
    """One parser holding every subcommand's, files and directories marked for completion."""
    import shtab

    from codelane.cli import SUBCOMMANDS

    top = argparse.ArgumentParser(prog="codelane")
    top.add_argument("-V", "--version", action="store_true", help="print the client's version")
    subcommands = top.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    for name, (_, factory, help_text) in SUBCOMMANDS.items():
        module, function = factory.split(":")
        try:
            own = getattr(importlib.import_module(module), function)()
        except ImportError:  # an optional part not installed (e.g. the benchmarks): no options to offer
            own = argparse.ArgumentParser(add_help=False)
        sub = subcommands.add_parser(name, parents=[own], add_help=False, help=help_text,
                                     description=own.description)
        for action in sub._actions:
            if action.type in (types.readable_file,) or action.dest == "script":
                action.complete = shtab.FILE  # type: ignore[attr-defined]
            elif action.type in (types.existing_dir,) or action.dest in ("workspace", "root", "data_dir"):
                action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    return top


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import shtab

    try:
        print(shtab.complete(codelane_parser(), shell=args.shell), flush=True)
    except BrokenPipeError:  # `| head`: the reader went away
        return quiet_broken_pipe()
    return 0
