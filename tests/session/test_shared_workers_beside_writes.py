"""A worker on the server's own filesystem runs Query calls there, even while an Execute call of
the same turn writes other files: the snapshot a worker-bound call names is taken when no
Execute call is running, so the worker's own scan agrees with it and it never copies the
workspace into its cache for one call."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.session.conftest import call, kind, scripted

TURNS = 6
READS = 6


def _responses() -> list[dict]:
    responses = []
    for turn in range(TURNS):
        # The write comes first and touches none of what the reads and the grep look at, so the
        # scheduler lets them all run at once.
        calls = [call("write", f"w{turn}", file_path=f"out/turn-{turn}.txt", content="x" * 200_000)]
        calls += [call("read", f"r{turn}-{i}", file_path=f"src/f{i}.txt") for i in range(READS)]
        calls.append(call("grep", f"g{turn}", pattern="needle", path="src"))
        responses += [{"text": f"Turn {turn}.", "tool_calls": calls}, {"text": "Done."}]
    return responses


async def test_shared_workers_never_copy_the_workspace_beside_a_write(
    make_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_home = tmp_path / "cache-home"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))  # the local workers' --cache-dir default
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / "out").mkdir()
    for i in range(READS):
        (ws / "src" / f"f{i}.txt").write_text(f"file {i} needle\n")
    server = await make_server(local_workers=2, local_fallback=False)
    client = server.client
    await client.wait_workers("local-1", "local-2")
    session = await client.create(ws, scripted(tmp_path, _responses()))
    for turn in range(TURNS):
        events = await client.send(session.session_id, f"turn {turn}", within=60)
        assert kind(events[-1]) == "turn_finished"
        finished = [e.tool_call_finished for e in events if kind(e) == "tool_call_finished"]
        assert len(finished) == READS + 2
        for event in finished:
            assert not event.result.is_error, event.result.output
            if event.call_id.startswith("r"):
                assert event.result.worker_id in {"local-1", "local-2"}
                assert "needle" in event.result.output
    key = hashlib.sha256(str(ws).encode()).hexdigest()[:16]
    copies = sorted(p.name for p in cache_home.glob(f"codelane/workspaces/*/trees/{key}-*"))
    assert copies == [], "a worker on the same filesystem synced a copy of the workspace"
