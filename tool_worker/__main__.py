"""`python -m tool_worker ...` is `codelane worker ...`."""

import sys

from tool_worker.worker import main

sys.exit(main(sys.argv[1:]))
