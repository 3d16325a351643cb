"""The peers of `codelane bench`: other ways to run one model response's tool calls, on the same
workloads and the same tool functions (codelane's implementations, called in-process through
`ToolRegistry.execute`, and the plugin `sleep`). No model is involved: each peer is handed the
workload's calls as its own framework represents them, and `wall` is the time its tool-executing
code path takes, from handing over the calls to having every result.

- `langgraph`: a `langgraph.prebuilt.ToolNode` in the smallest compiled graph (START -> tools ->
  END over MessagesState; LangGraph 1.x runs a ToolNode only inside a graph), invoked with a
  state whose last message is an AIMessage carrying the calls: one superstep, in which ToolNode
  runs the calls with `asyncio.gather` (what the "tools" step of a LangGraph agent does). Tools
  are `StructuredTool`s with codelane's JSON schemas.
- `openai-agents`: the OpenAI Agents SDK's own function-tool executor,
  `agents.run_internal.tool_execution.execute_function_tool_calls` (what `Runner` calls after a
  model response), over `FunctionTool`s whose `on_invoke_tool` calls the codelane tool. It makes
  one asyncio task per call (no concurrency limit by default) and includes the SDK's per-call
  bookkeeping: tool context, hooks, guardrail checks, result items. Tracing is disabled.
- `ray`: a local Ray cluster (`ray.init(num_cpus=2, include_dashboard=False)`), one Ray task per
  call wrapping the tool; tasks ask for 1 CPU each (Ray's default), so at most 2 run at once.
- `ray-8`: the same with `num_cpus=0.25` per task: 8 at once, like 8 codelane slots. The cluster
  keeps 8 worker processes warm (`num_workers_soft_limit=8`); Ray's default of num_cpus (2) has it
  kill the 6 extra workers after a second idle and start them again for the next batch, which
  costs seconds per run and measures Python start-up, not Ray.

None of them orders calls: every call of M starts at once, writes included (see `order_ok`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.bench_codelane import RunRecord
from benchmarks.bench_workloads import Workload, bench_registry, canonical, signature
from tool_worker.registry import ToolRegistry

PEER_NAMES = ("langgraph", "openai-agents", "ray", "ray-8")
RAY_WARM_WORKERS = 8
_ray_temp_dir: str | None = None

_registry: ToolRegistry | None = None


def _shared_registry() -> ToolRegistry:
    global _registry
    if _registry is None:
        _registry = bench_registry()
    return _registry


class _CallLog:
    """What the tool functions saw: (tool, arguments, output, is_error, entered, run_time)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any], str, bool, float, float]] = []

    async def call(self, name: str, workspace: Path, arguments: dict[str, Any]) -> str:
        entered = time.perf_counter()
        result = await _shared_registry().execute(name, workspace, json.dumps(arguments))
        self.entries.append((name, arguments, result.output, result.is_error, entered, result.run_time))
        return result.output


def _record(log_entries: Sequence[tuple[str, dict[str, Any], str, bool, float, float]], workload: Workload,
            started: float, wall: float) -> RunRecord:
    problems = []
    if len(log_entries) != len(workload.calls):
        problems.append(f"{len(log_entries)} calls executed, the workload has {len(workload.calls)}")
    return RunRecord(
        wall=wall,
        calls=len(log_entries),
        signature=signature(canonical(name, args) for name, args, *_ in log_entries),
        errors=sum(1 for e in log_entries if e[3]),
        order_ok=workload.order_ok([(name, args, out, err) for name, args, out, err, _, _ in log_entries]),
        run_times=[e[5] for e in log_entries],
        queue_waits=[max(0.0, e[4] - started) for e in log_entries],
        problems=problems,
    )


