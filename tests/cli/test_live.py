"""The live view's renderer, fed events directly and rendered to a string by a forced terminal."""

from __future__ import annotations

import io
import json
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


def _indexed(call_id: str, tool: str, index: int, lane: str = "query", args: str = '{"path": "."}') -> ev.ToolCall:
    return ev.ToolCall(call_id, tool, args, lane, index)


def test_calls_behind_an_execute_call_show_as_queued_in_model_order() -> None:
    view, out, _, _ = make()
    calls = (_indexed("c1", "read", 0), _indexed("c2", "edit", 1, "execute", '{"file_path": "a"}'),
             _indexed("c3", "read", 2), _indexed("c4", "grep", 3))
    view.show(ev.TurnStarted(**_base(1), user_text="x"))
    view.show(ev.ToolCallStarted(**_base(2), call=calls[0], lane="query", worker_id="w1"))
    view.show(ev.ModelResponded(**_base(3), step=0, tool_calls=calls))
    view.show(ev.ToolCallStarted(**_base(4), call=calls[1], lane="execute", worker_id="local"))
    area = live_area(view)
    rows = [line.split() for line in area.splitlines()[1:5]]
    assert [r[0] for r in rows] == ["read", "edit", "read", "grep"]  # the model's order, not the start order
    assert rows[0][:4] == ["read", "query", "w1", "running"] and rows[1][:4] == ["edit", "execute", "local", "running"]
    assert rows[2][:3] == ["read", "query", "queued"] and rows[3][:3] == ["grep", "query", "queued"]  # no worker yet
    assert "2 queued · 2 running · 0 done · 0 failed" in area
    view.show(ev.ToolCallFinished(**_base(5), call_id="c2", tool_name="edit",
                                  result=ev.ToolResult("x", is_error=True, error_kind="cancelled")))
    view.show(ev.TurnFinished(**_base(6), stop_reason="cancelled", model_requests=1, tool_calls=4))
    printed = ANSI.sub("", out.getvalue())
    for tool in ("edit", "read", "grep"):  # what had not run is cancelled with the turn
        assert re.search(rf"{tool}\s+(\S+\s+)*cancelled", printed), printed


@pytest.mark.parametrize(("kind", "confirmed", "status"), [
    ("cancelled", None, "cancelled"), ("timeout", None, "timed out"), ("permission_denied", None, "denied"),
    ("permission_denied", "rejected", "rejected"), ("permission_denied", "timed_out_rejected", "rejected"),
    ("tool_error", None, "error"),
])  # fmt: skip
def test_finished_calls_say_how_they_ended(kind: str, confirmed: str | None, status: str) -> None:
    view, out, _, _ = make()
    view.show(ev.TurnStarted(**_base(1), user_text="x"))
    call = _call("c1", "bash", "execute", '{"command": "ls"}')
    if confirmed is not None:
        view.show(ev.ConfirmationRequired(**_base(2), call=call, rule="rule ask[0] `bash`"))
        view.show(ev.ConfirmationResolved(**_base(3), call_id="c1", outcome=confirmed))
    else:
        view.show(ev.ToolCallStarted(**_base(2), call=call, lane="execute", worker_id="local"))
    view.show(ev.ToolCallFinished(**_base(4), call_id="c1", tool_name="bash",
                                  result=ev.ToolResult("why", is_error=True, error_kind=kind)))
    row = live_area(view).splitlines()[1]
    assert re.match(rf"bash\s+execute\s+(local\s+)?{status}\s", row), row
    view.show(ev.TurnFinished(**_base(5), stop_reason="end_turn", model_requests=1, tool_calls=1))
    summary = ANSI.sub("", out.getvalue()).strip().splitlines()[-1]
    counted = {"cancelled": "1 cancelled", "denied": "1 refused", "rejected": "1 refused"}.get(status, "1 failed")
    assert f"1 tool call(s) ({counted})" in summary


