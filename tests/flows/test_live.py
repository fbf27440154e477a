"""Live mode under Bytewax: timers fire on the wall clock with no further events."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import cluster_main, run_main

from flows.codec import json_dumps
from flows.experience import Outputs, build_flow
from flows.model import RawRecord
from flows.rules import parse_rules
from flows.settings import load_settings
from state.profiles import InMemoryProfileStore


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Part(StatefulSourcePartition[RawRecord, None]):
    def __init__(self, plan: list[tuple[float, dict[str, Any]]], close_after: float) -> None:
        self.t0 = now_ms()
        self.plan = sorted(plan, key=lambda x: x[0])
        self.end = self.t0 + int(close_after * 1000)
        self.pos = 0

    def next_batch(self) -> list[RawRecord]:
        now = now_ms()
        if now >= self.end:
            raise StopIteration
        out = []
        while self.plan and self.t0 + self.plan[0][0] * 1000 <= now:
            _, ev = self.plan.pop(0)
            ev = {**ev, "ts": now}
            self.pos += 1
            out.append(RawRecord("live-test", self.pos, json_dumps(ev)))
        return out

    def next_awake(self) -> datetime | None:
        nxt = self.t0 + self.plan[0][0] * 1000 if self.plan else self.end
        return datetime.fromtimestamp(min(nxt, self.end) / 1000, tz=UTC)

    def snapshot(self) -> None:
        return None


class ScheduledSource(FixedPartitionedSource[RawRecord, None]):
    """Emits events at planned wall-clock offsets, then stays open, silent, until closed."""

    def __init__(self, plan: list[tuple[float, dict[str, Any]]], close_after: float) -> None:
        self.plan = plan
        self.close_after = close_after

    def list_parts(self) -> list[str]:
        return ["plan"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _Part:
        return _Part(list(self.plan), self.close_after)


class _Rec(StatelessSinkPartition[Any]):
    def __init__(self, got: list[tuple[int, Any]], lock: threading.Lock) -> None:
        self.got = got
        self.lock = lock

    def write_batch(self, items: list[Any]) -> None:
        with self.lock:
            self.got.extend((now_ms(), x) for x in items)


class Recorder(DynamicSink[Any]):
    """Keeps each item with the wall-clock time it reached the sink."""

    def __init__(self) -> None:
        self.got: list[tuple[int, Any]] = []
        self.lock = threading.Lock()

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Rec:
        return _Rec(self.got, self.lock)


def fast_rules(dwell: str) -> Any:
    from importlib import resources

    doc = yaml.safe_load(resources.files("flows").joinpath("default_rules.yaml").read_text())
    for r in doc["rules"]:
        if r["id"] == "help-sprite":
            r["trigger"]["dwell"] = dwell
    return parse_rules(doc, "test")


def click(action: str, **kw: Any) -> dict[str, Any]:
    return {"type": "click", "customer_id": "13800001234", "terminal_id": "T9",
            "hall_id": "H1", "action": action, **kw}


def run_live(plan: list[tuple[float, dict[str, Any]]], close_after: float,
             workers: int) -> tuple[Recorder, Recorder]:
    pushes, alerts = Recorder(), Recorder()
    settings = load_settings(mode="live", engine={"stats_interval_s": 0.5})
    flow = build_flow(settings, source=ScheduledSource(plan, close_after),
                      outputs=Outputs(pushes=[pushes], alerts=[alerts]),
                      rules=fast_rules("2s"), profiles=InMemoryProfileStore())
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return pushes, alerts


@pytest.mark.parametrize("workers", [1, 2])
def test_help_sprite_fires_on_time_with_no_further_events(workers: int) -> None:
    plan = [(0.0, click("session_start")),
            (0.1, click("step_enter", module="remote_cam", step="door"))]
    pushes, alerts = run_live(plan, close_after=4.0, workers=workers)
    # The source stays open and silent until 4 s: only the wall-clock timer can fire it.
    assert [p.rule_id for _, p in pushes.got] == ["help-sprite"]
    arrived, push = pushes.got[0]
    deadline = push.event_ts
    assert push.channel == "terminal:T9"
    assert push.reason["dwell_s"] == 2
    assert arrived >= deadline  # never early
    assert [a.type for _, a in alerts.got] == ["touchstream.dwell.customer"]


def test_leaving_the_step_in_time_cancels_the_live_timer() -> None:
    plan = [(0.0, click("step_enter", module="remote_cam", step="door")),
            (1.0, click("step_exit", module="remote_cam", step="door"))]
    pushes, alerts = run_live(plan, close_after=3.5, workers=1)
    assert pushes.got == []
    assert alerts.got == []
