"""`python -m tool_worker ...` is `codelane worker ...`."""

import os
import sys

# Before gRPC is imported: its core would log each failed TLS handshake to stderr itself, and the
# worker says what went wrong in one line of its own (as `codelane` does for every command).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from tool_worker.worker import main

try:
    sys.exit(main(sys.argv[1:]))
except KeyboardInterrupt:
    # Ctrl-C at the terminal of a starting server reaches its local workers too (one process
    # group): one still importing stops quietly, as `codelane worker` does.
    sys.exit(130)
