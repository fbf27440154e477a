"""Incremental snapshots: with ``incremental=True`` (a flow with a recovery store) a shard's
snapshot re-packs only the customers changed since the last one, and says exactly
what a full snapshot says: every change (an event, a timer firing, an eviction) is in
the next snapshot, across restores, and snapshots of either kind restore either way."""

from __future__ import annotations

import random
from typing import Any

import pytest

from flows.codec import pack, unpack
from flows.engine import Customer, EngineConfig, ShardEngine
from flows.model import Envelope, Push
from flows.rules import load_default_rules
from state.guards import InMemoryQuotaStore
from state.profiles import InMemoryProfileStore
from tests.flows.helpers import MIN, T0, H, S, calls, click, location, profile

CONFIG = EngineConfig(shards=1, idle_ttl_ms=2 * H, sweep_interval_ms=10 * MIN)
RULES = load_default_rules()
PROFILES = [profile(f"c{i}", subscriptions=["remote_cam"] if i % 2 else ["music"],
                    prefs={"music": ["jazz"]} if i % 3 == 0 else None) for i in range(40)]


def engine(state: dict[str, Any] | None = None, *, incremental: bool) -> ShardEngine:
    return ShardEngine(0, RULES, InMemoryProfileStore(PROFILES), CONFIG, state,
                       quota=InMemoryQuotaStore(), incremental=incremental)


def through_bytes(e: ShardEngine) -> dict[str, Any]:
    """The snapshot as a restarted flow reads it (encoded, then decoded)."""
    return unpack(pack(e.snapshot()))  # type: ignore[no-any-return]


def customers_of(snap: dict[str, Any]) -> dict[str, Any]:
    """Each customer's state, from either kind of snapshot."""
    if "packed" in snap:
        return {k: unpack(v) for k, v in snap["packed"].items()}
    return dict(snap["customers"])


def rest_of(snap: dict[str, Any]) -> dict[str, Any]:
    """Everything but the customers; pending counts as a map (their order is no state)."""
    rest = {k: v for k, v in snap.items() if k not in ("packed", "customers")}
    rest["counts"] = {tuple(k): v for k, v in rest["counts"]}
    return rest


def same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert customers_of(a) == customers_of(b)
    assert rest_of(a) == rest_of(b)


def random_step(rng: random.Random, now: int) -> tuple[int, Envelope | None]:
    """The next moment and what happens then: an event, or only time passing."""
    now += rng.choice((S, 10 * S, MIN, 2 * MIN))
    if rng.random() < 0.03:
        now += 3 * H  # past the idle time: the next sweep evicts whoever was quiet
    cid = f"c{rng.randrange(40)}"
    r = rng.random()
    if r < 0.1:
        return now, None  # timers only
    if r < 0.35:
        return now, location(cid, now, rng.choice(("cinema", "mall", None)))
    if r < 0.5:
        return now, calls(cid, now, rng.randrange(0, 12), rng.randrange(0, 6))
    action, module, step = rng.choice((
        ("session_start", None, None), ("module_enter", "remote_cam", None),
        ("step_enter", "remote_cam", "pair"), ("step_enter", "remote_cam", "confirm"),
        ("step_exit", "remote_cam", "pair"), ("help", "remote_cam", "pair"),
        ("order", "remote_cam", None), ("module_enter", "music", None),
        ("session_end", None, None)))
    return now, click(cid, now, action, module=module, step=step, hall=f"H{int(cid[1:]) % 3}")


@pytest.mark.parametrize("seed", range(6))
def test_incremental_snapshots_equal_full_ones_through_restarts(seed: int) -> None:
    """The same events into an incremental and a full engine: every snapshot says the
    same, and so do both after each is restarted from its own snapshot (twice)."""
    rng = random.Random(seed)
    inc, full = engine(incremental=True), engine(incremental=False)
    now = T0
    outs: tuple[list[Any], list[Any]] = ([], [])
    for step in range(900):
        now, env = random_step(rng, now)
        for e, out in zip((inc, full), outs, strict=True):
            if env is None:
                e.fire_due(now, out)
            else:
                e.on_live_event(env, now, out)
        if step % 11 == 10:
            a, b = through_bytes(inc), through_bytes(full)
            assert "packed" in a and "customers" in b
            same(a, b)
            if step % 3 == 0:  # a restart of both, each from its own snapshot
                inc, full = engine(a, incremental=True), engine(b, incremental=False)
    assert outs[0] == outs[1]
    kinds = {type(x).__name__ for x in outs[0]}
    assert {"Push", "Alert", "VisitDone"} <= kinds, kinds  # timers and pushes happened
    assert full.counts["engine", "evicted"] > 0  # and sweeps evicted customers


@pytest.fixture
def packed(monkeypatch: pytest.MonkeyPatch) -> list[Customer]:
    """Every customer a snapshot packs (``Customer.to_state``) during the test, in order."""
    seen: list[Customer] = []
    real = Customer.to_state

    def counting(c: Customer) -> list[Any]:
        seen.append(c)
        return real(c)

    monkeypatch.setattr(Customer, "to_state", counting)
    return seen


