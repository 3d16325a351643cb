"""Memory of `read` on a file that is one long line, against reading that line whole.

    python -m benchmarks.read_bench [--size-mb 200]

Each case runs in a fresh Python process that reports how much its peak resident memory grew
while it ran: the `read` tool through `ToolRegistry.execute` (which streams the file and keeps
only the shown part of each line), and a plain line loop over the same file (what `read` did
before: the whole line in memory, then cut). Both run in the same invocation, side by side.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

_CHUNK = b"x" * (1024 * 1024)

_PRELUDE = """
import asyncio, json, resource, sys
def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

_TOOL = _PRELUDE + """
from tool_worker.registry import ToolRegistry
registry = ToolRegistry.builtin()
before = peak_kib()
result = asyncio.run(registry.execute("read", sys.argv[1], json.dumps({"file_path": "line.txt"})))
assert not result.is_error and "line cut" in result.output, result.output[:200]
print(peak_kib() - before)
"""

_WHOLE_LINE = _PRELUDE + """
before = peak_kib()
with open(sys.argv[1] + "/line.txt", "rb") as handle:
    for raw in handle:
        text = raw.decode("utf-8", "replace")[:2000]
print(peak_kib() - before)
"""


def _growth_mib(program: str, directory: Path) -> float:
    out = subprocess.run([sys.executable, "-c", program, str(directory)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="codelane-read-bench-") as tmp:
        directory = Path(tmp)
        with (directory / "line.txt").open("wb") as handle:
            for _ in range(args.size_mb):
                handle.write(_CHUNK)
            handle.write(b"\n")
        tool = _growth_mib(_TOOL, directory)
        whole = _growth_mib(_WHOLE_LINE, directory)
    print(f"one line of {args.size_mb} MB: peak memory growth")
    print(f"  read tool (streamed)   {tool:8.1f} MiB")
    print(f"  whole line, then cut   {whole:8.1f} MiB")
    print(f"  ratio                  {whole / max(tool, 0.1):8.0f}x less with the tool")
    return 0


if __name__ == "__main__":
    sys.exit(main())
