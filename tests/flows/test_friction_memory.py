"""Step friction forgets the steps nobody visits any more (terminals choose step names),
without changing an alert; the flow gives it the clock skew live input accepts."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from flows.aggregates import FORGET_MARGIN_MS, SWEEP_EVERY_MS, FrictionEngine
from flows.codec import json_dumps
from flows.engine import Progress, VisitDone
from flows.experience import Outputs, build_flow
from flows.model import Alert, RawRecord
from flows.rules import load_default_rules
from flows.settings import load_settings
from state.profiles import InMemoryProfileStore
from tests.flows.helpers import MIN, T0, H, S

RULES = load_default_rules()  # step-friction: 60 min window, 5 customers, mean 100 s, once 60 min
WINDOW = 60 * MIN


def _visit(step: str, customer: str, leave: int, dwell: int,
           module: str = "remote_cam") -> VisitDone:
    return VisitDone(module, step, customer, leave - dwell, leave, False)


def _alerts(out: list[Any]) -> list[Alert]:
    return [x for x in out if isinstance(x, Alert)]


def test_steps_not_visited_lately_are_forgotten() -> None:
    engine = FrictionEngine(RULES, shards=1, live=True)
    out: list[Any] = []
    for i in range(3_000):  # one visit a minute, each to a step of its own
        engine.on_visit(_visit(f"step-{i}", f"c{i}", T0 + i * MIN, 10 * S), out)
    # Kept: steps visited within twice the window plus the margin, plus up to one sweep
    # period since the last sweep (half the window here).
    bound = (2 * WINDOW + FORGET_MARGIN_MS + max(WINDOW // 2, SWEEP_EVERY_MS)) // MIN + 1
    assert 100 < len(engine.windows) <= bound
    assert set(engine._who) == set(engine._dwell_sum) == set(engine.windows)
    assert "step-2999" in {step for _, step in engine.windows}
    assert "step-0" not in {step for _, step in engine.windows}
    assert len(engine.snapshot()["visits"]) == len(engine.windows)


def test_a_forgotten_step_alerts_again_as_a_new_one() -> None:
    engine = FrictionEngine(RULES, shards=1, live=True)
    out: list[Any] = []
    for i in range(5):
        engine.on_visit(_visit("door_sensor", f"c{i}", T0 + i * S, 200 * S), out)
    [first] = _alerts(out)
    key = "step-friction|remote_cam|door_sensor"
    assert key in engine.last_alert
    # Two days of visits elsewhere: far past the rule's once (60 min) and window.
    for i in range(2 * 24 * 60):
        engine.on_visit(_visit("elsewhere", f"d{i % 3}", T0 + i * MIN, 10 * S), out)
    assert key not in engine.last_alert
    assert ("remote_cam", "door_sensor") not in engine.windows
    out.clear()
    later = T0 + 2 * 24 * H + H
    for i in range(5):
        engine.on_visit(_visit("door_sensor", f"e{i}", later + i * S, 200 * S), out)
    [second] = _alerts(out)
    assert second.id != first.id and second.data["n"] == 5  # none of the old visits


def _traffic(seed: int) -> list[VisitDone]:
    """Visits to a few steps, in bursts with gaps of hours (so steps get forgotten and
    come back), dwells around the rule's mean so some windows alert and some do not."""
    rnd = random.Random(seed)
    visits = []
    t = T0
    for _ in range(60):
        t += rnd.choice([5 * MIN, 20 * MIN, 3 * H, 9 * H, 30 * H])
        step = rnd.choice(["door_sensor", "bind_mms", "setup", "pair"])
        for _ in range(rnd.randint(3, 9)):
            leave = t + rnd.randint(0, 40 * MIN)
            visits.append(_visit(step, f"c{rnd.randint(0, 7)}", leave, rnd.randint(60, 160) * S))
    return visits


def _replay(visits: list[VisitDone], forget: bool) -> tuple[list[Alert], int]:
    engine = FrictionEngine(RULES, shards=1, live=False)
    if not forget:
        engine._sweep = lambda: None  # type: ignore[method-assign]
    out: list[Any] = []
    for v in visits:  # in leave order, as a shard sends them before its progress
        engine.on_visit(v, out)
        engine.on_progress(Progress(0, v.leave_ts - 30 * MIN, False), out)
    engine.flush(out)
    return _alerts(out), len(engine.windows) + len(engine.last_alert)


def test_forgetting_changes_no_alert_in_replay() -> None:
    fired = 0
    for seed in range(8):
        visits = sorted(_traffic(seed), key=lambda v: v.leave_ts)
        kept, held = _replay(visits, forget=True)
        everything, held_all = _replay(visits, forget=False)
        assert kept == everything, seed
        assert held < held_all, seed  # something was forgotten
        fired += len(kept)
    assert fired