class Peer:
    name = ""
    package = ""
    description = ""

    def concurrency(self, workload: Workload) -> int:
        return len(workload.calls)

    @property
    def version(self) -> str:
        try:
            return metadata.version(self.package)
        except metadata.PackageNotFoundError:
            return ""

    async def start(self, workloads: Sequence[Workload]) -> None:
        raise NotImplementedError

    async def run(self, workload: Workload) -> RunRecord:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class LangGraphPeer(Peer):
    name = "langgraph"
    package = "langgraph"
    description = "ToolNode in a START->tools->END graph, ainvoke (asyncio.gather over the calls)"

    async def start(self, workloads: Sequence[Workload]) -> None:
        from langchain_core.messages import AIMessage
        from langchain_core.tools import StructuredTool
        from langgraph.graph import END, START, MessagesState, StateGraph
        from langgraph.prebuilt import ToolNode

        self._nodes: dict[str, tuple[Any, _CallLog]] = {}
        self._inputs: dict[str, dict[str, Any]] = {}
        registry = _shared_registry()
        for workload in workloads:
            log = _CallLog()
            tools = []
            for name in sorted({c.name for c in workload.calls}):
                spec = registry.get(name).spec  # type: ignore[union-attr]
                tools.append(StructuredTool.from_function(
                    coroutine=_bound(log, name, workload.workspace), name=name, description=spec.description,
                    args_schema=dict(spec.parameters),
                ))
            # ToolNode needs a graph's runtime: the smallest graph an agent's tools step runs in.
            graph = StateGraph(MessagesState)
            graph.add_node("tools", ToolNode(tools))
            graph.add_edge(START, "tools")
            graph.add_edge("tools", END)
            self._nodes[workload.key] = (graph.compile(), log)
            message = AIMessage(content="", tool_calls=[
                {"name": c.name, "args": c.arguments, "id": f"call_{i}", "type": "tool_call"}
                for i, c in enumerate(workload.calls)
            ])
            self._inputs[workload.key] = {"messages": [message]}

    async def run(self, workload: Workload) -> RunRecord:
        node, log = self._nodes[workload.key]
        log.entries.clear()
        workload.reset()
        started = time.perf_counter()
        output = await node.ainvoke(self._inputs[workload.key])
        wall = time.perf_counter() - started
        record = _record(log.entries, workload, started, wall)
        if len(output["messages"]) != len(workload.calls) + 1:  # the AIMessage, then one ToolMessage per call
            record.problems.append(f"the graph returned {len(output['messages'])} messages")
        return record


def _bound(log: _CallLog, name: str, workspace: Path):
    async def run_tool(**arguments: Any) -> str:
        return await log.call(name, workspace, arguments)

    return run_tool


class OpenAIAgentsPeer(Peer):
    name = "openai-agents"
    package = "openai-agents"
    description = "agents.run_internal.tool_execution.execute_function_tool_calls over FunctionTools"

    async def start(self, workloads: Sequence[Workload]) -> None:
        from agents import Agent, FunctionTool, RunConfig, RunContextWrapper, RunHooks, set_tracing_disabled
        from agents.run_internal.agent_bindings import bind_public_agent
        from agents.run_internal.run_steps import ToolRunFunction
        from agents.run_internal.tool_execution import execute_function_tool_calls
        from openai.types.responses import ResponseFunctionToolCall

        set_tracing_disabled(True)
        self._execute = execute_function_tool_calls
        self._hooks = RunHooks
        self._context = RunContextWrapper
        self._config = RunConfig
        self._bind = bind_public_agent
        self._setups: dict[str, tuple[Any, list[tuple[Any, Any]], _CallLog]] = {}
        registry = _shared_registry()
        for workload in workloads:
            log = _CallLog()
            tools = {}
            for name in sorted({c.name for c in workload.calls}):
                spec = registry.get(name).spec  # type: ignore[union-attr]
                tools[name] = FunctionTool(
                    name=name, description=spec.description, params_json_schema=dict(spec.parameters),
                    on_invoke_tool=_invoker(log, name, workload.workspace), strict_json_schema=False,
                )
            agent = Agent(name=f"bench-{workload.key}", tools=list(tools.values()))
            calls = [
                (ResponseFunctionToolCall(type="function_call", call_id=f"call_{i}", name=c.name,
                                          arguments=c.arguments_json), tools[c.name])
                for i, c in enumerate(workload.calls)
            ]
            self._setups[workload.key] = (agent, calls, log)
        self._tool_run = ToolRunFunction

    async def run(self, workload: Workload) -> RunRecord:
        agent, calls, log = self._setups[workload.key]
        log.entries.clear()
        workload.reset()
        runs = [self._tool_run(tool_call=call, function_tool=tool) for call, tool in calls]
        started = time.perf_counter()
        results, _, _ = await self._execute(
            bindings=self._bind(agent), tool_runs=runs, hooks=self._hooks(),
            context_wrapper=self._context(context=None), config=self._config(tracing_disabled=True),
        )
        wall = time.perf_counter() - started
        record = _record(log.entries, workload, started, wall)
        if len(results) != len(workload.calls):
            record.problems.append(f"the SDK returned {len(results)} results")
        return record


