"""ListWorkers pages: every worker once, each page under 3 MiB however much the workers hold, and
tokens that are not the server's refused. The workers are hub streams this test opens itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from codelane.client import Client as SdkClient
from codelane.commands.workers import workspaces_cell
from codelane.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc, workspace_pb2
from session_server.paging import encode_page_token
from tests.polling import poll_until
from tests.session.conftest import error_details
from tool_worker import wire
from tool_worker.tools.read import TOOL as READ

# The 4 MiB gRPC clients accept by default, less the room the server keeps.
PAGE_BYTES = 3 * 1024 * 1024
HOLDINGS = 256  # what the hub keeps of a worker's
BOUND = 20.0


class Pool:
    """Workers connected over one channel, each a hub stream that stays open until `leave`."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._hub = worker_pb2_grpc.WorkerHubServiceStub(channel)
        self._streams: dict[str, grpc.aio.StreamStreamCall] = {}

    async def join(self, worker_id: str, holdings: list[worker_pb2.WorkspaceHolding] = ()) -> None:
        stream = self._hub.Connect()
        await stream.write(worker_pb2.ConnectRequest(hello=worker_pb2.Hello(
            worker_id=worker_id, slots=1, tools=[wire.spec_to_proto(READ.spec)])))
        assert (await asyncio.wait_for(stream.read(), BOUND)).HasField("welcome")
        if holdings:
            await stream.write(worker_pb2.ConnectRequest(holdings=worker_pb2.Holdings(workspaces=holdings)))
        self._streams[worker_id] = stream

    def leave(self, worker_id: str) -> None:
        self._streams.pop(worker_id).cancel()

    def close(self) -> None:
        for stream in self._streams.values():
            stream.cancel()


def holdings(paths: list[str], reason: str = "") -> list[worker_pb2.WorkspaceHolding]:
    mode = workspace_pb2.WORKSPACE_MODE_UNAVAILABLE if reason else workspace_pb2.WORKSPACE_MODE_SHARED
    return [worker_pb2.WorkspaceHolding(workspace=path, mode=mode, reason=reason) for path in paths]


@pytest.fixture
async def server(make_server):
    # Heartbeats would only add noise: these workers send none, and must stay connected.
    return await make_server(heartbeat_interval=30.0, heartbeat_timeout=60.0)


@pytest.fixture
async def channel(server) -> AsyncIterator[grpc.aio.Channel]:
    # gRPC's default limits, not the SDKs' 64 MiB: every page must reach a client that kept them.
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture
async def pool(channel) -> AsyncIterator[Pool]:
    workers = Pool(channel)
    yield workers
    workers.close()


async def list_pages(admin, page_size: int = 0) -> list[admin_pb2.ListWorkersResponse]:
    pages, token = [], ""
    while True:
        page = await admin.ListWorkers(admin_pb2.ListWorkersRequest(page_size=page_size, page_token=token),
                                       timeout=BOUND)
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages


async def all_connected(server, count: int, holding: dict[str, int]) -> None:
    """`count` workers, those of `holding` with that many workspaces (a Holdings raises no event)."""
    def done() -> bool:
        workers = {w.worker_id: w for w in server.pool.workers()}
        return len(workers) == count and all(len(workers[i].workspaces) == n for i, n in holding.items())

    await poll_until(done, what=f"{count} workers and their holdings", within=BOUND)


async def test_a_request_without_page_size_gets_every_worker_of_a_pool_that_fits(server, channel, pool) -> None:
    # As every client did before pages existed: one request, no page_size, no token.
    ids = [f"w-{i:03d}" for i in range(150)]
    for worker_id in ids:
        await pool.join(worker_id, holdings([f"/srv/{worker_id}/a", f"/srv/{worker_id}/b"]))
    await all_connected(server, len(ids), dict.fromkeys(ids, 2))
    reply = await admin_pb2_grpc.AdminServiceStub(channel).ListWorkers(admin_pb2.ListWorkersRequest(), timeout=BOUND)
    assert [w.worker_id for w in reply.workers] == ids and reply.next_page_token == ""