def test_forgetting_changes_no_alert_live_with_visits_minutes_out_of_order() -> None:
    fired = 0
    for seed in range(8):
        visits = sorted(_traffic(seed), key=lambda v: v.leave_ts + random.Random(
            v.enter_ts).randint(0, 10 * MIN))  # shards' outputs interleave: minutes late
        results = []
        for forget in (True, False):
            engine = FrictionEngine(RULES, shards=1, live=True)
            if not forget:
                engine._sweep = lambda: None  # type: ignore[method-assign]
            out: list[Any] = []
            for v in visits:
                engine.on_visit(v, out)
            results.append(_alerts(out))
        assert results[0] == results[1], seed
        fired += len(results[0])
    assert fired


def test_a_restored_engine_forgets_from_its_snapshot_on() -> None:
    engine = FrictionEngine(RULES, shards=1, live=True)
    out: list[Any] = []
    for i in range(400):
        engine.on_visit(_visit(f"step-{i}", f"c{i}", T0 + i * MIN, 10 * S), out)
    restored = FrictionEngine(RULES, shards=1, live=True, state=engine.snapshot())
    assert restored.high == engine.high == T0 + 399 * MIN
    assert set(restored.windows) == set(engine.windows)
    for i in range(400, 800):
        v = _visit(f"step-{i}", f"c{i}", T0 + i * MIN, 10 * S)
        engine.on_visit(v, out)
        restored.on_visit(v, out)
    steps = {s for _, s in restored.windows}
    assert "step-0" not in steps and "step-400" not in steps and "step-799" in steps
    assert len(restored.windows) < 400


def test_a_visit_stamped_ahead_within_the_clock_skew_forgets_no_current_step() -> None:
    """Live, a terminal's clock may run up to engine.max_clock_skew_s ahead: a visit
    stamped that far ahead must not push the current steps out of memory."""
    def run(margin_ms: int) -> list[Alert]:
        engine = FrictionEngine(RULES, shards=1, live=True, forget_margin_ms=margin_ms)
        out: list[Any] = []
        for i in range(4):
            engine.on_visit(_visit("door_sensor", f"c{i}", T0 + i * MIN, 200 * S), out)
        engine.on_visit(_visit("bind_mms", "fast-clock", T0 + 20 * H, 10 * S), out)
        engine.on_visit(_visit("door_sensor", "c4", T0 + 5 * MIN, 200 * S), out)
        return _alerts(out)

    [alert] = run(margin_ms=24 * H)  # the skew allowed: 24 h
    assert alert.subject == "remote_cam/door_sensor" and alert.data["n"] == 5
    assert run(margin_ms=0) == []  # with only the default hour, the four were forgotten


@pytest.mark.parametrize("workers", [1, 2])
def test_the_flow_gives_step_friction_the_clock_skew_it_accepts(workers: int) -> None:
    """build_flow hands engine.max_clock_skew_s to step friction: live, with a 24 h skew
    allowed, a visit stamped 20 h ahead is accepted and forgets no current step, so five
    slow visits of one step still make the alert (with the default hour of margin alone
    the four before were forgotten: no alert)."""
    now = T0
    items: list[Any] = []

    def visit(cid: str, step: str, enter: int, dwell: int) -> None:
        docs = [("session_start", None, None, enter - 2 * S),
                ("module_enter", "remote_cam", None, enter - S),
                ("step_enter", "remote_cam", step, enter),
                ("step_exit", "remote_cam", step, enter + dwell)]
        for action, module, st, ts in docs:
            doc: dict[str, Any] = {"type": "click", "customer_id": cid, "ts": ts,
                                   "action": action, "terminal_id": "H01-T01",
                                   "hall_id": "H01", "event_id": f"{cid}-{action}-{ts}"}
            if module:
                doc["module"] = module
            if st:
                doc["step"] = st
            items.append(RawRecord("touch.clicks/0", len(items), json_dumps(doc),
                                   cid.encode()))

    for i in range(4):
        visit(f"c{i}", "door_sensor", now - 280 * S + i * 10 * S, 200 * S)
    items.append(TestingSource.PAUSE(timedelta(milliseconds=300)))
    visit("fast-clock", "bind_mms", now + 20 * H, 10 * S)  # its terminal's clock runs ahead
    items.append(TestingSource.PAUSE(timedelta(milliseconds=300)))
    visit("c4", "door_sensor", now - 240 * S, 200 * S)
    settings = load_settings(mode="live", engine={"shards": 4, "stats_interval_s": 3600,
                                                  "max_clock_skew_s": 24 * 3600})
    alerts: list[Alert] = []
    dead: list[Any] = []
    flow = build_flow(settings, source=TestingSource(items),
                      outputs=Outputs(alerts=[TestingSink(alerts)],
                                      dead_letters=[TestingSink(dead)]),
                      rules=RULES, profiles=InMemoryProfileStore(), now_ms=lambda: now)
    if workers == 1:
        run_main(flow, epoch_interval=timedelta(milliseconds=50))  # type: ignore[no-untyped-call]
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=2,  # type: ignore[no-untyped-call]
                     epoch_interval=timedelta(milliseconds=50))
    assert dead == []  # the visit 20 h ahead was accepted
    step_alerts = [a for a in alerts if a.type == "touchstream.dwell.step"]
    assert [(a.subject, a.data["n"]) for a in step_alerts] == [("remote_cam/door_sensor", 5)]
