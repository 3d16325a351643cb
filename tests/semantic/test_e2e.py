"""semantic_search end to end: a real session server, a real worker process that loads the model,
and a scripted model calling the tool; and the server alone, which never loads the model."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from codelane.v1 import admin_pb2, tools_pb2
from tests.polling import poll_until
from tests.semantic import EXTRA_MISSING
from tests.session.conftest import Client, InProcess, call, kind, listening_port, scripted
from tool_worker.semantic import START_HINT

# A worker imports torch and loads the model before it dials the hub: seconds on a loaded machine.
WORKER_START_TIMEOUT = 120.0

RETRY = '''def compute_backoff(attempt):
    """Seconds to wait before trying a failed request again: doubles with every attempt."""
    return 2 ** attempt


def load_settings(path):
    """Read the YAML settings file."""
    return open(path).read()
'''


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "src").mkdir(parents=True)
    (root / "src" / "retry.py").write_text(RETRY)
    return root


@pytest.fixture
def semantic_worker(tmp_path: Path) -> Iterator[callable]:
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int, worker_id: str, *extra: str) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable, "-m", "tool_worker", "--connect", f"127.0.0.1:{port}", "--id", worker_id,
            "--tools", "tool_worker.semantic", "--cache-dir", str(tmp_path / f"cache-{worker_id}"),
            "--log-level", "INFO", *extra,
        ]  # fmt: skip
        log = (tmp_path / f"{worker_id}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


async def _worker(client: Client, worker_id: str) -> admin_pb2.WorkerInfo:
    async def listed() -> admin_pb2.WorkerInfo | None:
        response = await client.admin.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=10)
        return next((w for w in response.workers if w.worker_id == worker_id), None)

    return await poll_until(listed, what=f"worker {worker_id} to connect", within=WORKER_START_TIMEOUT, interval=0.1)


def _finished(events: list) -> list:
    return [e.tool_call_finished for e in events if kind(e) == "tool_call_finished"]


@pytest.mark.timeout(WORKER_START_TIMEOUT + 120)
async def test_a_model_finds_code_through_a_worker_holding_the_embedding_model(
    make_server, semantic_worker, workspace: Path, tmp_path: Path
) -> None:
    pytest.importorskip("sentence_transformers", reason=EXTRA_MISSING)
    script = [
        {"tool_calls": [call("semantic_search", "c1", query="wait longer after each unsuccessful attempt")]},
        {"text": "It doubles the wait."},
    ]
    entry: InProcess = await make_server(model=scripted(tmp_path, script), local_fallback=False)
    semantic_worker(entry.server.port, "gpu-host-1")
    worker = await _worker(entry.client, "gpu-host-1")
    assert "semantic_search" in worker.tools
    # The worker reports its device as labels of its own.
    assert worker.labels["accelerator"] in ("cpu", "gpu")
    assert worker.labels["accelerator_name"] and int(worker.labels["accelerator_memory_mib"]) > 0

    session = await entry.client.create(workspace)
    events = await entry.client.send(session.session_id, "Where is the backoff computed?", within=120)
    started = [e.tool_call_started for e in events if kind(e) == "tool_call_started"]
    assert [s.worker_id for s in started] == ["gpu-host-1"]
    (finished,) = _finished(events)
    assert not finished.result.is_error, finished.result.output
    assert "1. src/retry.py:1-3 compute_backoff (function), found by" in finished.result.output
    assert kind(events[-1]) == "turn_finished"
    # The session server never took the tool in: it only knows it from the worker.
    assert entry.server.registry.get("semantic_search") is None


@pytest.mark.timeout(WORKER_START_TIMEOUT + 60)
async def test_a_worker_without_the_required_labels_does_not_offer_it(
    make_server, semantic_worker, tmp_path: Path
) -> None:
    pytest.importorskip("sentence_transformers", reason=EXTRA_MISSING)
    entry: InProcess = await make_server()
    proc = semantic_worker(entry.server.port, "cpu-host-1", "--require", "semantic_search:accelerator=tpu")
    worker = await _worker(entry.client, "cpu-host-1")
    assert "semantic_search" not in worker.tools and "grep" in worker.tools
    assert worker.labels["accelerator"] in ("cpu", "gpu")
    proc.kill()
    proc.wait(10)
    log = (tmp_path / "cpu-host-1.log").read_text()
    assert "semantic_search is not offered: it requires accelerator=tpu and this worker has accelerator=" in log


async def test_the_server_alone_says_what_to_start(make_server, workspace: Path, tmp_path: Path) -> None:
    script = [
        {"tool_calls": [call("semantic_search", "c1", query="retry backoff")]},
        {"text": "No semantic search here."},
    ]
    # Even told to hand the module to local workers, the server does not load the tool itself.
    entry: InProcess = await make_server(
        model=scripted(tmp_path, script), local_worker_tools=["tool_worker.semantic"]
    )
    assert entry.server.registry.get("semantic_search") is None
    session = await entry.client.create(workspace)
    events = await entry.client.send(session.session_id, "find the backoff")
    (finished,) = _finished(events)
    assert finished.result.is_error
    assert finished.result.error_kind == tools_pb2.ERROR_KIND_NO_WORKER
    assert finished.result.output == f"semantic_search was not run: no connected worker offers it; {START_HINT}"
    assert "codelane worker --connect HOST:PORT --tools tool_worker.semantic" in finished.result.output
    assert kind(events[-1]) == "turn_finished"


async def test_a_server_process_given_the_module_never_maps_torch(workspace: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch", reason=EXTRA_MISSING)
    script = scripted(tmp_path, [{"tool_calls": [call("semantic_search", "c1", query="backoff")]}, {"text": "ok"}])
    out, err = tmp_path / "server.out", tmp_path / "server.err"
    argv = [
        sys.executable, "-m", "codelane.cli", "server", "--listen", "127.0.0.1:0",
        "--data-dir", str(tmp_path / "data"), "--local-workers", "0", "--model", script,
        "--tools", "tool_worker.semantic",
    ]  # fmt: skip
    proc = await asyncio.to_thread(subprocess.Popen, argv, stdout=out.open("wb"), stderr=err.open("wb"))
    client = None
    try:
        def listening() -> int | None:
            assert proc.poll() is None, err.read_text()
            return listening_port(out.read_text())

        port = await poll_until(listening, what=lambda: f"the server to listen; its stderr:\n{err.read_text()}",
                                within=30)
        client = Client(f"127.0.0.1:{port}")
        session = await client.create(workspace)
        (finished,) = _finished(await client.send(session.session_id, "find the backoff"))
        assert finished.result.error_kind == tools_pb2.ERROR_KIND_NO_WORKER
        # The libraries the live process has loaded: torch's would be here had anything imported it.
        maps = await asyncio.to_thread(Path(f"/proc/{proc.pid}/maps").read_text)
        assert "libtorch" not in maps
    finally:
        if client is not None:
            await client.close()
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)


async def test_a_call_whose_only_worker_went_away_says_what_to_start(
    make_server, workspace: Path, tmp_path: Path
) -> None:
    # With --no-local-fallback the hub's NO_WORKER result went to the model as it was: "no
    # connected worker can run semantic_search", without the command that starts one.
    from tests.contract.test_worker_contract import RawWorker

    script = [{"tool_calls": [call("semantic_search", "c1", query="retry backoff")]}, {"text": "done"}]
    entry: InProcess = await make_server(model=scripted(tmp_path, script), local_fallback=False)
    spec = tools_pb2.ToolSpec(name="semantic_search", description="Find code by meaning.", lane=tools_pb2.LANE_QUERY,
                              parameters_json_schema='{"type": "object"}', idempotent=True)
    worker = RawWorker(entry.client, "gpu-host-1", spec)
    assert (await worker.read()).HasField("welcome")
    session = await entry.client.create(workspace)
    sent = asyncio.create_task(entry.client.send(session.session_id, "find the backoff"))
    while not (await worker.read()).HasField("assignments"):
        pass
    worker.half_close()  # the worker's stream ends with the call on it; no other worker connects
    (finished,) = _finished(await sent)
    assert finished.result.error_kind == tools_pb2.ERROR_KIND_NO_WORKER
    assert finished.result.output.startswith("no connected worker can run semantic_search for workspace ")
    assert finished.result.output.endswith(f"; {START_HINT}")
