"""The server's REAPI content service over real gRPC: what it serves, what it refuses, and that a
file changed since its snapshot is NOT_FOUND, never wrong bytes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path

import grpc
import pytest

from codelane.reapi import bytestream_pb2, bytestream_pb2_grpc, remote_execution_pb2, remote_execution_pb2_grpc
from session_server.api.content import encode_batch_read_response
from session_server.content import MAX_BATCH_BYTES, MAX_BATCH_DIGESTS, MAX_UPLOADED_BYTES, STREAM_CHUNK
from session_server.server import CodelaneServer, ServerConfig
from tests.session.conftest import error_details
from tool_worker.merkle import Digest

TOKEN = "worker-secret"
METADATA = (("authorization", f"Bearer {TOKEN}"),)


def digest(data: bytes) -> remote_execution_pb2.Digest:
    return remote_execution_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


@pytest.fixture
async def served(tmp_path: Path):
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "small.txt").write_bytes(b"small file\n")
    (ws / "sub" / "big.bin").write_bytes(bytes(range(256)) * (3 * STREAM_CHUNK // 256 + 7))
    server = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", worker_token=TOKEN))
    await server.start()
    snapshot = await server.snapshots.of(str(ws)).current()
    channel = grpc.aio.insecure_channel(server.address)
    yield ws, snapshot, channel
    await channel.close()
    await server.stop(grace=0.5)


async def test_blobs_trees_and_streams_are_served(served) -> None:
    ws, snapshot, channel = served
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    small, big = (ws / "small.txt").read_bytes(), (ws / "sub" / "big.bin").read_bytes()
    root = remote_execution_pb2.Digest(hash=snapshot.digest.hash, size_bytes=snapshot.digest.size)
    unknown = digest(b"nobody has this")
    missing = await cas.FindMissingBlobs(remote_execution_pb2.FindMissingBlobsRequest(
        blob_digests=[digest(small), digest(big), root, unknown]), metadata=METADATA)
    assert list(missing.missing_blob_digests) == [unknown]
    read = await cas.BatchReadBlobs(remote_execution_pb2.BatchReadBlobsRequest(
        digests=[digest(small), root, unknown]), metadata=METADATA)
    by_hash = {r.digest.hash: r for r in read.responses}
    assert by_hash[digest(small).hash].data == small and by_hash[root.hash].status.code == 0
    assert remote_execution_pb2.Directory.FromString(by_hash[root.hash].data).files[0].name == "small.txt"
    assert by_hash[unknown.hash].status.code == grpc.StatusCode.NOT_FOUND.value[0]
    pages = [p async for p in cas.GetTree(remote_execution_pb2.GetTreeRequest(root_digest=root, page_size=1),
                                          metadata=METADATA)]
    assert len(pages) == 2 and pages[0].next_page_token and not pages[1].next_page_token
    assert {f.name for p in pages for d in p.directories for f in d.files} == {"small.txt", "big.bin"}
    stream = bytestream_pb2_grpc.ByteStreamStub(channel)
    name = f"blobs/{digest(big).hash}/{len(big)}"
    chunks = [r.data async for r in stream.Read(bytestream_pb2.ReadRequest(resource_name=name), metadata=METADATA)]
    assert b"".join(chunks) == big and len(chunks) > 1
    window = [r.data async for r in stream.Read(
        bytestream_pb2.ReadRequest(resource_name=name, read_offset=10, read_limit=100), metadata=METADATA)]
    assert b"".join(window) == big[10:110]


async def test_a_file_changed_since_its_snapshot_is_not_found_never_wrong_bytes(served) -> None:
    ws, _, channel = served
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    small, big = (ws / "small.txt").read_bytes(), (ws / "sub" / "big.bin").read_bytes()
    (ws / "small.txt").write_bytes(b"SMALL FILE\n")  # same size, other bytes
    (ws / "sub" / "big.bin").write_bytes(big[:-1] + b"!")
    read = await cas.BatchReadBlobs(remote_execution_pb2.BatchReadBlobsRequest(digests=[digest(small)]),
                                    metadata=METADATA)
    assert read.responses[0].status.code == grpc.StatusCode.NOT_FOUND.value[0] and not read.responses[0].data
    received, error = await _refused_read(channel, big)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert len(received) < len(big)  # the last chunk was held back: never a whole wrong blob


async def test_a_digest_of_size_0_is_the_empty_blob_only_with_the_empty_blobs_hash(served) -> None:
    # Any digest of size 0 was taken for the empty blob, whatever its hash: held, read as 0 bytes
    # that do not hash to it, and walked as an empty Directory.
    _, _, channel = served
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    empty, bogus = digest(b""), remote_execution_pb2.Digest(hash="ab" * 32, size_bytes=0)
    missing = await cas.FindMissingBlobs(remote_execution_pb2.FindMissingBlobsRequest(
        blob_digests=[empty, bogus]), metadata=METADATA)
    assert list(missing.missing_blob_digests) == [bogus]
    read = await cas.BatchReadBlobs(remote_execution_pb2.BatchReadBlobsRequest(digests=[empty, bogus]),
                                    metadata=METADATA)
    assert [(r.digest, r.status.code, r.data) for r in read.responses] == [
        (empty, 0, b""), (bogus, grpc.StatusCode.NOT_FOUND.value[0], b"")]
    stream = bytestream_pb2_grpc.ByteStreamStub(channel)
    assert [r.data async for r in stream.Read(bytestream_pb2.ReadRequest(
        resource_name=f"blobs/{empty.hash}/0"), metadata=METADATA)] == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream.Read(bytestream_pb2.ReadRequest(resource_name=f"blobs/{bogus.hash}/0"),
                                   metadata=METADATA):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in cas.GetTree(remote_execution_pb2.GetTreeRequest(root_digest=bogus), metadata=METADATA):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def _refused_read(channel: grpc.aio.Channel, blob: bytes) -> tuple[bytes, grpc.aio.AioRpcError]:
    """What a ByteStream.Read of `blob` sent before it failed, and how it failed."""
    stream = bytestream_pb2_grpc.ByteStreamStub(channel)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in stream.Read(bytestream_pb2.ReadRequest(
                resource_name=f"blobs/{digest(blob).hash}/{len(blob)}"), metadata=METADATA):
            received.append(response.data)
    return b"".join(received), caught.value


@pytest.mark.parametrize("swapped", ["file", "directory"])
async def test_a_file_swapped_for_a_symlink_out_of_the_workspace_is_never_streamed(
    served, tmp_path: Path, swapped: str
) -> None:
    # A snapshot's file, or a directory above it, replaced by a link out of the workspace (a
    # model's `ln -sf`): streaming the blob read the outside file and sent every chunk but the
    # last before the hash told it apart, so a worker read a server file no workspace holds.
    ws, _, channel = served
    big = (ws / "sub" / "big.bin").read_bytes()
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "big.bin"
    secret.write_bytes(b"TOP-SECRET" * (len(big) // 10 + 1))
    if swapped == "file":
        (ws / "sub" / "big.bin").unlink()
        (ws / "sub" / "big.bin").symlink_to(secret)
    else:
        (ws / "sub").rename(tmp_path / "moved-away")
        (ws / "sub").symlink_to(outside)
    received, error = await _refused_read(channel, big)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert b"TOP-SECRET" not in received and b"TOP-SECRET" not in error.details().encode()


async def test_a_file_swapped_for_a_fifo_is_not_found_and_blocks_no_read(served) -> None:
    # A snapshot's file replaced by a FIFO (a model's `mkfifo`): opening it waited for a writer
    # that never came, in a thread, holding one of the two read slots; two such blobs stopped
    # every worker's sync for good.
    ws, _, channel = served
    small, big = (ws / "small.txt").read_bytes(), (ws / "sub" / "big.bin").read_bytes()
    fifos = [ws / "small.txt", ws / "sub" / "big.bin"]
    for fifo in fifos:
        fifo.unlink()
        os.mkfifo(fifo)
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    stream = bytestream_pb2_grpc.ByteStreamStub(channel)
    try:
        read = await cas.BatchReadBlobs(remote_execution_pb2.BatchReadBlobsRequest(digests=[digest(small)]),
                                        metadata=METADATA, timeout=10)
        assert read.responses[0].status.code == grpc.StatusCode.NOT_FOUND.value[0]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream.Read(bytestream_pb2.ReadRequest(
                    resource_name=f"blobs/{digest(big).hash}/{len(big)}"), metadata=METADATA, timeout=10):
                pass
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        for fifo in fifos:  # frees a thread still waiting to open one (when the test fails)
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


async def test_a_blob_changed_in_its_newest_file_is_read_from_an_older_one(tmp_path: Path) -> None:
    # The content service reads each blob from the newest file that held it and asks the other
    # snapshots only when that file changed: the fallback must find the bytes, and check them too.
    first, newest = tmp_path / "first", tmp_path / "newest"
    for ws in (first, newest):
        ws.mkdir()
        (ws / "same.txt").write_bytes(b"same content\n")
    server = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", worker_token=TOKEN))
    await server.start()
    try:
        for ws in (first, newest):
            await server.snapshots.of(str(ws)).current()
        async with grpc.aio.insecure_channel(server.address) as channel:
            cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
            request = remote_execution_pb2.BatchReadBlobsRequest(digests=[digest(b"same content\n")])
            (newest / "same.txt").write_bytes(b"SAME CONTENT\n")  # same size, other bytes
            read = await cas.BatchReadBlobs(request, metadata=METADATA)
            assert read.responses[0].status.code == 0 and read.responses[0].data == b"same content\n"
            (first / "same.txt").write_bytes(b"Same Content\n")  # now no file holds it
            read = await cas.BatchReadBlobs(request, metadata=METADATA)
            assert read.responses[0].status.code == grpc.StatusCode.NOT_FOUND.value[0]
            assert not read.responses[0].data
    finally:
        await server.stop(grace=0.5)


async def _read_all(channel: grpc.aio.Channel, resource_name: str, read_offset: int = 0):
    stream = bytestream_pb2_grpc.ByteStreamStub(channel)
    return [r async for r in stream.Read(bytestream_pb2.ReadRequest(resource_name=resource_name,
                                                                    read_offset=read_offset), metadata=METADATA)]


async def _get_tree(channel: grpc.aio.Channel, root: remote_execution_pb2.Digest):
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    return [page async for page in cas.GetTree(remote_execution_pb2.GetTreeRequest(root_digest=root),
                                               metadata=METADATA)]


_NOWHERE = remote_execution_pb2.Digest(hash="cd" * 32, size_bytes=5)


@pytest.mark.parametrize(
    ("call", "code", "reason", "metadata"),
    [
        (lambda channel: remote_execution_pb2_grpc.ContentAddressableStorageStub(channel).FindMissingBlobs(
            remote_execution_pb2.FindMissingBlobsRequest(blob_digests=[remote_execution_pb2.Digest(hash="nothex")]),
            metadata=METADATA),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", {"field": "blob_digests"}),
        (lambda channel: _read_all(channel, "blobs/nothex"),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", {"field": "resource_name"}),
        (lambda channel: _read_all(channel, f"blobs/{_NOWHERE.hash}/5"),
         grpc.StatusCode.NOT_FOUND, "BLOB_NOT_FOUND", {"digest": f"{_NOWHERE.hash}/5"}),
        (lambda channel: _get_tree(channel, _NOWHERE),
         grpc.StatusCode.NOT_FOUND, "BLOB_NOT_FOUND", {"digest": f"{_NOWHERE.hash}/5"}),
        (lambda channel: _read_all(channel, f"blobs/{digest(b'small file').hash}/{len(b'small file')}",
                                   read_offset=99),
         grpc.StatusCode.OUT_OF_RANGE, "READ_OUT_OF_RANGE", {}),
    ],
    ids=["cas-invalid", "bytestream-invalid", "read-not-found", "get-tree-not-found", "read-out-of-range"],
)
async def test_content_service_errors_carry_error_info(served, call, code, reason: str, metadata: dict) -> None:
    # They carried a code and a message only, where every other error status has ErrorInfo.
    _, _, channel = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(channel)
    error = error_details(caught.value)
    assert (error.code, error.reason, error.domain, error.metadata) == (code, reason, "codelane.dev", metadata)


@pytest.mark.parametrize(
    ("request_message", "expected"),
    [
        (remote_execution_pb2.BatchReadBlobsRequest(digests=[remote_execution_pb2.Digest(hash="xyz", size_bytes=1)]),
         "not a SHA-256 digest"),
        (remote_execution_pb2.BatchReadBlobsRequest(
            digests=[remote_execution_pb2.Digest(hash="a" * 64, size_bytes=MAX_BATCH_BYTES + 1)]), "ByteStream.Read"),
        (remote_execution_pb2.BatchReadBlobsRequest(instance_name="other"), "unknown instance"),
        (remote_execution_pb2.BatchReadBlobsRequest(digest_function=remote_execution_pb2.DigestFunction.MD5),
         "only SHA256"),
    ],
)
async def test_bad_requests_are_invalid_argument(served, request_message, expected: str) -> None:
    _, _, channel = served
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cas.BatchReadBlobs(request_message, metadata=METADATA)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in caught.value.details()


async def test_a_find_missing_blobs_of_more_digests_than_a_batch_is_invalid_argument(served) -> None:
    # Each digest is looked up in every snapshot of every workspace, and its files stat'ed, on the
    # server's event loop: 800,000 digests (one 64 MiB request) stood every session still for
    # seconds, minutes with many workspaces.
    _, _, channel = served
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    many = [digest(str(i).encode()) for i in range(MAX_BATCH_DIGESTS + 1)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cas.FindMissingBlobs(remote_execution_pb2.FindMissingBlobsRequest(blob_digests=many), metadata=METADATA)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_BATCH_DIGESTS:,}" in caught.value.details()
    missing = await cas.FindMissingBlobs(remote_execution_pb2.FindMissingBlobsRequest(
        blob_digests=many[:MAX_BATCH_DIGESTS]), metadata=METADATA)
    assert len(missing.missing_blob_digests) == MAX_BATCH_DIGESTS


async def test_uploads_are_checked_and_kept(served) -> None:
    _, _, channel = served
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    good, bad = b"uploaded", b"liar"
    response = await cas.BatchUpdateBlobs(remote_execution_pb2.BatchUpdateBlobsRequest(requests=[
        remote_execution_pb2.BatchUpdateBlobsRequest.Request(digest=digest(good), data=good),
        remote_execution_pb2.BatchUpdateBlobsRequest.Request(digest=digest(b"something else"), data=bad),
    ]), metadata=METADATA)
    assert [r.status.code for r in response.responses] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    stream = bytestream_pb2_grpc.ByteStreamStub(channel)
    large = b"w" * (STREAM_CHUNK + 5)

    async def chunks():
        name = f"uploads/u1/blobs/{digest(large).hash}/{len(large)}"
        yield bytestream_pb2.WriteRequest(resource_name=name, data=large[:STREAM_CHUNK])
        yield bytestream_pb2.WriteRequest(write_offset=STREAM_CHUNK, data=large[STREAM_CHUNK:], finish_write=True)

    written = await stream.Write(chunks(), metadata=METADATA)
    assert written.committed_size == len(large)
    missing = await cas.FindMissingBlobs(remote_execution_pb2.FindMissingBlobsRequest(
        blob_digests=[digest(good), digest(large), digest(bad)]), metadata=METADATA)
    assert list(missing.missing_blob_digests) == [digest(bad)]


@pytest.mark.parametrize("size", ["99999999999999999999", "\u00b2", "\u2460"],
                         ids=["past-int64", "superscript", "circled"])
async def test_a_resource_name_with_a_size_that_is_no_int64_is_invalid_argument(served, size: str) -> None:
    # str.isdigit() took these, then int() or the Digest refused them: UNKNOWN.
    _, _, channel = served
    stream = bytestream_pb2_grpc.ByteStreamStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream.Read(bytestream_pb2.ReadRequest(resource_name=f"blobs/{'a' * 64}/{size}"),
                                   metadata=METADATA):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "is not" in caught.value.details()


@pytest.mark.parametrize("message", [b"\x0a\x03\xff\xfe\xfd", b"\xff\xff\xff\xff"], ids=["bad-utf8", "corrupt"])
async def test_a_write_message_that_does_not_parse_is_invalid_argument(served, caplog, message: bytes) -> None:
    # A request stream's messages were parsed past the interceptor that answers a unary request
    # that does not parse: UNKNOWN "Unexpected <class DecodeError>", and a traceback in the log.
    _, _, channel = served
    write = channel.stream_unary("/google.bytestream.ByteStream/Write", request_serializer=lambda raw: raw,
                                 response_deserializer=bytestream_pb2.WriteResponse.FromString)

    async def messages():
        yield message
        await asyncio.Event().wait()  # (see the test below for why not half-close)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await write(messages(), metadata=METADATA, timeout=30)
    error = error_details(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), error
    assert "WriteRequest" in error.message and "does not parse" in error.message
    assert not [r for r in caplog.records if "ByteStream/Write" in r.getMessage()], caplog.text


async def test_an_upload_bigger_than_the_server_keeps_is_refused_before_its_bytes(served) -> None:
    # The stream was held whole until finish_write: 400 MB announced as 2**50 bytes took 440 MB.
    _, _, channel = served
    stream = bytestream_pb2_grpc.ByteStreamStub(channel)

    async def chunks():
        name = f"uploads/u1/blobs/{'a' * 64}/{MAX_UPLOADED_BYTES + 1}"
        yield bytestream_pb2.WriteRequest(resource_name=name, data=b"\0" * STREAM_CHUNK)
        # Then nothing more until the answer: a client still writing when the status arrives gets
        # grpc-python's INTERNAL "Internal error from Core" in place of the server's status.
        await asyncio.Event().wait()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.Write(chunks(), metadata=METADATA, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the" in caught.value.details()


async def test_uploads_in_progress_hold_no_more_than_the_server_keeps(served) -> None:
    # Each Write stream is held whole until finish_write, and each may announce up to the
    # 256 MiB the server keeps: streams that never finish held 256 MiB apiece, without bound.
    _, _, channel = served
    stream = bytestream_pb2_grpc.ByteStreamStub(channel)
    size = MAX_UPLOADED_BYTES // 2 + 1

    async def unfinished(upload: str):
        yield bytestream_pb2.WriteRequest(resource_name=f"uploads/{upload}/blobs/{'a' * 64}/{size}", data=b"\0")
        await asyncio.Event().wait()  # never finishes (see the test above for why not write on)

    writes = [asyncio.ensure_future(stream.Write(unfinished(f"u{i}"), metadata=METADATA, timeout=30))
              for i in range(2)]
    try:
        done, pending = await asyncio.wait(writes, return_when=asyncio.FIRST_COMPLETED)
        # Whichever came second is refused; the first is still being held.
        assert len(done) == 1 and len(pending) == 1
        error = done.pop().exception()
        assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{MAX_UPLOADED_BYTES:,}" in error.details() and error_details(error).reason == "UPLOADS_FULL"
    finally:
        for write in writes:
            write.cancel()


async def test_the_content_service_wants_the_worker_token(served) -> None:
    _, _, channel = served
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cas.FindMissingBlobs(remote_execution_pb2.FindMissingBlobsRequest(), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    stream = bytestream_pb2_grpc.ByteStreamStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream.Read(bytestream_pb2.ReadRequest(resource_name="blobs/" + "a" * 64 + "/1")):
            pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_batch_read_answers_are_encoded_as_protobuf_would() -> None:
    # BatchReadBlobs answers are joined by hand (the protobuf runtime copies each blob twice):
    # the bytes must be the ones protobuf writes, for found, empty, large and missing blobs.
    found, large, empty = b"found\n", bytes(range(256)) * 600, b""
    missing = b"nobody has this"
    entries = [(Digest.of(found), found), (Digest.of(empty), empty), (Digest.of(large), large),
               (Digest.of(missing), None)]
    expected = remote_execution_pb2.BatchReadBlobsResponse()
    for blob_digest, data in entries:
        entry = expected.responses.add()
        entry.digest.hash, entry.digest.size_bytes = blob_digest.hash, blob_digest.size
        if data is None:
            entry.status.code = grpc.StatusCode.NOT_FOUND.value[0]
            entry.status.message = (f"blob {blob_digest} is not held (its file changed since the snapshot that "
                                    "named it)")
        else:
            entry.data = data
    assert encode_batch_read_response(entries) == expected.SerializeToString()
    assert encode_batch_read_response([]) == b""


@pytest.mark.parametrize("token", ["\u00b2", "9" * 5000, "-1"], ids=["superscript", "past-int-limit", "negative"])
async def test_a_get_tree_page_token_this_server_did_not_give_is_invalid_argument(served, token: str) -> None:
    _, snapshot, channel = served
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in cas.GetTree(remote_execution_pb2.GetTreeRequest(
                root_digest=remote_execution_pb2.Digest(hash=snapshot.digest.hash, size_bytes=snapshot.digest.size),
                page_token=token), metadata=METADATA):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value


@pytest.mark.parametrize("under", ["root", "child"])
async def test_get_tree_of_an_uploaded_blob_that_is_no_directory_is_invalid_argument(served, under: str) -> None:
    # Uploaded blobs are any bytes: GetTree parsed them as Directory blobs, and the DecodeError
    # ended the call with UNKNOWN ("Unexpected error") instead of a status that says why.
    _, _, channel = served
    cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
    garbage = b"\xff\xff\xff not a Directory"
    parent = remote_execution_pb2.Directory(directories=[
        remote_execution_pb2.DirectoryNode(name="d", digest=digest(garbage))]).SerializeToString()
    await cas.BatchUpdateBlobs(remote_execution_pb2.BatchUpdateBlobsRequest(requests=[
        remote_execution_pb2.BatchUpdateBlobsRequest.Request(digest=digest(blob), data=blob)
        for blob in (garbage, parent)]), metadata=METADATA)
    root = digest(garbage if under == "root" else parent)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in cas.GetTree(remote_execution_pb2.GetTreeRequest(root_digest=root), metadata=METADATA):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert digest(garbage).hash in caught.value.details() and "not a Directory" in caught.value.details()


async def test_get_tree_pages_walk_a_wide_tree_once_and_a_page_token_resumes_where_it_said(tmp_path: Path) -> None:
    ws = tmp_path / "wide"
    for i in range(12):
        for j in range(3):
            (ws / f"d{i:02}" / f"e{j}").mkdir(parents=True)
            (ws / f"d{i:02}" / f"e{j}" / "f.txt").write_text(f"{i} {j}\n")  # distinct, so not deduplicated
    server = CodelaneServer(ServerConfig(listen="127.0.0.1:0", data_dir=tmp_path / "data", worker_token=TOKEN))
    await server.start()
    try:
        snapshot = await server.snapshots.of(str(ws)).current()
        root = remote_execution_pb2.Digest(hash=snapshot.digest.hash, size_bytes=snapshot.digest.size)
        async with grpc.aio.insecure_channel(server.address) as channel:
            cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)

            async def pages(token: str = "") -> list[remote_execution_pb2.GetTreeResponse]:
                request = remote_execution_pb2.GetTreeRequest(root_digest=root, page_size=5, page_token=token)
                return [p async for p in cas.GetTree(request, metadata=METADATA)]

            whole = await pages()
            resumed = await pages(whole[2].next_page_token)
            beyond = await pages("1000")
    finally:
        await server.stop(grace=0.5)
    directories = [d for p in whole for d in p.directories]
    assert len(directories) == 1 + 12 + 36  # the root, its 12 children, their 36
    assert len({d.SerializeToString() for d in directories}) == len(directories)
    assert [len(p.directories) for p in whole] == [5] * 9 + [4]
    assert [p.next_page_token for p in whole] == [str(5 * k) for k in range(1, 10)] + [""]
    assert resumed == whole[3:]
    assert len(beyond) == 1 and not beyond[0].directories and not beyond[0].next_page_token
    names = [d.directories[0].name for d in directories[:2]]
    assert names == ["d00", "e0"]  # breadth first: the root, then d00 (whose first child is e0)