def test_edits_and_writes_show_a_short_diff() -> None:
    view, out, _, _ = make()
    edit = _call("c1", "edit", "execute", '{"file_path": "app/greet.py", "old_string": "a\\nb\\nc", '
                                          '"new_string": "a\\nB\\nc"}')
    content = "\n".join(f"line {i}" for i in range(20))
    write = _call("c2", "write", "execute", json.dumps({"file_path": "notes.md", "content": content}))
    view.show(ev.TurnStarted(**_base(1), user_text="x"))
    for seq, call in ((2, edit), (4, write)):
        view.show(ev.ToolCallStarted(**_base(seq), call=call, lane="execute", worker_id="local"))
        view.show(ev.ToolCallFinished(**_base(seq + 1), call_id=call.call_id, tool_name=call.tool_name,
                                      result=ev.ToolResult("ok")))
    printed = ANSI.sub("", out.getvalue())
    assert "edit app/greet.py:\n a\n-b\n+B\n c\n" in printed
    assert "write notes.md (20 line(s)):\n+line 0\n" in printed and "+line 11\n… 8 more line(s)\n" in printed
    assert "+line 12" not in printed


def test_the_plain_view_shows_what_a_confirmation_is_for_and_the_diffs() -> None:
    from codelane.render import PlainRenderer

    out = io.StringIO()
    plain = PlainRenderer(out)
    call = _call("c1", "edit", "execute", '{"file_path": "a.txt", "old_string": "old", "new_string": "new"}')
    plain.show(ev.ConfirmationRequired(**_base(4), call=call, deadline=0.0, rule="rule ask[0] `edit`"))
    plain.show(ev.ConfirmationResolved(**_base(5), call_id="c1", outcome="approved", reason="fine"))
    plain.show(ev.ToolCallStarted(**_base(6), call=call, lane="execute", worker_id="local"))
    plain.show(ev.ToolCallFinished(**_base(7), call_id="c1", tool_name="edit", result=ev.ToolResult("Edited")))
    lines = out.getvalue().splitlines()
    assert lines[0] == ('[   4] confirmation required: edit {"file_path": "a.txt", "old_string": "old", "new_string": '
                        '"new"} [c1, rule ask[0] `edit`] until -')
    assert lines[1] == "[   5] confirmation of c1: approved: fine"
    assert lines[-3:] == ["       edit a.txt:", "       -old", "       +new"]


HOSTILE = "title\x1b]0;pwned\x1b\\ red\x1b[31m c1\x9b2J cr\rover bell\x07"
SHOWN = "title\\x1b]0;pwned\\x1b\\ red\\x1b[31m c1\\x9b2J cr\\rover bell\\x07"


def test_what_a_session_sends_reaches_the_terminal_without_its_escape_sequences() -> None:
    # A model's text, and a file's content in a write's diff (the repository's, or the model's),
    # carried escape sequences the terminal obeyed (here: set its title, colour, clear the screen).
    from codelane.render import PlainRenderer

    write = _call("c1", "write", "execute", json.dumps({"file_path": "x.txt", "content": HOSTILE}))
    events = [ev.TurnStarted(**_base(1), user_text="go"), ev.TextDelta(**_base(2), text=HOSTILE, step=0),
              ev.ToolCallStarted(**_base(3), call=write, lane="execute", worker_id="local"),
              ev.ToolCallFinished(**_base(4), call_id="c1", tool_name="write", result=ev.ToolResult(HOSTILE))]
    plain_out = io.StringIO()
    plain = PlainRenderer(plain_out)
    view, live_out, _, _ = make()
    for event in events:
        plain.show(event)
        view.show(event)
    live_text = ANSI.sub("", live_out.getvalue())  # the renderer's own colours, which it may use
    for printed in (plain_out.getvalue(), live_text):
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", printed)
        assert SHOWN in printed
    # The events themselves are untouched: a program (or --json) gets the exact text.
    assert events[1].text == HOSTILE


def test_the_table_shows_a_tool_name_as_the_model_wrote_it() -> None:
    # A model may name a tool that does not exist: `[red]grep` was read as rich markup and shown as
    # `grep`, a call the model did not make.
    view, _, _, _ = make()
    view.show(ev.TurnStarted(**_base(1), user_text="go"))
    view.show(_started(2, "c1", "[red]grep", worker="w[1]"))
    lines = [line.split() for line in live_area(view).splitlines()]
    assert ["[red]grep", "query", "w[1]", "running", "1", "0", "ms", '{"path":', '"."}'] in lines


def test_the_plain_view_quotes_the_users_text_on_one_line_with_each_escape_shown_once() -> None:
    # repr() of text already made safe showed every escape with its backslash doubled (\\x1b).
    from codelane.render import PlainRenderer

    out = io.StringIO()
    PlainRenderer(out).show(ev.TurnStarted(**_base(1), user_text="fix\x1b[31m it\nnow"))
    assert out.getvalue() == "[   1] turn started: 'fix\\x1b[31m it\\nnow'\n"
