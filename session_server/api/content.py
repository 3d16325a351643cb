"""REAPI v2 ContentAddressableStorage and google.bytestream.ByteStream over `ContentStore`.

Served on the hub's addresses, behind the worker token (session_server.api.auth). Only SHA-256
digests exist here; a request naming another instance, a malformed digest or too many bytes at
once gets INVALID_ARGUMENT and changes nothing. Error statuses carry ErrorInfo as every other
service's do (docs/protocol.md, "Errors"), under REAPI's codes: a REAPI client reads only those.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterable

import grpc
from google.rpc import code_pb2, status_pb2

from codelane.reapi import bytestream_pb2, bytestream_pb2_grpc, remote_execution_pb2, remote_execution_pb2_grpc
from session_server.api.errors import abort
from session_server.content import (
    MAX_UPLOADED_BYTES,
    STREAM_CHUNK,
    BlobNotFound,
    ContentStore,
    InvalidBlob,
    UploadsFull,
)
from tool_worker.merkle import Digest, encode_digest, length_delimited_header, valid_hash

_DIGEST_FUNCTIONS = (remote_execution_pb2.DigestFunction.UNKNOWN, remote_execution_pb2.DigestFunction.SHA256)
GET_TREE_PAGE = 1000
_READ_NAME = re.compile(r"^(?:(?P<instance>.*)/)?blobs/(?P<hash>[^/]+)/(?P<size>[^/]+)(?:/.*)?$")
_SIZE = re.compile(r"[0-9]{1,19}")
_WRITE_NAME = re.compile(r"^(?:(?P<instance>.*)/)?uploads/[^/]+/blobs/(?P<hash>[^/]+)/(?P<size>[^/]+)(?:/.*)?$")

CAS_SERVICE = remote_execution_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"].full_name
BYTESTREAM_SERVICE = bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name


def digest_from_proto(msg: remote_execution_pb2.Digest, field: str) -> Digest:
    if not valid_hash(msg.hash) or msg.size_bytes < 0:
        raise InvalidBlob(f"{field}: {msg.hash!r}/{msg.size_bytes} is not a SHA-256 digest (64 lowercase hex "
                          "digits, size >= 0)")
    return Digest(msg.hash, msg.size_bytes)


def digest_to_proto(digest: Digest) -> remote_execution_pb2.Digest:
    return remote_execution_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


def _status(code: int, message: str = "") -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message)


class _Requests:
    """Checks shared by both services."""

    def __init__(self, instance_name: str) -> None:
        self.instance_name = instance_name

    async def check(self, context: grpc.aio.ServicerContext, instance: str, digest_function: int = 0,
                    instance_field: str = "instance_name") -> None:
        """`instance_field`: the request field the instance came from."""
        if instance != self.instance_name:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"unknown instance {instance!r}: this server serves {self.instance_name!r}", "INVALID_ARGUMENT",
                        field=instance_field)
        if digest_function not in _DIGEST_FUNCTIONS:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "only SHA256 digests are served here",
                        "INVALID_ARGUMENT", field="digest_function")


class ContentAddressableStorageServicer(remote_execution_pb2_grpc.ContentAddressableStorageServicer):
    def __init__(self, store: ContentStore, instance_name: str = "") -> None:
        self._store = store
        self._requests = _Requests(instance_name)

    async def FindMissingBlobs(self, request, context):
        await self._requests.check(context, request.instance_name, request.digest_function)
        try:
            self._store.check_lookup(len(request.blob_digests))  # before a digest is parsed
            digests = [digest_from_proto(d, f"blob_digests[{i}]") for i, d in enumerate(request.blob_digests)]
        except InvalidBlob as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field="blob_digests")
        missing = self._store.find_missing(digests)
        return remote_execution_pb2.FindMissingBlobsResponse(missing_blob_digests=[digest_to_proto(d) for d in missing])

    async def BatchReadBlobs(self, request, context):
        await self._requests.check(context, request.instance_name, request.digest_function)
        try:
            digests = [digest_from_proto(d, f"digests[{i}]") for i, d in enumerate(request.digests)]
            self._store.check_batch(digests)
        except InvalidBlob as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field="digests")
        return encode_batch_read_response(zip(digests, await self._store.read_many(digests), strict=True))

    async def BatchUpdateBlobs(self, request, context):
        await self._requests.check(context, request.instance_name, request.digest_function)
        try:
            digests = [digest_from_proto(r.digest, f"requests[{i}].digest") for i, r in enumerate(request.requests)]
            self._store.check_batch(digests)
        except InvalidBlob as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field="requests")
        response = remote_execution_pb2.BatchUpdateBlobsResponse()
        for digest, item in zip(digests, request.requests, strict=True):
            entry = response.responses.add(digest=digest_to_proto(digest))
            if item.compressor != remote_execution_pb2.Compressor.IDENTITY:
                entry.status.CopyFrom(_status(code_pb2.INVALID_ARGUMENT, "only IDENTITY (uncompressed) data"))
                continue
            try:
                self._store.store(digest, item.data)
                entry.status.code = code_pb2.OK
            except InvalidBlob as exc:
                entry.status.CopyFrom(_status(code_pb2.INVALID_ARGUMENT, str(exc)))
        return response

    async def GetTree(self, request, context):
        await self._requests.check(context, request.instance_name, request.digest_function)
        if request.page_token and not _SIZE.fullmatch(request.page_token):  # what this server gives: an offset
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"page_token {request.page_token!r} is not one "
                        "this server gave", "INVALID_ARGUMENT", field="page_token")
        try:
            root = digest_from_proto(request.root_digest, "root_digest")
        except InvalidBlob as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field="root_digest")
        page = min(request.page_size, GET_TREE_PAGE) if request.page_size > 0 else GET_TREE_PAGE
        start = int(request.page_token or 0)
        # The tree is walked as its pages are sent, never whole at once: a wide tree held the
        # event loop for as long as it took to parse all of it, once per page asked for.
        directories: list[remote_execution_pb2.Directory] = []
        walked = 0
        try:
            for directory in self._store.walk_tree(root):
                walked += 1
                if walked <= start:
                    if walked % GET_TREE_PAGE == 0:
                        await asyncio.sleep(0)  # skipping to a far page: let other calls run
                    continue
                if len(directories) == page:  # one more exists: the page is not the last
                    yield remote_execution_pb2.GetTreeResponse(directories=directories,
                                                               next_page_token=str(walked - 1))
                    directories = []
                directories.append(directory)
        except InvalidBlob as exc:  # a blob of the tree is no Directory
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field="root_digest")
        except BlobNotFound as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(exc), "BLOB_NOT_FOUND", digest=str(root))
        yield remote_execution_pb2.GetTreeResponse(directories=directories)


def encode_batch_read_response(entries: Iterable[tuple[Digest, bytes | None]]) -> bytes:
    """A serialized BatchReadBlobsResponse: each blob with its bytes, or NOT_FOUND (None).

    The bytes protobuf would write (tests compare them), joined once: the protobuf runtime copies
    every blob into the message and again into its serialization, about 0.1 s of CPU per 100 MB
    served, a cold sync's largest cost on the server after reading the files.
    """
    parts: list[bytes] = []
    for digest, data in entries:
        digest_message = encode_digest(digest)
        fields = [length_delimited_header(1, len(digest_message)), digest_message]
        if data is None:
            status = _status(code_pb2.NOT_FOUND, f"blob {digest} is not held (its file changed since the snapshot "
                                                 "that named it)").SerializeToString()
            fields += [length_delimited_header(3, len(status)), status]
        elif data:
            fields += [length_delimited_header(2, len(data)), data]
        parts.append(length_delimited_header(1, sum(map(len, fields))))
        parts += fields
    return b"".join(parts)


def _already_encoded(response: bytes) -> bytes:
    return response


def add_content_services(server: grpc.aio.Server, store: ContentStore, instance_name: str = "") -> None:
    """Serves the CAS and ByteStream over `store` on `server`: the generated registration, except
    that BatchReadBlobs answers arrive encoded (encode_batch_read_response)."""
    cas = ContentAddressableStorageServicer(store, instance_name)
    messages = remote_execution_pb2
    handlers = {
        "FindMissingBlobs": grpc.unary_unary_rpc_method_handler(
            cas.FindMissingBlobs, request_deserializer=messages.FindMissingBlobsRequest.FromString,
            response_serializer=messages.FindMissingBlobsResponse.SerializeToString),
        "BatchUpdateBlobs": grpc.unary_unary_rpc_method_handler(
            cas.BatchUpdateBlobs, request_deserializer=messages.BatchUpdateBlobsRequest.FromString,
            response_serializer=messages.BatchUpdateBlobsResponse.SerializeToString),
        "BatchReadBlobs": grpc.unary_unary_rpc_method_handler(
            cas.BatchReadBlobs, request_deserializer=messages.BatchReadBlobsRequest.FromString,
            response_serializer=_already_encoded),
        "GetTree": grpc.unary_stream_rpc_method_handler(
            cas.GetTree, request_deserializer=messages.GetTreeRequest.FromString,
            response_serializer=messages.GetTreeResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(CAS_SERVICE, handlers),))
    server.add_registered_method_handlers(CAS_SERVICE, handlers)
    bytestream_pb2_grpc.add_ByteStreamServicer_to_server(ByteStreamServicer(store, instance_name), server)


class ByteStreamServicer(bytestream_pb2_grpc.ByteStreamServicer):
    def __init__(self, store: ContentStore, instance_name: str = "") -> None:
        self._store = store
        self._requests = _Requests(instance_name)

    async def _digest(self, context, pattern: re.Pattern[str], resource_name: str) -> Digest:
        match = pattern.match(resource_name)
        # ASCII digits that fit in an int64 (str.isdigit also takes "²", which int() refuses).
        if match is None or not _SIZE.fullmatch(match["size"]) or int(match["size"]) >= 2**63:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"resource_name {resource_name!r} is not "
                        "[{instance}/]blobs/{hash}/{size} (reads) or [{instance}/]uploads/{uuid}/blobs/{hash}/{size} "
                        "(writes)", "INVALID_ARGUMENT", field="resource_name")
        await self._requests.check(context, match["instance"] or "", instance_field="resource_name")
        try:
            return digest_from_proto(remote_execution_pb2.Digest(hash=match["hash"], size_bytes=int(match["size"])),
                                     "resource_name")
        except InvalidBlob as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field="resource_name")

    async def Read(self, request, context):
        digest = await self._digest(context, _READ_NAME, request.resource_name)
        try:
            async for chunk in self._store.read_stream(digest, request.read_offset, request.read_limit):
                yield bytestream_pb2.ReadResponse(data=chunk)
        except InvalidBlob as exc:
            await abort(context, grpc.StatusCode.OUT_OF_RANGE, str(exc), "READ_OUT_OF_RANGE")
        except BlobNotFound as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(exc), "BLOB_NOT_FOUND", digest=str(digest))

    async def Write(self, request_iterator, context):
        with contextlib.ExitStack() as held:  # the upload's share of what uploads may hold
            return await self._write(request_iterator, context, held)

    async def _write(self, request_iterator, context, held: contextlib.ExitStack):
        digest: Digest | None = None
        chunks: list[bytes] = []
        received = 0
        finished = False
        async for request in request_iterator:
            if digest is None:
                digest = await self._digest(context, _WRITE_NAME, request.resource_name)
                if digest.size > MAX_UPLOADED_BYTES:
                    # Checked before a byte is held: the stream is buffered until finish_write.
                    await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                                f"{digest} is over the {MAX_UPLOADED_BYTES:,} bytes this server keeps of uploads",
                                "INVALID_ARGUMENT", field="resource_name")
                try:
                    held.enter_context(self._store.uploading(digest.size))
                except UploadsFull as exc:
                    await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "UPLOADS_FULL")
            if request.write_offset != received:
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                            f"write_offset {request.write_offset}, expected {received}", "INVALID_ARGUMENT",
                            field="write_offset")
            received += len(request.data)
            if received > digest.size:
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"more than the {digest.size} bytes announced",
                            "INVALID_ARGUMENT", field="data")
            chunks.append(request.data)
            if request.finish_write:
                finished = True
                break
        if digest is None or not finished:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the write ended without finish_write",
                        "INVALID_ARGUMENT", field="finish_write")
        try:
            self._store.store(digest, b"".join(chunks))
        except InvalidBlob as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT", field="data")
        return bytestream_pb2.WriteResponse(committed_size=received)


__all__ = [
    "BYTESTREAM_SERVICE",
    "CAS_SERVICE",
    "STREAM_CHUNK",
    "ByteStreamServicer",
    "ContentAddressableStorageServicer",
    "add_content_services",
    "encode_batch_read_response",
]
