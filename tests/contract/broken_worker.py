"""A tool worker that breaks one rule of the worker protocol, for the conformance kit to catch.

    python -m tests.contract.broken_worker --connect HOST:PORT --fault wrong-dispatch-id|no-heartbeat

It speaks the protocol from the raw stubs (as a stranger's worker would) and does everything else
right: Hello, heartbeats at Welcome's interval, every Assign answered, a refused
token ends it with status 3. When the hub ends its stream it prints the status and ErrorInfo
reason to stderr. Its fault:
- wrong-dispatch-id: each CallResult names a dispatch id the hub never gave;
- no-heartbeat: it never sends a Heartbeat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import grpc

from codelane.v1 import tools_pb2, worker_pb2, worker_pb2_grpc
from tool_worker import wire
from tool_worker.worker import status_line

FAULTS = ("wrong-dispatch-id", "no-heartbeat")
SPEC = tools_pb2.ToolSpec(name="echo", description="Echo the text.", lane=tools_pb2.LANE_QUERY, idempotent=True,
                          parameters_json_schema='{"type": "object", "properties": {"text": {"type": "string"}}, '
                                                 '"required": ["text"]}')


async def serve(address: str, token: str, fault: str) -> int:
    outbox: asyncio.Queue[worker_pb2.ConnectRequest] = asyncio.Queue()
    await outbox.put(worker_pb2.ConnectRequest(hello=worker_pb2.Hello(
        worker_id=f"broken-{os.getpid()}", version="0", tools=[SPEC], slots=2)))

    async def requests():
        while True:
            yield await outbox.get()

    async with grpc.aio.insecure_channel(address) as channel:
        stream = worker_pb2_grpc.WorkerHubServiceStub(channel).Connect(
            requests(), metadata=[("authorization", f"Bearer {token}")])
        beating = None
        try:
            async for message in stream:
                kind = message.WhichOneof("message")
                if kind == "welcome" and fault != "no-heartbeat":
                    beating = asyncio.create_task(heartbeat(outbox, wire.seconds(message.welcome.heartbeat_interval)))
                elif kind == "assignments":
                    answers = worker_pb2.CallResults()
                    for assign in message.assignments.assigns:
                        dispatch_id = assign.dispatch_id
                        if fault == "wrong-dispatch-id":
                            dispatch_id = f"not-{dispatch_id}"
                        answers.results.add(call_id=assign.call_id, attempt=assign.attempt, dispatch_id=dispatch_id,
                                            result=tools_pb2.ToolResult(output=assign.arguments_json))
                    await outbox.put(worker_pb2.ConnectRequest(results=answers))
        except grpc.aio.AioRpcError as exc:
            print(f"the hub ended the stream: {status_line(exc)}", file=sys.stderr, flush=True)
            return 3 if exc.code() == grpc.StatusCode.UNAUTHENTICATED else 1
        finally:
            if beating is not None:
                beating.cancel()
    return 1


async def heartbeat(outbox: asyncio.Queue, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await outbox.put(worker_pb2.ConnectRequest(heartbeat=worker_pb2.Heartbeat()))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connect", required=True)
    parser.add_argument("--fault", choices=FAULTS, required=True)
    args = parser.parse_args()
    return asyncio.run(serve(args.connect, os.environ.get("CODELANE_WORKER_TOKEN", ""), args.fault))


if __name__ == "__main__":
    sys.exit(main())