def test_a_snapshot_packs_only_the_customers_changed_since_the_last(
        packed: list[Customer]) -> None:
    e = engine(incremental=True)
    for i in range(30):
        e.on_live_event(location(f"c{i}", T0 + i * S, "mall"), T0 + i * S, [])
    assert packed == []
    first = through_bytes(e)
    assert len(packed) == 30 and len(first["packed"]) == 30
    packed.clear()
    for i in (3, 7, 11):
        e.on_live_event(location(f"c{i}", T0 + H, "cinema"), T0 + H, [])
    second = through_bytes(e)
    assert sorted(map(id, packed)) == sorted(id(e.customers[f"c{i}"]) for i in (3, 7, 11))
    assert len(second["packed"]) == 30
    changed = {k for k in first["packed"] if first["packed"][k] != second["packed"][k]}
    assert changed == {"c3", "c7", "c11"}
    packed.clear()
    assert through_bytes(e)["packed"] == second["packed"] and packed == []


def test_a_change_made_only_by_a_timer_is_in_the_next_snapshot() -> None:
    """help-sprite fires for c1 while only c2 sends events: the next snapshot holds c1
    with the rule marked fired and the push counted, as a full snapshot does."""
    inc, full = engine(incremental=True), engine(incremental=False)
    outs: tuple[list[Any], list[Any]] = ([], [])
    steps = [click("c1", T0, "session_start"),
             click("c1", T0 + S, "module_enter", module="remote_cam"),
             click("c1", T0 + 2 * S, "step_enter", module="remote_cam", step="pair")]
    for e, out in zip((inc, full), outs, strict=True):
        for env in steps:
            e.on_live_event(env, env.event.ts, out)
    through_bytes(inc)  # c1 packed with its step open and its timer pending
    for e, out in zip((inc, full), outs, strict=True):
        e.on_live_event(location("c2", T0 + 2 * MIN, "mall"), T0 + 2 * MIN, out)
    assert [p.rule_id for p in outs[0] if type(p) is Push][-1] == "help-sprite"
    snap = through_bytes(inc)
    same(snap, through_bytes(full))
    step = unpack(snap["packed"]["c1"])[2]
    assert step[1] == "pair" and step[4] == ["help-sprite"]


def test_evicted_customers_leave_the_next_snapshot() -> None:
    e = engine(incremental=True)
    for i in range(5):
        e.on_live_event(location(f"c{i}", T0, "mall"), T0, [])
    assert len(through_bytes(e)["packed"]) == 5
    later = T0 + 3 * H
    e.on_live_event(location("c0", later, "mall"), later, [])  # the sweep evicts c1-c4
    snap = through_bytes(e)
    assert set(snap["packed"]) == {"c0"}
    assert set(engine(snap, incremental=True).customers) == {"c0"}
    assert set(engine(snap, incremental=False).customers) == {"c0"}


def test_a_full_snapshot_restores_into_an_incremental_engine_and_back() -> None:
    """A snapshot written before incremental snapshots (or with recovery off) starts
    an incremental engine, whose first snapshot packs every customer; and the other way
    round."""
    full = engine(incremental=False)
    for i in range(10):
        full.on_live_event(calls(f"c{i}", T0 + i * S, 3, 1), T0 + i * S, [])
    old = through_bytes(full)
    inc = engine(old, incremental=True)
    snap = through_bytes(inc)
    same(snap, old)
    back = engine(snap, incremental=False)
    same(through_bytes(back), old)
    # the restored map is kept: a customer untouched since the restart stays in it
    inc.on_live_event(calls("c0", T0 + MIN, 1, 1), T0 + MIN, [])
    assert set(through_bytes(inc)["packed"]) == {f"c{i}" for i in range(10)}


def test_a_timer_that_no_longer_applies_packs_nobody(packed: list[Customer]) -> None:
    """c1 leaves the step before help-sprite's 90 s: the stale timer changes nothing, so
    the next snapshot re-packs nobody (it used to re-pack c1)."""
    e = engine(incremental=True)
    out: list[Any] = []
    for env in (click("c1", T0, "session_start"),
                click("c1", T0 + S, "module_enter", module="remote_cam"),
                click("c1", T0 + 2 * S, "step_enter", module="remote_cam", step="pair"),
                click("c1", T0 + 3 * S, "step_exit", module="remote_cam", step="pair")):
        e.on_live_event(env, env.event.ts, out)
    assert e.timers  # help-sprite's timer is still pending
    through_bytes(e)
    assert packed == [e.customers["c1"]]  # c1, once: its state before the timer
    packed.clear()
    fired: list[Any] = []
    e.fire_due(T0 + 5 * MIN, fired)
    assert not e.timers and fired == []
    through_bytes(e)
    assert packed == []
