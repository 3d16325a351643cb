"""CreateSession validation, unknown and empty ids, and paging of ListSessions and GetMessages."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from codelane.v1 import session_pb2, session_pb2_grpc, tools_pb2
from tests.server.test_store import NESTED_TOKEN
from tests.session.conftest import Client, call, collect, rpc_error, scripted

DOMAIN = "codelane.dev"


def _request(workspace: str, **config) -> session_pb2.CreateSessionRequest:
    return session_pb2.CreateSessionRequest(workspace=workspace, config=session_pb2.SessionConfig(**config))


INVALID_CREATES = [
    ("missing-dir", lambda ws, good: _request(str(ws / "does-not-exist"), model=good), "workspace"),
    ("relative-path", lambda ws, good: _request("relative/dir", model=good), "workspace"),
    ("empty-workspace", lambda ws, good: _request("", model=good), "workspace"),
    ("blank-workspace", lambda ws, good: _request("   ", model=good), "workspace"),
    ("workspace-is-a-file", lambda ws, good: _request(str(ws / "a.txt"), model=good), "workspace"),
    # Path.expanduser raised RuntimeError for a user without a home: UNKNOWN, not the field.
    ("home-of-unknown-user", lambda ws, good: _request("~no-such-user-here/ws", model=good), "workspace"),
    ("unknown-provider", lambda ws, good: _request(str(ws), model="foo:bar"), "config.model"),
    ("malformed-model", lambda ws, good: _request(str(ws), model="gpt-4o"), "config.model"),
    ("model-without-name", lambda ws, good: _request(str(ws), model="openai:"), "config.model"),
    ("no-model-and-no-default", lambda ws, good: _request(str(ws)), "config.model"),
    ("missing-script", lambda ws, good: _request(str(ws), model=f"scripted:{ws}/nope.yaml"), "config.model"),
    # os.path.realpath raised ValueError ("embedded null byte"): UNKNOWN.
    ("script-path-with-nul", lambda ws, good: _request(str(ws), model=f"{good}\0.yaml"), "config.model"),
    (
        "query-concurrency-1000",
        lambda ws, good: _request(str(ws), model=good, queue=session_pb2.QueueConfig(query_concurrency=1000)),
        "config.queue.query_concurrency",
    ),
    ("max-turns-negative", lambda ws, good: _request(str(ws), model=good, max_turns=-1), "config.max_turns"),
    ("max-output-tokens-negative", lambda ws, good: _request(str(ws), model=good, max_output_tokens=-1),
     "config.max_output_tokens"),
    ("max-output-tokens-huge", lambda ws, good: _request(str(ws), model=good, max_output_tokens=1_000_001),
     "config.max_output_tokens"),
    (
        "control-lane",
        lambda ws, good: _request(
            str(ws),
            model=good,
            queue=session_pb2.QueueConfig(
                lanes=[session_pb2.LaneConfig(lane=tools_pb2.LANE_CONTROL, mode=tools_pb2.LANE_MODE_EXTERNAL)]
            ),
        ),
        "config.queue.lanes[0].lane",
    ),
    (
        # One would silently win over the other.
        "lane-twice",
        lambda ws, good: _request(
            str(ws),
            model=good,
            queue=session_pb2.QueueConfig(lanes=[
                session_pb2.LaneConfig(lane=tools_pb2.LANE_QUERY, mode=tools_pb2.LANE_MODE_EXTERNAL),
                session_pb2.LaneConfig(lane=tools_pb2.LANE_QUERY, mode=tools_pb2.LANE_MODE_INTERNAL),
            ]),
        ),
        "config.queue.lanes[1].lane",
    ),
    (
        # The field was named config.queue.lanes.timeout: which entry of the list, it did not say.
        "lane-timeout-over-24h",
        lambda ws, good: _request(
            str(ws),
            model=good,
            queue=session_pb2.QueueConfig(lanes=[
                session_pb2.LaneConfig(lane=tools_pb2.LANE_QUERY, timeout=duration_pb2.Duration(seconds=60)),
                session_pb2.LaneConfig(lane=tools_pb2.LANE_EXECUTE, timeout=duration_pb2.Duration(seconds=25 * 3600)),
            ]),
        ),
        "config.queue.lanes[1].timeout",
    ),
    (
        # Each entry was converted on the event loop (about 2 us) and each repeat noted as a
        # problem: the 16 million that fit in one request held every client up for half a
        # minute and took gigabytes, before the first problem was reported. (So many no longer
        # pass the request's size bound: 100,000 do.)
        "100,000-lanes",
        lambda ws, good: _request(
            str(ws), model=good, queue=session_pb2.QueueConfig(lanes=[session_pb2.LaneConfig(lane=tools_pb2.LANE_QUERY)]
                                                                    * 100_000),
        ),
        "config.queue.lanes",
    ),
]


@pytest.mark.parametrize(("build", "field"), [c[1:] for c in INVALID_CREATES], ids=[c[0] for c in INVALID_CREATES])
async def test_create_session_rejects_bad_input_naming_the_field(
    client: Client, workspace: Path, tmp_path: Path, build, field: str
) -> None:
    good_model = scripted(tmp_path, [{"text": "hi"}])
    await client.create(workspace, good_model)  # one valid session, to see that nothing changes
    before = await client.count_sessions()

    error = await rpc_error(client.sessions.CreateSession(build(workspace, good_model), timeout=10))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_ARGUMENT"
    assert error.domain == DOMAIN
    assert error.metadata == {"field": field}
    assert field in error.message
    assert await client.count_sessions() == before


async def test_a_create_session_bigger_than_any_it_takes_is_refused_unparsed(
    client: Client, workspace: Path, tmp_path: Path
) -> None:
    # 300,000 labels (4 MB): protobuf parses a map in time quadratic in its entries, on the
    # event loop, before the labels' own bound could refuse them; 64 MiB of them took minutes.
    model = scripted(tmp_path, [{"text": "hi"}])
    request = _request(str(workspace), model=model)
    request.labels.update({f"k{i}": "v" for i in range(300_000)})
    error = await rpc_error(client.sessions.CreateSession(request, timeout=10))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_ARGUMENT", error
    assert f"the request is {request.ByteSize():,} bytes" in error.message and "at most 2,097,152" in error.message
    assert await client.count_sessions() == 0


@pytest.mark.parametrize(("method", "size", "bound"), [
    ("SendMessage", 6 * 1024 * 1024, "5,242,880"),
    ("GetSession", 2 * 1024 * 1024, "1,048,576"),
])
async def test_a_request_bigger_than_any_its_method_takes_is_refused_unparsed(
    client: Client, workspace: Path, tmp_path: Path, method: str, size: int, bound: str
) -> None:
    # Refused after it was parsed, each was held until its call ended: eight clients sending
    # 60 MiB prompts had the server hold 5-6 GiB.
    session = await client.create(workspace, scripted(tmp_path, [{"text": "hi"}]))
    if method == "SendMessage":
        request = session_pb2.SendMessageRequest(session_id=session.session_id, text="x" * size)
        stream = client.sessions.SendMessage(request, timeout=10)
        error = await rpc_error(collect(stream))
    else:
        request = session_pb2.GetSessionRequest(session_id="s" * size)
        error = await rpc_error(client.sessions.GetSession(request, timeout=10))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_ARGUMENT", error
    assert f"the request is {request.ByteSize():,} bytes" in error.message and f"at most {bound}" in error.message
    assert (await client.get(session.session_id)).last_sequence == 0


async def test_script_that_is_not_a_script_is_invalid(client: Client, workspace: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("responses: 3\n")
    error = await rpc_error(
        client.sessions.CreateSession(_request(str(workspace), model=f"scripted:{bad}"), timeout=10)
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata == {"field": "config.model"}
    assert await client.count_sessions() == 0


async def test_created_session_has_defaults_filled_in(client: Client, workspace: Path, tmp_path: Path) -> None:
    model = scripted(tmp_path, [{"text": "hi"}])
    request = session_pb2.CreateSessionRequest(
        workspace=str(workspace), config=session_pb2.SessionConfig(model=model), labels={"team": "qa"}
    )
    session = (await client.sessions.CreateSession(request, timeout=10)).session
    assert session.session_id
    assert session.workspace == str(await asyncio.to_thread(workspace.resolve))
    assert session.state == session_pb2.SESSION_STATE_IDLE
    assert session.config.model == model
    assert session.config.max_turns == 50
    assert session.config.queue.query_concurrency == 8
    assert session.config.queue.max_attempts == 3
    assert session.config.system_prompt
    assert session.last_sequence == 0 and session.message_count == 0
    assert dict(session.labels) == {"team": "qa"}
    assert (await client.get(session.session_id)) == session


@pytest.mark.parametrize(
    "rpc", ["GetSession", "DeleteSession", "CancelTurn", "GetMessages", "SendMessage", "WatchEvents"]
)
async def test_unknown_session_is_not_found(client: Client, rpc: str) -> None:
    request = _session_request(rpc, "s_does_not_exist")
    error = await rpc_error(_invoke(client, rpc, request))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "SESSION_NOT_FOUND"
    assert error.metadata == {"session_id": "s_does_not_exist"}


@pytest.mark.parametrize(
    "rpc", ["GetSession", "DeleteSession", "CancelTurn", "GetMessages", "SendMessage", "WatchEvents"]
)
async def test_empty_session_id_is_invalid(client: Client, rpc: str) -> None:
    error = await rpc_error(_invoke(client, rpc, _session_request(rpc, "")))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata == {"field": "session_id"}


async def test_deleted_session_is_gone(client: Client, workspace: Path, tmp_path: Path) -> None:
    model = scripted(tmp_path, [{"text": "hello"}])
    session = await client.create(workspace, model)
    await client.send(session.session_id, "hi")
    await client.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=session.session_id), timeout=10)
    error = await rpc_error(client.get(session.session_id))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert await client.count_sessions() == 0
    error = await rpc_error(_invoke(client, "DeleteSession", _session_request("DeleteSession", session.session_id)))
    assert error.code == grpc.StatusCode.NOT_FOUND


async def test_empty_text_is_invalid(client: Client, workspace: Path, tmp_path: Path) -> None:
    session = await client.create(workspace, scripted(tmp_path, [{"text": "hello"}]))
    error = await rpc_error(client.send(session.session_id, "  "))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata == {"field": "text"}
    assert (await client.get(session.session_id)).last_sequence == 0


def _session_request(rpc: str, session_id: str):
    requests = {
        "GetSession": session_pb2.GetSessionRequest,
        "DeleteSession": session_pb2.DeleteSessionRequest,
        "CancelTurn": session_pb2.CancelTurnRequest,
        "GetMessages": session_pb2.GetMessagesRequest,
        "WatchEvents": session_pb2.WatchEventsRequest,
    }
    if rpc == "SendMessage":
        return session_pb2.SendMessageRequest(session_id=session_id, text="hello")
    return requests[rpc](session_id=session_id)


async def _invoke(client: Client, rpc: str, request) -> list:
    method = getattr(client.sessions, rpc)
    if rpc in ("SendMessage", "WatchEvents"):
        return [item async for item in method(request, timeout=10)]
    return [await method(request, timeout=10)]


# -- paging ------------------------------------------------------------------------------------


async def test_list_sessions_pages_newest_first(client: Client, workspace: Path, tmp_path: Path) -> None:
    model = scripted(tmp_path, [{"text": "hi"}])
    created = [(await client.create(workspace, model)).session_id for _ in range(5)]

    pages = []
    token = ""
    for _ in range(10):
        response = await client.sessions.ListSessions(
            session_pb2.ListSessionsRequest(page_size=2, page_token=token), timeout=10
        )
        pages.append([s.session_id for s in response.sessions])
        token = response.next_page_token
        if not token:
            break

    assert [len(p) for p in pages] == [2, 2, 1]
    listed = [sid for page in pages for sid in page]
    assert listed == list(reversed(created))  # newest first, no duplicates, none missing
    everything = await client.sessions.ListSessions(session_pb2.ListSessionsRequest(), timeout=10)
    assert [s.session_id for s in everything.sessions] == listed and not everything.next_page_token
    times = [s.create_time.ToNanoseconds() for s in everything.sessions]
    assert times == sorted(times, reverse=True)


async def test_list_sessions_pages_stay_under_what_a_default_client_reads(client: Client, workspace: Path,
                                                                           tmp_path: Path) -> None:
    # A page was bounded by its sessions' configurations and labels only: 400 sessions in a
    # workspace of a 4,000-character path, each with a 7,000-character prompt, made one page of
    # 4.5 MiB, which a client with gRPC's default 4 MiB receive limit could not read.
    deep = workspace
    while len(str(deep)) < 4000:
        deep /= "d" * 200
    deep.mkdir(parents=True)
    model = scripted(tmp_path, [{"text": "hi"}])
    created: set[str] = set()
    for _ in range(4):
        sessions = await asyncio.gather(*(client.create(deep, model, system_prompt="p" * 7000) for _ in range(100)))
        created.update(s.session_id for s in sessions)

    listed: list[str] = []
    token = ""
    async with grpc.aio.insecure_channel(client.address) as default_limits:
        stub = session_pb2_grpc.SessionServiceStub(default_limits)
        for _ in range(10):
            page = await stub.ListSessions(session_pb2.ListSessionsRequest(page_size=1000, page_token=token),
                                           timeout=10)
            assert page.ByteSize() <= 3 * 1024 * 1024
            listed += [s.session_id for s in page.sessions]
            token = page.next_page_token
            if not token:
                break
    assert len(listed) == len(created) and set(listed) == created


def _token(keys_json: bytes) -> str:
    return base64.urlsafe_b64encode(keys_json).decode()


# Tokens of well-formed JSON whose keys no server issues: a creation time past a float (float()
# raised OverflowError: UNKNOWN), a session id with a lone surrogate (SQLite could not encode it:
# an INVALID_ARGUMENT blaming page_size), creation times that are not numbers (an empty page).
FORGED_TOKENS = [_token(b'[1' + b'0' * 400 + b', "s_1"]'), _token(b'[1, "\\ud800"]'), _token(b'[NaN, "s_1"]'),
                 _token(b'[1e999, "s_1"]')]


@pytest.mark.parametrize(
    ("page_size", "page_token", "field"),
    [(2, "not-a-token", "page_token"), (2, "W10=", "page_token"), (-1, "", "page_size"), (1001, "", "page_size"),
     (2, NESTED_TOKEN, "page_token"), *((2, token, "page_token") for token in FORGED_TOKENS)],
)
async def test_list_sessions_rejects_bad_paging(client: Client, page_size: int, page_token: str, field: str) -> None:
    request = session_pb2.ListSessionsRequest(page_size=page_size, page_token=page_token)
    error = await rpc_error(client.sessions.ListSessions(request, timeout=10))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata == {"field": field}
    if field == "page_token":
        assert "next_page_token" in error.message


async def test_get_messages_pages_in_history_order(client: Client, workspace: Path, tmp_path: Path) -> None:
    model = scripted(
        tmp_path,
        [
            {"text": "Reading.", "tool_calls": [call("read", file_path="a.txt"), call("grep", pattern="needle")]},
            {"text": "Done."},
        ],
    )
    session = await client.create(workspace, model)
    await client.send(session.session_id, "look")
    assert (await client.get(session.session_id)).message_count == 5

    pages, token = [], ""
    for _ in range(10):
        response = await client.messages(session.session_id, page_size=2, page_token=token)
        pages.append(list(response.messages))
        token = response.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    messages = [m for page in pages for m in page]
    assert [m.index for m in messages] == [1, 2, 3, 4, 5]
    assert messages == await client.history(session.session_id)
    assert [m.role for m in messages] == [
        session_pb2.MESSAGE_ROLE_USER,
        session_pb2.MESSAGE_ROLE_ASSISTANT,
        session_pb2.MESSAGE_ROLE_TOOL,
        session_pb2.MESSAGE_ROLE_TOOL,
        session_pb2.MESSAGE_ROLE_ASSISTANT,
    ]

    # A token is the index of the page's first message (session.proto): one a client writes
    # starts there, and one past the end gives an empty last page.
    written = await client.messages(session.session_id, page_size=2, page_token="3")
    assert [m.index for m in written.messages] == [4, 5] and written.next_page_token == ""
    past = await client.messages(session.session_id, page_token="99")
    assert list(past.messages) == [] and past.next_page_token == ""
    for bad in ("abc", "-1", "1" * 19, "\u0663"):
        error = await rpc_error(client.messages(session.session_id, page_size=2, page_token=bad))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.metadata == {"field": "page_token"}
    error = await rpc_error(client.messages(session.session_id, page_size=5000))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata == {"field": "page_size"}


@pytest.mark.parametrize("method", ["GetSession", "WatchEvents"])
async def test_a_request_that_does_not_parse_is_invalid(client: Client, method: str) -> None:
    """A string field of bad UTF-8 failed in the request's deserializer: UNKNOWN, and a traceback
    logged per call."""
    path = f"/codelane.v1.SessionService/{method}"
    channel = client.channel
    call = channel.unary_stream(path) if method == "WatchEvents" else channel.unary_unary(path)
    session_id_of_bad_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (session_id), 2 bytes
    error = await rpc_error(collect(call(session_id_of_bad_utf8, timeout=10)) if method == "WatchEvents"
                            else call(session_id_of_bad_utf8, timeout=10))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_ARGUMENT"
    assert f"{method}Request" in error.message and "UTF-8" in error.message
