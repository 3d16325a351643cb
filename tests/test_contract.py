"""The codelane.v1 contract: stubs import, every message round-trips, services are complete."""

from __future__ import annotations

import importlib

import pytest
from google.protobuf import descriptor, message_factory

MODULES = ["tools", "events", "session", "worker", "admin"]

EXPECTED_RPCS = {
    "codelane.v1.SessionService": {
        "CreateSession", "GetSession", "ListSessions", "DeleteSession", "SendMessage", "WatchEvents",
        "CancelTurn", "ConfirmToolCall", "ClaimExternalTasks", "CompleteExternalTask",
        "RenewExternalTaskLease", "GetMessages",
    },
    "codelane.v1.WorkerHubService": {"Connect"},
    "codelane.v1.AdminService": {"ListWorkers", "DrainWorker", "GetQueueStats", "GetServerInfo"},
}


def _pb2(name: str):
    return importlib.import_module(f"codelane.v1.{name}_pb2")


def _all_messages() -> list[descriptor.Descriptor]:
    found: list[descriptor.Descriptor] = []

    def walk(desc: descriptor.Descriptor) -> None:
        if desc.GetOptions().map_entry:
            return
        found.append(desc)
        for nested in desc.nested_types:
            walk(nested)

    for name in MODULES:
        for desc in _pb2(name).DESCRIPTOR.message_types_by_name.values():
            walk(desc)
    return found


def _fill(msg, depth: int = 0) -> None:
    """Set every field (and one member of each oneof in turn is covered by _oneof_variants)."""
    for field in msg.DESCRIPTOR.fields:
        if field.containing_oneof is not None and not field.containing_oneof.name.startswith("_"):
            continue
        _set_field(msg, field, depth)


def _set_field(msg, field: descriptor.FieldDescriptor, depth: int) -> None:
    fd = descriptor.FieldDescriptor
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_field, value_field = field.message_type.fields
        key = "k" if key_field.type == fd.TYPE_STRING else 7
        target = getattr(msg, field.name)
        if value_field.message_type is not None:
            if depth < 3:
                _fill(target[key], depth + 1)
        else:
            target[key] = _scalar(value_field)
        return
    if field.type == fd.TYPE_MESSAGE:
        if depth >= 3:
            return
        if field.is_repeated:
            _fill(getattr(msg, field.name).add(), depth + 1)
        else:
            sub = getattr(msg, field.name)
            sub.SetInParent()
            _fill(sub, depth + 1)
        return
    value = _scalar(field)
    if field.is_repeated:
        getattr(msg, field.name).append(value)
    else:
        setattr(msg, field.name, value)


def _scalar(field: descriptor.FieldDescriptor):
    fd = descriptor.FieldDescriptor
    if field.type == fd.TYPE_ENUM:
        return field.enum_type.values[-1].number
    if field.type == fd.TYPE_STRING:
        return f"{field.name}-\u00e9\u4e2d"
    if field.type == fd.TYPE_BOOL:
        return True
    if field.type in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
        return 1.5
    if field.type == fd.TYPE_BYTES:
        return b"\x00\xff"
    # int64 sequences must survive values beyond 2**53 (why ids are typed, not JSON numbers).
    if field.type in (fd.TYPE_INT64, fd.TYPE_UINT64, fd.TYPE_SINT64):
        return 2**60 + 1
    return 42


@pytest.mark.parametrize("desc", _all_messages(), ids=lambda d: d.full_name)
def test_every_message_round_trips(desc: descriptor.Descriptor) -> None:
    cls = message_factory.GetMessageClass(desc)
    variants = [None] + [f for oneof in desc.oneofs if not oneof.name.startswith("_") for f in oneof.fields]
    for oneof_field in variants:
        msg = cls()
        _fill(msg)
        if oneof_field is not None:
            _set_field(msg, oneof_field, 0)
        data = msg.SerializeToString()
        again = cls.FromString(data)
        assert again == msg
        assert again.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True)


def test_services_have_every_rpc() -> None:
    services = {}
    for name in MODULES:
        services.update(
            {s.full_name: {m.name for m in s.methods} for s in _pb2(name).DESCRIPTOR.services_by_name.values()}
        )
    assert services == EXPECTED_RPCS


def test_grpc_stubs_import() -> None:
    for name in ("session", "worker", "admin"):
        grpc_module = importlib.import_module(f"codelane.v1.{name}_pb2_grpc")
        stubs = [attr for attr in dir(grpc_module) if attr.endswith("Stub")]
        assert stubs, f"no stub in {name}_pb2_grpc"


def test_tool_arguments_are_json_strings_not_struct() -> None:
    for desc in _all_messages():
        for field in desc.fields:
            if field.message_type is not None:
                assert field.message_type.full_name != "google.protobuf.Struct", field.full_name


def test_event_kinds_cover_the_contract() -> None:
    event = _pb2("events").Event.DESCRIPTOR
    kinds = {f.name for f in event.oneofs_by_name["kind"].fields}
    assert {
        "turn_started", "text_delta", "tool_call_started", "tool_call_finished", "confirmation_required",
        "confirmation_resolved", "external_task_pending", "external_task_completed", "call_retried",
        "worker_lost", "turn_finished", "error",
    } <= kinds
    assert event.fields_by_name["sequence"].type == descriptor.FieldDescriptor.TYPE_INT64
