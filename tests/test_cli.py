"""The `codelane` console script."""

from __future__ import annotations

import subprocess
import sys

from codelane import __version__, cli


def test_version_and_help_via_console_script() -> None:
    out = subprocess.run([sys.executable, "-m", "codelane.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"codelane {__version__}"
    help_out = subprocess.run([sys.executable, "-m", "codelane.cli", "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0
    for name in cli.SUBCOMMANDS:
        assert name in help_out.stdout


def test_unknown_subcommand_is_one_clear_line(capsys) -> None:
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown subcommand 'frobnicate'" in err
