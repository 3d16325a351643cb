"""A session server inside the calling process, with local worker processes: for one-off runs,
the demo and examples. Listens on a free loopback port and stops on exit."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from session_server.server import CodelaneServer, ServerConfig

WORKER_CONNECT_TIMEOUT = 30.0


@contextlib.asynccontextmanager
async def embedded_server(
    *, model: str = "", local_workers: int = 2, data_dir: Path | None = None, worker_tools: list[str] | None = None,
    allow_unsandboxed: bool = False, allow_network: bool = False,
) -> AsyncIterator[str]:
    """Yields the server's address once its local workers have connected. `allow_unsandboxed` and
    `allow_network` are the server's --allow-unsandboxed and --sandbox-allow-network."""
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="codelane-")))
        server = CodelaneServer(ServerConfig(
            listen="127.0.0.1:0", data_dir=data_dir, local_workers=local_workers, model=model,
            local_worker_tools=list(worker_tools or []), allow_unsandboxed=allow_unsandboxed,
            sandbox_allow_network=allow_network,
        ))
        await server.start()
        try:
            deadline = time.monotonic() + WORKER_CONNECT_TIMEOUT
            while len(server.pool.workers()) < local_workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"local workers did not connect within {WORKER_CONNECT_TIMEOUT:g}s")
                await asyncio.sleep(0.05)
            yield server.address
        finally:
            await server.stop(grace=2.0)
