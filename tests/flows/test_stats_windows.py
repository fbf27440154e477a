"""Stats in tumbling windows: 1 min / 1 h / 1 day, closed once, bounded, medians."""

from __future__ import annotations

import statistics
from typing import Any

from flows.aggregates import (
    MAX_DWELL_BUCKET,
    DwellHistogram,
    FrictionEngine,
    StatsEngine,
    TumblingWindows,
    bucket_seconds,
    dwell_bucket,
    rule_campaigns,
)
from flows.codec import pack, unpack
from flows.control import RulesUpdate
from flows.engine import StatDelta, VisitDone
from flows.experience import _StatsLogic
from flows.rules import load_default_rules

T0 = 1_700_000_080_000  # 40 s into a minute
MIN = 60_000
H = 60 * MIN
D = 24 * H


def delta(**counts: int) -> StatDelta:
    out: dict[tuple[str, ...], int] = {}
    for k, n in counts.items():
        out[tuple(k.split("__"))] = n
    return StatDelta(out)


def windows(doc: dict[str, Any], size_s: int) -> list[dict[str, Any]]:
    return [w for w in doc["windows"] if w["size_s"] == size_s]


def test_counts_land_in_their_minute_and_each_window_is_emitted_once() -> None:
    eng = StatsEngine(30 * MIN)
    eng.add(delta(hall__H1__sessions=2, hall__H1__pushes=2, rule__r1__pushes=2))
    first = eng.render(T0)  # stamped T0: minute [T0-40s, T0+20s)
    assert first["windows"] == []
    eng.add(delta(hall__H1__sessions=1, hall__H1__conversions=1, rule__r1__conversions=1))
    eng.dead_letter("late")
    doc = eng.render(T0 + 30_000)  # the next minute; the first one has ended
    (m,) = windows(doc, 60)
    start = T0 - T0 % MIN
    assert (m["start_ms"], m["end_ms"]) == (start, start + MIN)
    assert m["halls"]["H1"] == {"sessions": 2, "pushes": 2, "conversion_rate": 0.0}
    assert m["rules"]["r1"]["pushes"] == 2 and "conversions" not in m["rules"]["r1"]
    assert windows(doc, 3600) == [] and windows(doc, 86400) == []
    # nothing new: the same window is not emitted again; the second minute closes later
    assert eng.render(T0 + 31_000)["windows"] == []
    doc = eng.render(T0 + 2 * MIN)
    (m2,) = windows(doc, 60)
    assert m2["start_ms"] == start + MIN
    assert m2["halls"]["H1"] == {"sessions": 1, "conversions": 1}
    assert m2["dead_letters"] == {"late": 1}
    # the cumulative document is what it always was
    assert doc["halls"]["H1"] == {"sessions": 3, "pushes": 2, "conversions": 1,
                                  "conversion_rate": 0.5}
    assert doc["dead_letters_total"] == 1


def test_hour_and_day_windows_sum_their_minutes() -> None:
    eng = StatsEngine(30 * MIN)
    day0 = T0 - T0 % D
    t = day0 + 5 * MIN
    for i in range(90):  # one session a minute for 90 minutes
        eng.add(delta(hall__H1__sessions=1, module__music__tries=1), at_ms=t + i * MIN)
    doc = eng.render(day0 + D)
    mins = windows(doc, 60)
    hours = windows(doc, 3600)
    days = windows(doc, 86400)
    assert len(mins) == 90 and all(m["halls"]["H1"]["sessions"] == 1 for m in mins)
    assert [h["halls"]["H1"]["sessions"] for h in hours] == [55, 35]
    assert [d["start_ms"] for d in days] == [day0]
    assert days[0]["modules"]["music"]["tries"] == 90
    assert all(not w for w in eng.windows.open.values())  # closed ones are forgotten


def test_help_per_step_campaigns_and_rates() -> None:
    eng = StatsEngine(30 * MIN, campaigns={"r1": "spring", "r2": "spring"})
    eng.add(delta(step__remote_cam_door__help=3, rule__r1__pushes=4, rule__r2__pushes=1,
                  rule__r1__conversions=1, **{"rule__r2__blocked:cap": 2}), at_ms=T0)
    (m,) = windows(eng.render(T0 + MIN), 60)
    assert m["steps"] == {"remote_cam_door": {"help": 3}}
    assert m["campaigns"]["spring"] == {"pushes": 5, "conversions": 1, "blocked": {"cap": 2},
                                        "conversion_rate": 0.2}
    assert m["rules"]["r2"]["blocked"] == {"cap": 2}


def test_median_time_per_module_from_friction_visits() -> None:
    fr = FrictionEngine(load_default_rules(), shards=1, live=True)
    out: list[Any] = []
    dwells_s = [12, 30, 31, 95, 104, 300, 7]
    for i, d in enumerate(dwells_s):
        fr.on_visit(VisitDone("remote_cam", "door", f"c{i}", T0, T0 + d * 1000, False), out)
    eng = StatsEngine(30 * MIN)
    for x in out:
        if type(x) is StatDelta:
            eng.add(x, at_ms=T0)
    (m,) = windows(eng.render(T0 + MIN), 60)
    got = m["modules"]["remote_cam"]
    assert got["step_visits"] == len(dwells_s)
    assert got["median_step_s"] == statistics.median_low(dwells_s) == 31
    # dwell keys never reach the cumulative counts (bounded, and the doc is unchanged)
    assert not any(k[0] == "dwell" for k in eng.counts)