def _invoker(log: _CallLog, name: str, workspace: Path):
    async def on_invoke_tool(_ctx: Any, arguments_json: str) -> str:
        return await log.call(name, workspace, json.loads(arguments_json or "{}"))

    return on_invoke_tool


def _ray_tool(name: str, workspace: str, arguments_json: str) -> tuple[str, bool, float, float]:
    """A Ray task: one codelane tool call in a Ray worker process."""
    entered = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes of one machine
    result = asyncio.run(_shared_registry().execute(name, Path(workspace), arguments_json))
    return result.output, result.is_error, entered, result.run_time


class RayPeer(Peer):
    name = "ray"
    package = "ray"
    description = "one Ray task per call, 1 CPU each, on ray.init(num_cpus=2)"
    cpus_per_task = 1.0
    cluster_cpus = 2

    def concurrency(self, workload: Workload) -> int:
        return min(len(workload.calls), int(self.cluster_cpus / self.cpus_per_task))

    async def start(self, workloads: Sequence[Workload]) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        self._ray = ray
        if not ray.is_initialized():
            global _ray_temp_dir
            # Ray's sockets and logs go to a directory of ours, removed by shutdown() (not /tmp/ray).
            _ray_temp_dir = tempfile.mkdtemp(prefix="codelane-bench-ray-")
            ray.init(
                _temp_dir=_ray_temp_dir,
                num_cpus=self.cluster_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                log_to_driver=False, logging_level=logging.WARNING, configure_logging=True,
                # Keep 8 worker processes warm for ray-8: by default Ray kills idle workers beyond
                # num_cpus after a second and starts them again for the next batch (seconds each).
                _system_config={"num_workers_soft_limit": RAY_WARM_WORKERS},
            )
        self._task = ray.remote(_ray_tool).options(num_cpus=self.cpus_per_task)

    async def run(self, workload: Workload) -> RunRecord:
        workload.reset()
        started = time.perf_counter()
        refs = [self._task.remote(c.name, str(workload.workspace), c.arguments_json) for c in workload.calls]
        outputs = await asyncio.gather(*refs)
        wall = time.perf_counter() - started
        entries = [
            (c.name, c.arguments, out, err, entered, run_time)
            for c, (out, err, entered, run_time) in zip(workload.calls, outputs, strict=True)
        ]
        return _record(entries, workload, started, wall)



class Ray8Peer(RayPeer):
    name = "ray-8"
    cpus_per_task = 0.25
    description = "one Ray task per call, 0.25 CPU each (8 at once), on ray.init(num_cpus=2)"


_PEERS: dict[str, type[Peer]] = {
    "langgraph": LangGraphPeer,
    "openai-agents": OpenAIAgentsPeer,
    "ray": RayPeer,
    "ray-8": Ray8Peer,
}


def make_peer(name: str) -> Peer:
    if name not in _PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEER_NAMES)}")
    return _PEERS[name]()


def shutdown() -> None:
    """Stops the local Ray cluster if a peer started one (ray and ray-8 share it)."""
    global _ray_temp_dir
    ray = sys.modules.get("ray")
    if ray is not None:
        with contextlib.suppress(Exception):
            if ray.is_initialized():
                ray.shutdown()
    if _ray_temp_dir is not None:
        shutil.rmtree(_ray_temp_dir, ignore_errors=True)
        _ray_temp_dir = None
