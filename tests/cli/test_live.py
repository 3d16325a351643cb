"""The live view's renderer, fed events directly and rendered to a string by a forced terminal."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from codelane import events as ev
from codelane.live import LiveRenderer

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _base(seq: int) -> dict:
    return {"session_id": "s_1", "sequence": seq, "time": 0.0, "turn_id": "t_1"}


def _call(call_id: str, tool: str, lane: str = "query", args: str = '{"path": "."}') -> ev.ToolCall:
    return ev.ToolCall(call_id, tool, args, lane, 0)


def _started(seq: int, call_id: str, tool: str, worker: str = "w1", attempt: int = 1, lane: str = "query"):
    return ev.ToolCallStarted(**_base(seq), call=_call(call_id, tool, lane), lane=lane, worker_id=worker,
                              attempt=attempt)


def _finished(seq: int, call_id: str, tool: str, *, error: bool = False, worker: str = "w1", run_time: float = 0.012):
    result = ev.ToolResult("out", is_error=error, worker_id=worker, run_time=run_time)
    return ev.ToolCallFinished(**_base(seq), call_id=call_id, tool_name=tool, result=result, run_time=run_time)


def make() -> tuple[LiveRenderer, io.StringIO, Console, FakeClock]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system="truecolor")
    clock = FakeClock()
    return LiveRenderer(console, clock=clock), out, console, clock


def live_area(renderer: LiveRenderer) -> str:
    """The live area as it would be drawn now, without colours."""
    buffer = io.StringIO()
    Console(file=buffer, force_terminal=True, width=120).print(renderer)
    return ANSI.sub("", buffer.getvalue())


def test_table_and_progress_update_as_calls_run() -> None:
    view, out, _, clock = make()
    view.show(ev.TurnStarted(**_base(1), user_text="look around"))
    view.show(ev.TextDelta(**_base(2), text="Let me look.\nThen I'll ", step=0))
    area = live_area(view)
    assert "Then I'll" in area and "Let me look." not in area  # finished lines leave the live area
    assert "waiting for the model · 0 running · 0 done · 0 failed" in area
    assert "Let me look." in ANSI.sub("", out.getvalue())

    view.show(_started(3, "c1", "grep", worker="w1"))
    view.show(_started(4, "c2", "read", worker="w2"))
    view.show(_started(5, "c3", "glob", worker="w1"))
    clock.now += 0.25
    view.show(_finished(6, "c2", "read", worker="w2"))
    view.show(_finished(7, "c3", "glob", error=True))
    area = live_area(view)
    assert "Then I'll" not in area  # the text was committed when the first call started
    assert "1 running · 1 done · 1 failed" in area
    lines = [line.split() for line in area.splitlines()]
    assert ["tool", "lane", "worker", "status", "attempt", "duration", "arguments"] in lines
    assert ["grep", "query", "w1", "running", "1", "250", "ms", '{"path":', '"."}'] in lines
    assert ["read", "query", "w2", "ok", "1", "12", "ms", '{"path":', '"."}'] in lines
    assert ["glob", "query", "w1", "error", "1", "12", "ms", '{"path":', '"."}'] in lines
    assert "0.25 s" not in area and "250 ms" in area


def test_retries_show_in_the_row_and_the_progress_line() -> None:
    view, _, _, _ = make()
    view.show(ev.TurnStarted(**_base(1), user_text="x"))
    view.show(_started(2, "c1", "grep", worker="w1"))
    view.show(ev.WorkerLost(**_base(3), worker_id="w1", reason="heartbeat timeout", call_ids=("c1",)))
    view.show(ev.CallRetried(**_base(4), call_id="c1", attempt=2, reason="worker w1 lost", previous_worker_id="w1"))
    area = live_area(view)
    assert ["grep", "query", "w1", "retried", "2", "↻"] == area.splitlines()[1].split()[:6]
    assert "1 running · 0 done · 0 failed · 1 retried" in area
    view.show(_started(5, "c1", "grep", worker="w2", attempt=2))
    view.show(_finished(6, "c1", "grep", worker="w2"))
    area = live_area(view)
    assert ["grep", "query", "w2", "ok", "2", "↻"] == area.splitlines()[1].split()[:6]
    assert "0 running · 1 done · 0 failed · 1 retried" in area


def _two_step_turn(response_first: bool) -> list[ev.Event]:
    """A turn of three steps (grep; a failing edit; the last word). The server may send a step's
    ModelResponded before its calls run or after they all finished: the view handles both."""

    def step(number: int, text: str, calls: list[tuple[str, str, str]]) -> list[ev.Event]:
        response = ev.ModelResponded(**_base(0), step=number,
                                     tool_calls=tuple(_call(c, tool, lane) for c, tool, lane in calls))
        run: list[ev.Event] = []
        for call_id, tool, lane in calls:
            worker = "local" if lane == "execute" else "w1"
            run.append(_started(0, call_id, tool, worker=worker, lane=lane))
            run.append(_finished(0, call_id, tool, worker=worker, error=tool == "edit"))
        delta = ev.TextDelta(**_base(0), text=text, step=number)
        return [delta, response, *run] if response_first else [delta, *run, response]

    return [
        ev.TurnStarted(**_base(0), user_text="fix it"),
        *step(0, "Looking.", [("c1", "grep", "query")]),
        *step(1, "Editing.", [("c2", "edit", "execute")]),
        *step(2, "Done.", []),
    ]


@pytest.mark.parametrize("response_first", [True, False], ids=["response-then-calls", "calls-then-response"])
def test_steps_are_committed_and_the_turn_summarised(response_first: bool) -> None:
    view, out, _, clock = make()
    turn = _two_step_turn(response_first)
    for event in turn[:5]:  # the turn's start and its first step, whole
        view.show(event)
    assert "grep" in live_area(view)  # its table stays live until the next step shows up
    view.show(turn[5])
    assert "grep" not in live_area(view) and "grep" in ANSI.sub("", out.getvalue())
    for event in turn[6:]:
        view.show(event)
    clock.now += 2.5
    view.show(ev.TurnFinished(**_base(12), stop_reason="end_turn", usage=ev.Usage(120, 30), model_requests=3,
                              tool_calls=2, final_text="Done."))
    printed = ANSI.sub("", out.getvalue())
    order = [printed.index(s) for s in ("> fix it", "Looking.", "grep", "Editing.", "edit", "Done.", "turn finished")]
    assert order == sorted(order), printed
    assert printed.count("arguments") == 2  # one table per step
    summary = printed.strip().splitlines()[-1]
    assert summary == ("turn finished: end_turn · 3 model request(s) · 2 tool call(s) (1 failed) · "
                       "tokens in 120 out 30 · 2.5 s")
    assert live_area(view).strip() == ""  # nothing left to update
    assert "\x1b[" in out.getvalue()  # a forced terminal gets styles


def test_calls_cut_short_by_a_cancel_show_as_cancelled() -> None:
    view, out, _, _ = make()
    view.show(ev.TurnStarted(**_base(1), user_text="x"))
    view.show(_started(2, "c1", "bash", worker="local", lane="execute"))
    view.show(ev.TurnFinished(**_base(3), stop_reason="cancelled", model_requests=1))
    printed = ANSI.sub("", out.getvalue())
    assert ["bash", "execute", "local", "cancelled"] in [line.split()[:4] for line in printed.splitlines()]
    assert "turn finished: cancelled" in printed


def test_confirmation_rows_and_notices() -> None:
    view, out, _, _ = make()
    view.show(ev.TurnStarted(**_base(1), user_text="x"))
    view.show(ev.ConfirmationRequired(**_base(2), call=_call("c1", "bash", "execute", '{"command": "ls"}')))
    area = live_area(view)
    assert ["bash", "execute", "confirm?"] == area.splitlines()[1].split()[:3]
    assert "1 running" in area
    view.show(ev.ConfirmationResolved(**_base(3), call_id="c1", outcome="approved"))
    assert "confirmation of c1: approved" in ANSI.sub("", out.getvalue())
    assert ["bash", "execute", "approved"] == live_area(view).splitlines()[1].split()[:3]


@pytest.mark.parametrize(("outcome", "status"), [("rejected", "rejected"), ("timed_out_rejected", "rejected"),
                                                 ("timed_out_approved", "approved"), ("cancelled", "cancelled")])
def test_a_resolved_confirmation_shows_its_outcome(outcome: str, status: str) -> None:
    view, out, _, _ = make()
    view.show(ev.TurnStarted(**_base(1), user_text="x"))
    view.show(ev.ConfirmationRequired(**_base(2), call=_call("c1", "bash", "execute", '{"command": "ls"}')))
    view.show(ev.ConfirmationResolved(**_base(3), call_id="c1", outcome=outcome, reason="why"))
    assert ["bash", "execute", status] == live_area(view).splitlines()[1].split()[:3]
    assert f"confirmation of c1: {outcome.replace('_', ' ')} (why)" in ANSI.sub("", out.getvalue())


def test_the_live_area_runs_and_stops_on_a_terminal() -> None:
    view, out, _, _ = make()
    with view:
        view.show(ev.TurnStarted(**_base(1), user_text="hello"))
        view.show(_started(2, "c1", "grep"))
        with view.pause():
            pass
        view.show(_finished(3, "c1", "grep"))
        view.show(ev.ModelResponded(**_base(4), step=0, tool_calls=(_call("c1", "grep"),)))
        view.show(ev.TurnFinished(**_base(5), stop_reason="end_turn", model_requests=1, tool_calls=1))
    printed = ANSI.sub("", out.getvalue())
    assert "> hello" in printed and "turn finished: end_turn" in printed
    assert "\x1b[?25l" in out.getvalue() and "\x1b[?25h" in out.getvalue()  # cursor hidden, then restored


def test_an_interrupted_turn_leaves_its_step_on_screen() -> None:
    view, out, _, _ = make()
    with view:
        view.show(ev.TurnStarted(**_base(1), user_text="x"))
        view.show(ev.TextDelta(**_base(2), text="Half a thought", step=0))
        view.show(_started(3, "c1", "bash", worker="local", lane="execute"))
    printed = ANSI.sub("", out.getvalue())
    assert "Half a thought" in printed
    assert ["bash", "execute", "local", "running"] in [line.split()[:4] for line in printed.splitlines()]


def test_events_and_refreshes_from_two_threads_do_not_deadlock(monkeypatch) -> None:
    import threading

    from codelane import live

    monkeypatch.setattr(live, "REFRESH_PER_SECOND", 500)  # rich's refresh thread, as busy as it gets
    view, out, _, _ = make()

    def feed() -> None:
        with view:
            view.show(ev.TurnStarted(**_base(1), user_text="x"))
            seq = 2
            for step in range(40):
                view.show(ev.TextDelta(**_base(seq), text=f"step {step}\n", step=step))
                for i in range(5):
                    view.show(_started(seq + 1 + i, f"c{step}_{i}", "read"))
                for i in range(5):
                    view.show(_finished(seq + 6 + i, f"c{step}_{i}", "read"))
                view.show(ev.ModelResponded(**_base(seq + 11), step=step))
                seq += 12
            view.show(ev.TurnFinished(**_base(seq), stop_reason="end_turn", model_requests=40, tool_calls=200))

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    feeder.join(30)
    assert not feeder.is_alive(), "the live view deadlocked"
    assert "200 tool call(s)" in ANSI.sub("", out.getvalue())