def test_dwell_histogram_is_bounded_and_close_above_two_minutes() -> None:
    assert [dwell_bucket(ms) for ms in (0, 999, 1000, 119_999)] == [0, 0, 1, 119]
    assert dwell_bucket(10 * D) == MAX_DWELL_BUCKET < 300
    for sec in (120, 178, 1000, 20_000, 86_000):
        rep = bucket_seconds(dwell_bucket(sec * 1000))
        assert abs(rep - sec) / sec <= 0.026, sec
    h = DwellHistogram()
    for ms in range(0, 50 * D, 997_003):  # thousands of visits, a few hundred buckets
        h.add(dwell_bucket(ms))
    assert len(h.buckets) <= MAX_DWELL_BUCKET + 1
    assert h.median_s() is not None
    assert DwellHistogram().median_s() is None


def test_late_counts_go_to_the_oldest_open_window_and_state_survives_a_snapshot() -> None:
    w = TumblingWindows((MIN,))
    w.add(T0, {("hall", "H1", "orders"): 1})
    w.close(T0 + MIN)  # T0's minute is gone
    w.add(T0 + MIN, {("hall", "H1", "orders"): 1})
    w.add(T0 - 5 * MIN, {("hall", "H1", "orders"): 1})  # a clock step back
    eng = StatsEngine(30 * MIN)
    eng.add(delta(hall__H1__orders=2))  # pending, not yet stamped
    eng.add(delta(dwell__music__12=1), at_ms=T0)
    restored = StatsEngine(30 * MIN, unpack(pack(eng.snapshot())))
    (m,) = windows(restored.render(T0 + 2 * MIN), 60)
    assert m["modules"]["music"] == {"step_visits": 1, "median_step_s": 12.0}
    (late,) = w.close(T0 + 10 * MIN)
    assert late["halls"]["H1"]["orders"] == 2 and late["engine"] == {"late": 1}
    # pending counts restored: stamped at that render, so in a later minute
    doc = restored.render(T0 + 5 * MIN)
    assert sum(x["halls"].get("H1", {}).get("orders", 0) for x in windows(doc, 60)) == 2


def test_a_replay_document_has_no_windows() -> None:
    eng = StatsEngine(30 * MIN)
    eng.add(delta(hall__H1__sessions=1))
    assert "windows" not in eng.render()


# --- live: arrival stamps, idle closing, campaigns from rule changes, uplift --------------


class Clock:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def test_live_stats_stamp_arrival_and_close_the_last_window_while_idle() -> None:
    clock = Clock(T0)  # 40 s into a minute
    logic = _StatsLogic(StatsEngine(30 * MIN), True, clock, 10_000)
    logic.on_batch([delta(hall__H1__sessions=2)])
    clock.t = T0 + 30_000  # the next minute: the delta arrived in the previous one
    (doc,), _ = logic.on_notify()
    (m,) = windows(doc, 60)
    assert m["start_ms"] == T0 - T0 % MIN and m["halls"]["H1"] == {"sessions": 2}
    logic.on_batch([delta(hall__H1__sessions=1)])
    clock.t = T0 + 40_000
    (doc,), _ = logic.on_notify()  # counts arrived: a document, no window ended yet
    assert doc["windows"] == []
    clock.t = T0 + 50_000
    assert list(logic.on_notify()[0]) == []  # idle, nothing ended: nothing emitted
    clock.t = T0 + 2 * MIN  # idle, and that minute has ended: it is emitted, once
    (doc,), _ = logic.on_notify()
    (m,) = windows(doc, 60)
    assert m["halls"]["H1"] == {"sessions": 1}
    clock.t = T0 + 2 * MIN + 10_000
    assert list(logic.on_notify()[0]) == []
    clock.t = T0 + 2 * H  # the hour ends with no new counts
    (doc,), _ = logic.on_notify()
    assert [w["halls"]["H1"]["sessions"] for w in windows(doc, 3600)] == [3]
    assert list(logic.on_notify()[0]) == []


def test_rule_changes_add_campaigns_to_the_stats_and_survive_a_snapshot() -> None:
    doc = {"version": 1, "rules": [
        {"id": "concert", "version": 2, "once_per": "session",
         "trigger": {"kind": "event", "type": "click", "action": "module_enter",
                     "module": "concert"},
         "push": {"module": "concert_tickets", "kind": "lottery"},
         "campaign": "xmas-2026", "control_group": 0.2}]}
    assert rule_campaigns(load_default_rules()) == {}
    clock = Clock(T0)
    logic = _StatsLogic(StatsEngine(30 * MIN, campaigns={"r1": "spring"}), True, clock,
                        10_000)
    logic.on_batch([RulesUpdate(2, doc, "test-stats-campaigns-v2", "test"),
                    delta(rule__concert__pushes=4, rule__concert__conversions=2,
                          rule__concert__holdouts=2, rule__concert__control_conversions=0,
                          rule__r1__pushes=1)])
    eng = StatsEngine(30 * MIN, unpack(pack(logic.engine.snapshot())))
    assert eng.campaigns == {"r1": "spring", "concert": "xmas-2026"}
    out = eng.render(T0 + MIN)
    (m,) = windows(out, 60)
    for d in (out, m):
        assert d["campaigns"]["xmas-2026"] == {
            "pushes": 4, "conversions": 2, "conversion_rate": 0.5, "holdouts": 2,
            "control_conversions": 0, "control_conversion_rate": 0.0, "uplift": 0.5}
        assert d["campaigns"]["spring"] == {"pushes": 1, "conversion_rate": 0.0}
