"""Campaign guards and targeting (validity, scope, quiet hours, hours/days, quota,
lottery, control group), the generic ``event`` trigger, and swapping the rules of a
running engine (``ShardEngine.set_rules``, ``FrictionEngine.set_rules``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
import yaml

from flows.codec import pack, unpack
from flows.engine import EngineConfig, Holdout, ShardEngine
from flows.model import Profile, Push
from flows.rules import RulesError, RuleSet, parse_rules
from state.guards import InMemoryQuotaStore, QuotaStore
from state.profiles import InMemoryProfileStore
from state.redis_store import RedisQuotaStore
from tests.flows.helpers import (
    DEFAULT_RULES_PATH,
    MIN,
    T0,
    D,
    H,
    Harness,
    S,
    calls,
    click,
    default_rules_doc,
    location,
    profile,
    rules_with,
)

C = "13900000001"


# --- set_rules: swapping the rules of a running shard ---------------------------------


def test_set_rules_keeps_customer_state_and_applies_new_thresholds():
    h = Harness()
    h.feed(location(C, T0 - 2 * H), location(C, T0))
    assert len(h.pushes_of("cinema-pay")) == 1
    # Needs 3 visits now: the two already seen stay in the context, the third fires;
    # the once-per mark from the first push is kept, so it is blocked.
    h.engine.set_rules(rules_with(**{"cinema-pay": {"min_visits": 3}}))
    h.feed(location(C, T0 + 2 * H))
    assert len(h.pushes_of("cinema-pay")) == 1
    assert h.count("rule", "cinema-pay", "blocked:once_per") == 1
    # Another customer with only two visits no longer triggers.
    h.feed(location("c2", T0 + 3 * H), location("c2", T0 + 5 * H))
    assert h.pushes_of("cinema-pay") == [p for p in h.pushes if p.customer_id == C]


def test_set_rules_removed_rule_stops_and_new_rule_starts():
    h = Harness(profiles=[profile(C, prefs={"music": ["jazz"]})])
    h.engine.set_rules(rules_with(**{"music-pref": None}))
    h.feed(click(C, T0, "session_start"), click(C, T0 + S, "module_enter", module="music"))
    assert h.pushes_of("music-pref") == []
    h.engine.set_rules(rules_with())
    h.feed(click(C, T0 + 2 * S, "module_enter", module="music"))
    assert len(h.pushes_of("music-pref")) == 1


def test_set_rules_moves_pending_dwell_timers_to_the_new_dwell():
    h = Harness()
    h.feed(click(C, T0, "session_start"),
           click(C, T0 + S, "step_enter", module="care_link", step="pair"))
    h.engine.set_rules(rules_with(**{"help-sprite": {"dwell": "30s"}}))
    h.advance(T0 + S + 30 * S - 1)
    assert h.pushes_of("help-sprite") == []
    h.advance(T0 + S + 30 * S)
    assert len(h.pushes_of("help-sprite")) == 1
    assert len(h.alerts_of("touchstream.dwell.customer")) == 1
    # the old 90 s timer is stale and fires nothing
    h.advance(T0 + 5 * MIN)
    assert len(h.pushes_of("help-sprite")) == 1


def test_set_rules_removed_dwell_rule_timer_is_a_no_op():
    h = Harness()
    h.feed(click(C, T0, "session_start"),
           click(C, T0 + S, "step_enter", module="care_link", step="pair"))
    h.engine.set_rules(rules_with(**{"help-sprite": None}))
    h.advance(T0 + 5 * MIN)
    assert h.pushes_of("help-sprite") == [] and h.alerts == []


def _slow_visit(h: Harness, i: int) -> None:
    cid, t, term = f"c{i}", T0 + i * S, f"T{i}"
    h.feed(click(cid, t, "session_start", terminal=term),
           click(cid, t + S, "step_enter", module="care_link", step="pair", terminal=term),
           click(cid, t + 2 * MIN, "step_exit", module="care_link", step="pair",
                 terminal=term))


def _friction(min_customers: int) -> Any:
    doc = default_rules_doc()
    for r in doc["rules"]:
        if r["id"] == "step-friction":
            r["trigger"]["min_customers"] = min_customers
    return parse_rules(doc, "t.yaml")


def test_friction_set_rules_swaps_thresholds_and_keeps_the_window():
    h = Harness()
    for i in range(4):
        _slow_visit(h, i)
    h.friction.set_rules(_friction(10))
    _slow_visit(h, 4)  # five slow customers: the default (5) would alert, 10 does not
    assert h.alerts_of("touchstream.dwell.step") == []
    h.friction.set_rules(_friction(5))
    _slow_visit(h, 5)
    alerts = h.alerts_of("touchstream.dwell.step")
    assert len(alerts) == 1 and alerts[0].data["n"] == 6  # the window was kept


# --- campaign rules: builders ----------------------------------------------------------

PUSH = {"module": "concert_tickets", "kind": "lottery", "text": "Win 2 concert tickets"}
ENTER = {"kind": "event", "type": "click", "action": "module_enter", "module": "concert"}


def iso(ms: int, tz: str = "UTC") -> str:
    """An RFC 3339 timestamp with offset for epoch ``ms`` (whole seconds)."""
    assert ms % 1000 == 0
    return datetime.fromtimestamp(ms // 1000, ZoneInfo(tz)).isoformat()


def local_ms(tz: str, *args: int) -> int:
    """Epoch ms of a local wall-clock time in ``tz``."""
    return int(datetime(*args, tzinfo=ZoneInfo(tz)).timestamp() * 1000)  # type: ignore[misc]


def campaign_rules(*, timezone: str = "UTC", cap: int = 0, version: int = 1,
                   **fields: Any) -> RuleSet:
    """One rule, ``concert``: a click into the concert module pushes the lottery."""
    rule: dict[str, Any] = {"id": "concert", "version": version, "trigger": ENTER,
                            "push": PUSH, "once_per": "session"}
    rule.update(fields)
    doc = {"version": 1, "timezone": timezone,
           "guards": {"max_pushes_per_customer": cap}, "rules": [rule]}
    return parse_rules(doc, "campaign.yaml")


def enter(cid: str, ts: int, hall: str = "H1", terminal: str = "T1") -> list[Any]:
    """A session start and a click into the concert module, one second later."""
    return [click(cid, ts - S, "session_start", hall=hall, terminal=terminal),
            click(cid, ts, "module_enter", module="concert", hall=hall, terminal=terminal)]


def engine(rules: RuleSet, quota: QuotaStore | None = None,
           profiles: Sequence[Profile] = (), state: dict[str, Any] | None = None,
           shard: int = 0) -> ShardEngine:
    return ShardEngine(shard, rules, InMemoryProfileStore(profiles), EngineConfig(shards=1),
                       state, quota=quota if quota is not None else InMemoryQuotaStore())


def run(e: ShardEngine, envs: Sequence[Any]) -> list[Any]:
    """Apply ``envs`` in order (live style, no timers due); the outputs."""
    out: list[Any] = []
    for env in envs:
        e.apply(env, out)
    return out


def pushes(out: list[Any]) -> list[Push]:
    return [x for x in out if type(x) is Push]


def blocked(e: ShardEngine, guard: str, rule: str = "concert") -> int:
    e._fold_counts()
    return e.counts["rule", rule, "blocked:" + guard]


# --- validity window -------------------------------------------------------------------


def test_valid_from_is_inclusive_and_valid_until_exclusive():
    start, end = T0 + 20 * S, T0 + 10 * H
    e = engine(campaign_rules(valid_from=iso(start, "Asia/Shanghai"), valid_until=iso(end)))
    assert pushes(run(e, enter("a", start - 1))) == []
    assert blocked(e, "not_yet_valid") == 1
    assert len(pushes(run(e, enter("b", start)))) == 1
    assert len(pushes(run(e, enter("c", end - 1)))) == 1
    assert pushes(run(e, enter("d", end))) == []
    assert blocked(e, "expired") == 1


def test_validity_accepts_yaml_datetimes_and_rejects_naive_or_inverted():
    doc = yaml.safe_load("t: 2026-12-01T00:00:00+08:00\nn: 2026-12-01T00:00:00\n")
    r = campaign_rules(valid_from=doc["t"]).rules[0]
    assert r.campaign is not None
    assert r.campaign.valid_from_ms == local_ms("Asia/Shanghai", 2026, 12, 1)
    with pytest.raises(RulesError, match="needs an offset"):
        campaign_rules(valid_from=doc["n"])
    with pytest.raises(RulesError, match="needs an offset"):
        campaign_rules(valid_from="2026-12-01T00:00:00")
    with pytest.raises(RulesError, match="valid_until: must be after valid_from"):
        campaign_rules(valid_from="2026-12-02T00:00:00Z", valid_until="2026-12-01T00:00:00Z")


# --- scope -----------------------------------------------------------------------------


def test_scope_halls_and_terminals():
    e = engine(campaign_rules(scope={"halls": ["H1", "H2"], "terminals": ["T1", "T7"]}))
    assert len(pushes(run(e, enter("a", T0, hall="H2", terminal="T7")))) == 1
    assert pushes(run(e, enter("b", T0, hall="H3", terminal="T1"))) == []
    assert pushes(run(e, enter("c", T0, hall="H1", terminal="T2"))) == []
    assert blocked(e, "scope") == 2


def test_scope_segments_read_the_profile():
    e = engine(campaign_rules(scope={"segments": ["youth"]}),
               profiles=[profile("a", segment="youth"), profile("b", segment="senior")])
    assert len(pushes(run(e, enter("a", T0)))) == 1
    assert pushes(run(e, enter("b", T0))) == []
    assert pushes(run(e, enter("nobody", T0))) == []
    assert blocked(e, "scope") == 2


def test_scope_pois_with_the_generic_location_trigger():
    rules = campaign_rules(trigger={"kind": "event", "type": "location"},
                           scope={"pois": ["concert_hall"]}, once_per="24h")
    e = engine(rules)
    assert len(pushes(run(e, [location("a", T0, poi="concert_hall")]))) == 1
    assert pushes(run(e, [location("b", T0, poi="cinema")])) == []
    assert pushes(run(e, [location("c", T0, poi=None)])) == []
    assert blocked(e, "scope") == 2


# --- quiet hours and time targeting ----------------------------------------------------

SH = "Asia/Shanghai"


def test_quiet_hours_cross_midnight_in_their_time_zone():
    e = engine(campaign_rules(quiet_hours={"from": "22:00", "until": "08:00",
                                           "timezone": SH}))
    cases = [
        ((2026, 12, 1, 21, 59, 59), True),
        ((2026, 12, 1, 22, 0, 0), False),  # from: inclusive
        ((2026, 12, 2, 0, 30, 0), False),
        ((2026, 12, 2, 7, 59, 59), False),
        ((2026, 12, 2, 8, 0, 0), True),  # until: exclusive
    ]
    for i, (at, sent) in enumerate(cases):
        got = pushes(run(e, enter(f"c{i}", local_ms(SH, *at))))
        assert (len(got) == 1) is sent, at
    assert blocked(e, "quiet_hours") == 3


def test_quiet_hours_default_to_the_file_time_zone():
    e = engine(campaign_rules(timezone=SH, quiet_hours={"from": "22:00", "until": "08:00"}))
    assert pushes(run(e, enter("a", local_ms(SH, 2026, 12, 1, 23, 0, 0)))) == []
    # 23:00 in Shanghai is 15:00 UTC: a UTC reading would have pushed
    assert len(pushes(run(e, enter("b", local_ms(SH, 2026, 12, 2, 9, 0, 0))))) == 1


def test_hours_and_days_targeting():
    # Saturday 2026-12-05, Sunday 06, Monday 07 (Shanghai)
    e = engine(campaign_rules(timezone=SH, hours=["10:00-12:00", "23:00-01:00"],
                              days=["sat", "sun"]))
    cases = [
        ((2026, 12, 5, 9, 59, 59), False),
        ((2026, 12, 5, 10, 0, 0), True),
        ((2026, 12, 5, 11, 59, 59), True),
        ((2026, 12, 5, 12, 0, 0), False),
        ((2026, 12, 6, 0, 30, 0), True),  # the window crossing midnight, on Sunday
        ((2026, 12, 7, 10, 30, 0), False),  # Monday
    ]
    for i, (at, sent) in enumerate(cases):
        got = pushes(run(e, enter(f"c{i}", local_ms(SH, *at))))
        assert (len(got) == 1) is sent, at
    assert blocked(e, "hours") == 3


@pytest.mark.parametrize("bad, msg", [
    ({"quiet_hours": {"from": "22:00", "until": "22:00"}}, "must differ"),
    ({"quiet_hours": {"from": "24:00", "until": "08:00"}}, "not a time of day"),
    ({"quiet_hours": {"from": "22:00", "until": "08:00", "timezone": "Mars/Base"}},
     "unknown time zone"),
    ({"hours": ["10:00"]}, "not a time window"),
    ({"hours": ["10:00-10:00"]}, "empty time window"),
    ({"days": ["someday"]}, "days"),
    ({"probability": 1.5}, "probability"),
    ({"control_group": 1.0}, "control_group"),
    ({"quota": {"max": -1}}, "quota"),
    ({"quota": {"max": 5, "per": "customer"}}, "quota"),
])
def test_bad_campaign_fields_are_named(bad: dict[str, Any], msg: str):
    with pytest.raises(RulesError, match=msg):
        campaign_rules(**bad)


def test_alert_rules_cannot_have_lottery_quota_or_control_group():
    doc = default_rules_doc()
    for r in doc["rules"]:
        if r["id"] == "help-sprite":
            r["probability"] = 0.5
    with pytest.raises(RulesError, match="a rule with an alert cannot have them"):
        parse_rules(doc, "t.yaml")


# --- the lottery ------------------------------------------------------------------------


def test_probability_zero_never_wins_and_one_always_wins():
    e0 = engine(campaign_rules(probability=0.0))
    e1 = engine(campaign_rules(probability=1.0))
    for i in range(50):
        assert pushes(run(e0, enter(f"c{i}", T0 + i * S))) == []
        assert len(pushes(run(e1, enter(f"c{i}", T0 + i * S)))) == 1
    assert blocked(e0, "lottery") == 50 and blocked(e1, "lottery") == 0


def _lottery_run(rules: RuleSet, n: int = 2000) -> set[str]:
    e = engine(rules)
    evs = [x for i in range(n) for x in enter(f"c{i}", T0 + i * S, terminal=f"T{i}")]
    return {p.customer_id for p in pushes(run(e, evs))}


def test_lottery_replays_draw_the_same_winners_at_about_the_probability():
    first = _lottery_run(campaign_rules(probability=0.3))
    again = _lottery_run(campaign_rules(probability=0.3))
    assert first == again
    assert 500 <= len(first) <= 700  # 2000 x 0.3 = 600, sd 20.5
    # a version bump (new text) does not redraw; a higher probability only adds winners
    assert _lottery_run(campaign_rules(probability=0.3, version=2)) == first
    more = _lottery_run(campaign_rules(probability=0.5))
    assert first < more


def test_lottery_draws_per_trigger_event_and_a_loss_uses_up_once_per():
    e = engine(campaign_rules(probability=0.5, once_per="24h"))
    winners = 0
    for i in range(40):
        out = run(e, enter(f"c{i}", T0))
        again = run(e, enter(f"c{i}", T0 + MIN))  # same period: no second draw
        assert pushes(again) == []
        winners += len(pushes(out))
    assert blocked(e, "once_per") == 40
    assert 0 < winners < 40
    assert blocked(e, "lottery") == 40 - winners


# --- the control group ------------------------------------------------------------------


def _holdouts(out: list[Any]) -> list[Holdout]:
    return [x for x in out if type(x) is Holdout]


def test_control_group_holds_out_a_stable_share_and_records_it():
    rules = campaign_rules(control_group=0.2, campaign="xmas-2026", version=3)
    e = engine(rules)
    evs = [x for i in range(2000) for x in enter(f"c{i}", T0 + i * S, terminal=f"T{i}")]
    out = run(e, evs)
    held = _holdouts(out)
    sent = pushes(out)
    assert len(held) + len(sent) == 2000
    assert 340 <= len(held) <= 460  # 2000 x 0.2 = 400, sd 17.9
    assert {h.customer_id for h in held}.isdisjoint({p.customer_id for p in sent})
    h0 = held[0]
    assert (h0.rule_id, h0.rule_version, h0.campaign, h0.hall, h0.module) == (
        "concert", 3, "xmas-2026", "H1", "concert_tickets")
    e._fold_counts()
    assert e.counts["rule", "concert", "holdouts"] == len(held)
    # a restart from a snapshot, a later event and a new rule version: the same group
    snap = unpack(pack(e.snapshot()))
    e2 = engine(campaign_rules(control_group=0.2, campaign="xmas-2026", version=4),
                state=snap)
    later = [x for i in range(2000) for x in enter(f"c{i}", T0 + D + i * S,
                                                   terminal=f"T{i}")]
    out2 = run(e2, later)
    assert {h.customer_id for h in _holdouts(out2)} == {h.customer_id for h in held}


# --- the campaign quota -----------------------------------------------------------------


def test_quota_refusal_does_not_use_up_once_per_and_counts_blocked():
    store = InMemoryQuotaStore()
    e = engine(campaign_rules(quota={"max": 2}, once_per="24h"), quota=store)
    for i in range(4):
        run(e, enter(f"c{i}", T0 + i * S))
    assert blocked(e, "quota") == 2
    assert store.taken("concert") == 2
    # more prizes (a live rule change): the refused customers can still win today
    e.set_rules(campaign_rules(quota={"max": 4}, once_per="24h", version=2))
    got = pushes(run(e, enter("c2", T0 + H) + enter("c3", T0 + H)))
    assert sorted(p.customer_id for p in got) == ["c2", "c3"]
    assert {p.rule_version for p in got} == {2}


def test_quota_shared_by_rules_of_one_campaign():
    doc = {"version": 1, "guards": {"max_pushes_per_customer": 0}, "rules": [
        {"id": "concert-a", "campaign": "concert", "trigger": ENTER, "push": PUSH,
         "quota": {"max": 3}},
        {"id": "concert-b", "campaign": "concert",
         "trigger": {"kind": "event", "type": "location", "poi": "concert_hall"},
         "push": PUSH, "quota": {"max": 3}},
    ]}
    store = InMemoryQuotaStore()
    e = engine(parse_rules(doc, "t.yaml"), quota=store)
    out = run(e, [x for i in range(3) for x in enter(f"a{i}", T0 + i * S)])
    out += run(e, [location(f"b{i}", T0 + H + i * S, poi="concert_hall") for i in range(3)])
    assert len(pushes(out)) == 3 and store.taken("concert") == 3


def _race(stores: Sequence[QuotaStore], prizes: int, per_worker: int) -> list[Push]:
    """Two workers (shards), each in its own thread, each with its own customers, deciding
    at once against the shared quota, each taking a rules update (version 2, same
    quota) halfway; their pushes."""
    rules = campaign_rules(quota={"max": prizes}, once_per="24h")
    update = campaign_rules(quota={"max": prizes}, once_per="24h", version=2)
    results: list[list[Any]] = [[] for _ in stores]
    barrier = threading.Barrier(len(stores))

    def worker(k: int) -> None:
        e = engine(rules, quota=stores[k], shard=k)
        evs = [x for i in range(per_worker)
               for x in enter(f"w{k}-{i}", T0 + i * S, terminal=f"T{k}-{i}")]
        barrier.wait()
        out: list[Any] = []
        for j, env in enumerate(evs):
            if j == len(evs) // 2:
                e.set_rules(update)
            e.apply(env, out)
        results[k] = out

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [p for out in results for p in pushes(out)]


def test_quota_never_exceeded_by_two_workers_in_memory():
    store = InMemoryQuotaStore()
    got = _race([store, store], prizes=37, per_worker=300)
    assert len(got) == 37 == len({p.push_id for p in got})
    assert store.taken("concert") == 37


def test_quota_replay_after_restart_keeps_prizes_and_uses_no_more():
    store = InMemoryQuotaStore()
    rules = campaign_rules(quota={"max": 3}, once_per="24h")
    e = engine(rules, quota=store)
    run(e, enter("a", T0))
    snap = unpack(pack(e.snapshot()))
    first = pushes(run(e, [x for i in range(5) for x in enter(f"c{i}", T0 + (i + 1) * S)]))
    # crash: a new engine from the snapshot replays the same events
    e2 = engine(rules, quota=store, state=snap)
    again = pushes(run(e2, [x for i in range(5) for x in enter(f"c{i}", T0 + (i + 1) * S)]))
    assert [p.push_id for p in again] == [p.push_id for p in first] and len(first) == 2
    assert store.taken("concert") == 3


@pytest.mark.integration
def test_quota_never_exceeded_by_two_workers_on_redis(redis_url: str):
    clients = [redis.Redis.from_url(redis_url) for _ in range(2)]
    try:
        prefix = f"quota-test-{time.time_ns()}:"
        stores: list[QuotaStore] = [RedisQuotaStore(c, prefix=prefix) for c in clients]
        got = _race(stores, prizes=23, per_worker=150)
        assert len(got) == 23 == len({p.push_id for p in got})
        assert stores[0].taken("concert") == stores[1].taken("concert") == 23
    finally:
        for c in clients:
            c.close()


def test_quota_store_down_refuses_and_counts():
    class Down:
        def take(self, campaign: str, limit: int, token: str) -> bool:
            raise ConnectionError("refused")

        def taken(self, campaign: str) -> int:
            return 0

        def restore(self, campaign: str, tokens: Sequence[str]) -> None:
            raise ConnectionError("refused")

    e = engine(campaign_rules(quota={"max": 5}), quota=Down())
    assert pushes(run(e, enter("a", T0))) == []
    assert blocked(e, "quota_unavailable") == 1


# --- the generic event trigger, and rule ids on every push and alert ---------------------


def test_generic_event_trigger_matches_type_action_module_and_step():
    rules = campaign_rules(trigger={"kind": "event", "type": "click", "action": "step_enter",
                                    "module": "care_link", "step": "pair"},
                           push={"kind": "tip", "text": "Hold the button 3 s"},
                           once_per="24h")
    e = engine(rules)
    out = run(e, [click("a", T0, "session_start"),
                  click("a", T0 + S, "step_enter", module="care_link", step="scan"),
                  click("a", T0 + 2 * S, "step_enter", module="music", step="pair"),
                  click("a", T0 + 3 * S, "step_enter", module="care_link", step="pair")])
    got = pushes(out)
    assert len(got) == 1
    p = got[0]
    assert p.content["module"] == "care_link" and p.reason["action"] == "step_enter"
    assert (p.rule_id, p.rule_version) == ("concert", 1)


def test_generic_calls_trigger_needs_a_push_module():
    with pytest.raises(RulesError, match=r"push\.module: required"):
        campaign_rules(trigger={"kind": "event", "type": "calls"}, push={"kind": "offer"})
    with pytest.raises(RulesError, match=r"action, module\(s\) and step are for click"):
        campaign_rules(trigger={"kind": "event", "type": "calls", "action": "x"})
    e = engine(campaign_rules(trigger={"kind": "event", "type": "calls"}, once_per="24h"))
    assert len(pushes(run(e, [calls("a", T0, 1, 2)]))) == 1


def test_every_push_and_alert_names_rule_id_and_version():
    h = Harness(profiles=[profile(C, subscriptions=["care_link"], prefs={"music": ["x"]})])
    h.feed(location(C, T0 - 2 * H), location(C, T0), click(C, T0 + S, "session_start"),
           click(C, T0 + 2 * S, "step_enter", module="care_link", step="pair"))
    h.advance(T0 + 5 * MIN)
    assert h.pushes and h.alerts
    for p in h.pushes:
        assert p.rule_id and p.rule_version == 1 and p.reason["rule_version"] == 1
    for a in h.alerts:
        assert a.data["rule_id"] and a.data["rule_version"] == 1


def test_campaign_guards_block_dwell_alerts_too():
    doc = default_rules_doc()
    for r in doc["rules"]:
        if r["id"] == "help-sprite":
            r["scope"] = {"halls": ["H9"]}
    h = Harness(rules=parse_rules(doc, "t.yaml"))
    h.feed(click(C, T0, "session_start"),
           click(C, T0 + S, "step_enter", module="care_link", step="pair"))
    h.advance(T0 + 5 * MIN)
    assert h.alerts_of("touchstream.dwell.customer") == [] and h.pushes_of("help-sprite") == []
    assert h.count("rule", "help-sprite", "blocked:scope") == 1


def test_the_concert_lottery_example_in_the_default_rules_is_valid_and_runs():
    text = DEFAULT_RULES_PATH.read_text("utf-8")
    lines = text[text.index("# BEGIN concert-lottery"):text.index("# END concert-lottery")]
    body = "\n".join(ln.strip()[2:] for ln in lines.splitlines()[1:])
    rule = yaml.safe_load(body)[0]
    doc = {"version": 1, "timezone": SH, "guards": {"max_pushes_per_customer": 0},
           "rules": [rule]}
    rs = parse_rules(doc, "example.yaml")
    camp = rs.rules[0].campaign
    assert camp is not None and camp.quota == 200 and camp.halls == {"SH-PUDONG-01",
                                                                    "SH-XUHUI-03"}
    store = InMemoryQuotaStore()
    e = engine(rs, quota=store)
    at = local_ms(SH, 2026, 12, 24, 15, 0, 0)
    out: list[Any] = []
    for i in range(3000):
        cid = f"c{i}"
        out += run(e, [click(cid, at - S, "session_start", hall="SH-PUDONG-01"),
                       click(cid, at + i, "module_enter", module="music",
                             hall="SH-PUDONG-01")])
    won, held = pushes(out), [x for x in out if type(x) is Holdout]
    assert 0 < len(won) <= 200 and store.taken("concert-2026-12") == len(won)
    assert 200 <= len(held) <= 400  # 10 % of 3000
    assert won[0].content["text"].startswith("You won")
    # outside the halls, before the start, in quiet hours: nothing
    assert pushes(run(e, [click("x", at, "session_start", hall="BJ-01"),
                          click("x", at + S, "module_enter", module="music", hall="BJ-01")])
                  ) == []
    early = local_ms(SH, 2026, 12, 1, 8, 59, 59)
    quiet = local_ms(SH, 2026, 12, 10, 23, 0, 0)
    for cid, t in (("y", early), ("z", quiet)):
        assert pushes(run(e, [click(cid, t - S, "session_start", hall="SH-PUDONG-01"),
                              click(cid, t, "module_enter", module="music",
                                    hall="SH-PUDONG-01")])) == []


def test_quota_taken_survives_a_process_restart_through_the_snapshot():
    rules = campaign_rules(quota={"max": 3}, once_per="24h")
    e = engine(rules, quota=InMemoryQuotaStore())
    assert len(pushes(run(e, enter("a", T0) + enter("b", T0 + S)))) == 2
    snap = unpack(pack(e.snapshot()))
    fresh = InMemoryQuotaStore()  # a new process: its in-memory store starts empty
    e2 = engine(rules, quota=fresh, state=snap)
    assert fresh.taken("concert") == 2
    got = pushes(run(e2, [x for i in range(5) for x in enter(f"c{i}", T0 + H + i * S)]))
    assert len(got) == 1 and fresh.taken("concert") == 3


def test_step_friction_rules_cannot_have_campaign_guards():
    doc = default_rules_doc()
    for r in doc["rules"]:
        if r["id"] == "step-friction":
            r["hours"] = ["09:00-18:00"]
    with pytest.raises(RulesError, match="step_friction concerns many customers"):
        parse_rules(doc, "t.yaml")
