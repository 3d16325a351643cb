"""A store file the server can only read: the health probe reports it (NOT_SERVING), and a server
does not start on it, saying in one line what to make writable.

As root, file modes bind nobody: the server runs without CAP_DAC_OVERRIDE (setpriv), so that a
chmod binds it as it binds a server run by any other user.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.ops.conftest import health_status
from tests.polling import poll_until
from tests.session.conftest import Processes, scripted

NO_DAC_OVERRIDE = ("setpriv", "--inh-caps=-dac_override,-dac_read_search",
                   "--bounding-set=-dac_override,-dac_read_search")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (to run the server without CAP_DAC_OVERRIDE)",
)


async def test_a_read_only_store_is_not_serving_and_no_server_starts_on_it(
    processes: Processes, workspace: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    model = scripted(tmp_path, [{"text": "Done."}])
    server = await processes.start_server(data_dir, model=model, local_workers=0, wrapper=NO_DAC_OVERRIDE)
    address = f"127.0.0.1:{server.port}"
    await server.client.create(workspace)
    assert await health_status(address) == "SERVING"

    store = data_dir / "codelane.db"
    store.chmod(0o444)

    async def not_serving() -> bool:
        return await health_status(address) == "NOT_SERVING"

    # SQLite opens the file read-only, without a word: only a write says it cannot take one.
    await poll_until(not_serving, within=20, what="health to report the read-only store")
    server.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(server.proc.wait, 30) == 0

    with pytest.raises(AssertionError) as refused:
        await processes.start_server(data_dir, model=model, local_workers=0, wrapper=NO_DAC_OVERRIDE)
    why = str(refused.value)
    assert "server exited with 1" in why
    assert f"codelane server: {store} cannot take writes (attempt to write a readonly database): make it" in why
    assert "Traceback" not in why
