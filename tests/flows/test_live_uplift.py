"""Live uplift: control-group customers' orders within the conversion window
(``control_conversions``) beside the pushed customers' (``conversions``), per rule,
campaign, hall and module, in the stats document and its windows."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from flows.aggregates import StatsEngine, rule_campaigns
from flows.codec import pack, unpack
from flows.engine import MAX_HELD, EngineConfig, Holdout, ShardEngine, StatDelta, unit_draw
from flows.model import Envelope, Push
from flows.rules import RuleSet, parse_rules
from flows.runner import replay
from flows.settings import load_settings
from state.guards import InMemoryQuotaStore
from state.profiles import InMemoryProfileStore
from tests.flows.helpers import MIN, T0, S, click

WINDOW = 30 * MIN
MODULE = "concert_tickets"


def rules(control_group: float = 0.4) -> RuleSet:
    """``concert``: entering the concert module pushes the ticket lottery, campaign
    ``xmas-2026`` with a control group; ``plain``: no campaign."""
    doc = {"version": 1, "guards": {"max_pushes_per_customer": 0}, "rules": [
        {"id": "concert", "version": 1, "once_per": "session",
         "trigger": {"kind": "event", "type": "click", "action": "module_enter",
                     "module": "concert"},
         "push": {"module": MODULE, "kind": "lottery", "text": "Win tickets"},
         "campaign": "xmas-2026", "control_group": control_group},
    ]}
    return parse_rules(doc, "uplift.yaml")


def engine(rs: RuleSet, state: dict[str, Any] | None = None) -> ShardEngine:
    return ShardEngine(0, rs, InMemoryProfileStore(()),
                       EngineConfig(shards=1, conversion_window_ms=WINDOW), state,
                       quota=InMemoryQuotaStore())


def run(e: ShardEngine, envs: list[Envelope]) -> list[Any]:
    out: list[Any] = []
    for env in envs:
        e.apply(env, out)
    return out


def enter(cid: str, ts: int, hall: str) -> list[Envelope]:
    return [click(cid, ts - S, "session_start", hall=hall),
            click(cid, ts, "module_enter", module="concert", hall=hall)]


def order(cid: str, ts: int, hall: str, module: str = MODULE) -> Envelope:
    return click(cid, ts, "order", module=module, hall=hall)


def counts(e: ShardEngine) -> Counter[tuple[str, ...]]:
    delta = e.take_stats()
    return Counter(delta.counts if delta is not None else {})


def held_ids(k: int, control_group: float = 0.4) -> list[str]:
    """The first ``k`` customer ids the control group of ``xmas-2026`` holds out."""
    ids = (f"h{i}" for i in range(10_000))
    return [c for c in ids if unit_draw("control", "xmas-2026", c) < control_group][:k]


def uplift(conv: int, pushes: int, cconv: int, holdouts: int) -> float:
    return round(conv / pushes - cconv / holdouts, 4)


def test_held_out_customers_who_order_count_as_control_conversions() -> None:
    rs = rules()
    e = engine(rs)
    halls = {f"c{i}": ("H1" if i % 3 else "H2") for i in range(300)}
    out = run(e, [x for i, (cid, hall) in enumerate(halls.items())
                  for x in enter(cid, T0 + i * S, hall)])
    held = {h.customer_id for h in out if type(h) is Holdout}
    pushed = {p.customer_id for p in out if type(p) is Push}
    assert held and pushed and not held & pushed and len(held | pushed) == 300
    # every 2nd customer orders the pushed module within the window, every 5th after it,
    # every 7th another module; the first order of an even customer is ordered twice
    end = T0 + 300 * S
    orders = []
    for i, (cid, hall) in enumerate(halls.items()):
        if i % 2 == 0:
            orders += [order(cid, end + 10 * MIN, hall), order(cid, end + 11 * MIN, hall)]
        elif i % 5 == 0:
            orders.append(order(cid, T0 + i * S + WINDOW + S, hall))
        elif i % 7 == 0:
            orders.append(order(cid, end, hall, module="music"))
    orders.sort(key=lambda env: env.event.ts)
    run(e, orders)
    in_window = {cid for i, cid in enumerate(halls) if i % 2 == 0}
    got = counts(e)
    cconv = len(held & in_window)
    conv = len(pushed & in_window)
    assert 0 < cconv < len(held) and 0 < conv < len(pushed)
    assert got["rule", "concert", "control_conversions"] == cconv
    assert got["rule", "concert", "conversions"] == conv
    assert got["rule", "concert", "holdouts"] == len(held)
    for hall in ("H1", "H2"):
        in_hall = {c for c, h in halls.items() if h == hall}
        assert got["hall", hall, "holdouts"] == len(held & in_hall)
        assert got["hall", hall, "control_conversions"] == len(held & in_window & in_hall)
    assert got["module", MODULE, "control_conversions"] == cconv
    assert got["module", MODULE, "holdouts"] == len(held)

    stats = StatsEngine(WINDOW, campaigns=rule_campaigns(rs))
    stats.add(StatDelta(dict(got)), at_ms=end)
    doc = stats.render(end + 2 * 86_400_000)
    want = uplift(conv, len(pushed), cconv, len(held))
    r = doc["rules"]["concert"]
    assert (r["holdouts"], r["control_conversions"], r["uplift"]) == (len(held), cconv, want)
    assert r["control_conversion_rate"] == round(cconv / len(held), 4)
    camp = doc["campaigns"]["xmas-2026"]
    assert (camp["holdouts"], camp["control_conversions"], camp["uplift"]) == (
        len(held), cconv, want)
    assert doc["modules"][MODULE]["uplift"] == want
    day = [w for w in doc["windows"] if w["size_s"] == 86400]
    assert sum(w["campaigns"]["xmas-2026"]["control_conversions"] for w in day) == cconv


def test_uplift_is_null_without_pushes_and_absent_without_a_control_group() -> None:
    rs = rules()
    e = engine(rs)
    (a,) = held_ids(1)  # only a held-out customer: no pushes
    assert [type(x) for x in run(e, enter(a, T0, "H1"))] == [Holdout]
    run(e, [order(a, T0 + MIN, "H1")])
    stats = StatsEngine(WINDOW, campaigns=rule_campaigns(rs))
    stats.add(StatDelta(dict(counts(e))))
    r = stats.render()["rules"]["concert"]
    assert (r["holdouts"], r["control_conversions"], r["uplift"]) == (1, 1, None)
    e0 = engine(rules(control_group=0.0))  # no control group
    run(e0, [*enter("a", T0, "H1"), order("a", T0 + MIN, "H1")])
    stats0 = StatsEngine(WINDOW)
    stats0.add(StatDelta(dict(counts(e0))))
    r0 = stats0.render()["rules"]["concert"]
    assert r0["conversions"] == 1 and "uplift" not in r0 and "holdouts" not in r0


def test_held_out_tracking_survives_a_snapshot_and_old_snapshots_load() -> None:
    rs = rules()
    e = engine(rs)
    a, b = held_ids(2)
    run(e, enter(a, T0, "H1") + enter(b, T0, "H2"))
    snap = unpack(pack(e.snapshot()))
    e2 = engine(rs, state=snap)
    assert e2.customers[a].held == e.customers[a].held == [(T0, MODULE, "concert", "H1")]
    run(e2, [order(a, T0 + MIN, "H1")])
    got = counts(e2)
    assert got["rule", "concert", "control_conversions"] == 1
    assert got["hall", "H1", "control_conversions"] == 1
    # a snapshot written before live uplift (customers without the hold-out entry)
    old = unpack(pack(e.snapshot()))
    for st in old["customers"].values():
        del st[8]
    e3 = engine(rs, state=old)
    assert e3.customers[a].held is None
    run(e3, [order(a, T0 + MIN, "H1")])
    assert counts(e3)["rule", "concert", "control_conversions"] == 0


def test_hold_outs_a_customer_keeps_are_bounded() -> None:
    rs = rules()
    e = engine(rs)
    (a,) = held_ids(1)

    def session(t: int) -> None:
        out = run(e, [*enter(a, t, "H1"), click(a, t + S, "session_end", hall="H1")])
        assert [type(x) for x in out] == [Holdout]

    for k in range(100):  # a session (and a hold-out) every 10 s: at most MAX_HELD kept
        session(T0 + k * 10 * S)
    held = e.customers[a].held
    assert held is not None and len(held) == MAX_HELD
    assert held[0][0] == T0 + (100 - MAX_HELD) * 10 * S  # the oldest went first
    for k in range(100):  # then one every 5 minutes: only those within the window stay
        session(T0 + WINDOW + k * 5 * MIN)
    held = e.customers[a].held
    assert held is not None and len(held) == WINDOW // (5 * MIN) + 1


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_replay_stats_show_control_conversions_and_uplift(tmp_path: Path) -> None:
    rs = rules()
    rows: list[dict[str, Any]] = []
    n = 60
    for i in range(n):
        cid, t = f"c{i}", T0 + i * S
        rows += [{"type": "click", "customer_id": cid, "ts": t - S, "action": "session_start",
                  "terminal_id": f"T{i}", "hall_id": "H1"},
                 {"type": "click", "customer_id": cid, "ts": t, "action": "module_enter",
                  "terminal_id": f"T{i}", "hall_id": "H1", "module": "concert"}]
        if i % 2 == 0:
            rows.append({"type": "click", "customer_id": cid, "ts": t + 5 * MIN,
                         "action": "order", "terminal_id": f"T{i}", "hall_id": "H1",
                         "module": MODULE})
    rows.sort(key=lambda r: r["ts"])
    events = write_jsonl(tmp_path / "events.jsonl", rows)
    settings = load_settings(mode="replay", out_dir=tmp_path / "out",
                             engine={"workers": 1, "shards": 4})
    replay(settings, events, rules=rs)
    out = tmp_path / "out"
    held = {json.loads(x)["customer_id"] for x in (out / "holdouts.jsonl").read_text().splitlines()}
    pushed = {json.loads(x)["customer_id"] for x in (out / "pushes.jsonl").read_text().splitlines()}
    assert held and pushed and len(held | pushed) == n
    ordered = {f"c{i}" for i in range(0, n, 2)}
    stats = json.loads((out / "stats.json").read_text())
    r = stats["rules"]["concert"]
    assert r["holdouts"] == len(held)
    assert r["control_conversions"] == len(held & ordered)
    assert r["conversions"] == len(pushed & ordered)
    assert r["uplift"] == uplift(len(pushed & ordered), len(pushed), len(held & ordered),
                                 len(held))
    assert stats["campaigns"]["xmas-2026"]["uplift"] == r["uplift"]
    assert stats["halls"]["H1"]["control_conversions"] == len(held & ordered)