async def test_pages_list_every_worker_once_each_under_3_mib_however_much_they_hold(server, channel, pool) -> None:
    # 150 small workers; three holding 256 workspaces of 4,000 characters (1 MiB each); one
    # holding 256 of 4,000 four-byte characters, each with a 1,024-character reason (5 MiB: more
    # than a page alone). Before pages, ListWorkers answered 8 MiB: no default client read it.
    small = [f"w-{i:03d}" for i in range(150)]
    for worker_id in small:
        await pool.join(worker_id, holdings([f"/srv/{worker_id}"]))
    big = [f"big-{i}" for i in range(3)]
    for worker_id in big:
        await pool.join(worker_id, holdings([f"/srv/{worker_id}/{n:03d}/" + "x" * 3990 for n in range(HOLDINGS)]))
    await pool.join("huge", holdings([f"/{n:03d}" + "\U0001d11e" * 3996 for n in range(HOLDINGS)],
                                     reason="\U0001d11e" * 1024))
    everyone = sorted([*small, *big, "huge"])
    await all_connected(server, len(everyone), {**dict.fromkeys(big, HOLDINGS), "huge": HOLDINGS})
    admin = admin_pb2_grpc.AdminServiceStub(channel)

    for page_size in (1, 7, 1000, 0):
        pages = await list_pages(admin, page_size)
        assert [w.worker_id for page in pages for w in page.workers] == everyone, page_size
        assert max(page.ByteSize() for page in pages) <= PAGE_BYTES
        assert all(0 < len(page.workers) <= (page_size or 1000) for page in pages)
    # Bytes end the pages, not the count: the three big workers fill one, the huge one most of the next.
    assert [w.worker_id for w in pages[0].workers] == big and pages[1].workers[0].worker_id == "huge"

    listed = {w.worker_id: w for page in pages for w in page.workers}
    for worker_id in big:
        assert len(listed[worker_id].workspaces) == HOLDINGS and listed[worker_id].omitted_workspaces == 0
    huge = listed["huge"]
    # Its first workspaces by path, as many as fit, and how many were left out.
    kept = [w.workspace for w in huge.workspaces]
    assert 0 < len(kept) < HOLDINGS and len(kept) + huge.omitted_workspaces == HOLDINGS
    assert kept == sorted(kept) and kept[0].startswith("/000")
    assert huge.ByteSize() > PAGE_BYTES - 64 * 1024  # cut to the page, not far below it
    drained = await admin.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id="huge"), timeout=BOUND)
    assert drained.ByteSize() <= PAGE_BYTES and drained.worker.omitted_workspaces == huge.omitted_workspaces

    # The SDK and the CLI's table read every page.
    async with SdkClient(server.address, timeout=BOUND) as client:
        workers = await client.list_workers()
    assert [w.worker_id for w in workers] == everyone
    [sdk_huge] = [w for w in workers if w.worker_id == "huge"]
    assert sdk_huge.omitted_workspaces == huge.omitted_workspaces
    assert workspaces_cell(sdk_huge).endswith(f"; {huge.omitted_workspaces} more the server did not list "
                                              "(too long to send)")


async def test_a_worker_present_throughout_the_listing_is_listed_once_whoever_comes_and_goes(
    server, channel, pool
) -> None:
    ids = [f"w-{i:02d}" for i in range(30)]
    for worker_id in ids:
        await pool.join(worker_id)
    await all_connected(server, len(ids), {})
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    first = await admin.ListWorkers(admin_pb2.ListWorkersRequest(page_size=10), timeout=BOUND)
    assert [w.worker_id for w in first.workers] == ids[:10]
    # The page's last worker leaves, one listed and one not yet listed with it; one joins
    # among those not yet listed, another among those listed.
    for worker_id in ("w-09", "w-03", "w-20"):
        pool.leave(worker_id)
    await pool.join("w-15a")
    await pool.join("w-05a")
    await all_connected(server, len(ids) - 1, {})
    listed = [w.worker_id for w in first.workers]
    token = first.next_page_token
    while token:
        page = await admin.ListWorkers(admin_pb2.ListWorkersRequest(page_size=10, page_token=token), timeout=BOUND)
        listed += [w.worker_id for w in page.workers]
        token = page.next_page_token
    throughout = [i for i in ids if i not in ("w-09", "w-03", "w-20")]
    assert sorted(set(listed)) == sorted(listed)  # none twice
    assert set(throughout) <= set(listed) and "w-15a" in listed and "w-20" not in listed


@pytest.mark.parametrize("token", [
    "garbage!",
    "e30=",  # {}
    encode_page_token(7.5),  # a number, not a worker id
    encode_page_token(1.5, "s_1"),  # a ListSessions token
    "\u00e9",
    "x" * 20_000,
])  # fmt: skip
async def test_a_page_token_the_server_did_not_give_is_invalid_argument_saying_what_to_pass(
    channel, pool, token: str
) -> None:
    await pool.join("w-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin_pb2_grpc.AdminServiceStub(channel).ListWorkers(
            admin_pb2.ListWorkersRequest(page_token=token), timeout=BOUND)
    error = error_details(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_ARGUMENT"
    assert error.metadata == {"field": "page_token"}
    assert error.message.endswith("pass the next_page_token of the previous ListWorkers response unchanged, or an "
                                  "empty token for the first page")


@pytest.mark.parametrize("page_size", [-1, 1001])
async def test_a_page_size_out_of_range_is_invalid_argument(channel, page_size: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin_pb2_grpc.AdminServiceStub(channel).ListWorkers(
            admin_pb2.ListWorkersRequest(page_size=page_size), timeout=BOUND)
    error = error_details(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.metadata == {"field": "page_size"}
    assert error.message == f"page_size {page_size} is out of range [0, 1000]"
