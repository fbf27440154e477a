"""The live intake: raw records routed to shards by key, decoded and time-checked there,
profiles prefetched once per batch; and the live flow end to end on 1 and 2 workers."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from flows.aggregates import shard_key
from flows.codec import json_dumps
from flows.engine import EngineConfig, ShardEngine, shard_of
from flows.experience import (
    ClusterTerms,
    ClusterTermsError,
    LiveIntake,
    Outputs,
    ShardBatch,
    ShardCountError,
    ShardRouter,
    _ShardLogic,
    build_flow,
)
from flows.model import DEFAULT_LIMITS, DeadLetter, Envelope, Profile, RawRecord
from flows.rules import RuleSet, load_default_rules, parse_rules
from flows.runner import tune_gc
from flows.settings import Settings
from state.profiles import InMemoryProfileStore

NOW = 1_790_000_000_000
ROOT = Path(__file__).resolve().parents[2]


def rec(doc: dict[str, Any] | bytes, *, key: bytes | None = None, source: str = "net.calls/0",
        pos: int = 0) -> RawRecord:
    value = doc if isinstance(doc, bytes) else json_dumps(doc)
    return RawRecord(source, pos, value, key)


def calls(cid: str, ts: int = NOW, total: int = 2) -> dict[str, Any]:
    return {"type": "calls", "customer_id": cid, "ts": ts, "interval_s": 300,
            "calls_in": total, "calls_out": 0, "missed": 0}


def session_start(cid: str, ts: int = NOW) -> dict[str, Any]:
    return {"type": "click", "customer_id": cid, "ts": ts, "terminal_id": "H01-T01",
            "hall_id": "H01", "action": "session_start"}


class SpyProfiles(InMemoryProfileStore):
    """Records every prefetch call."""

    def __init__(self, profiles: Iterable[Profile] = ()) -> None:
        super().__init__(profiles)
        self.prefetched: list[list[str]] = []

    def prefetch(self, customer_ids: Iterable[str]) -> Mapping[str, Profile]:
        self.prefetched.append(list(customer_ids))
        return {}


def test_router_groups_by_key_shard_keeping_arrival_order() -> None:
    router = ShardRouter(8, DEFAULT_LIMITS)
    records = [rec(calls(f"c{i % 5}"), key=f"c{i % 5}".encode(), pos=i) for i in range(40)]
    groups = {k: b.records for k, b in router(records)}
    assert sum(len(g) for g in groups.values()) == 40
    for key, group in groups.items():
        for r in group:
            cid = r.key.decode()  # type: ignore[union-attr]
            assert key == shard_key(shard_of(cid, 8))
        assert [r.pos for r in group] == sorted(r.pos for r in group)


def test_router_decodes_keyless_records_and_sends_garbage_to_shard_zero() -> None:
    router = ShardRouter(8, DEFAULT_LIMITS)
    groups = {k: b.records for k, b in router([rec(calls("c7")), rec(b"{not json")])}
    assert groups[shard_key(shard_of("c7", 8))][0].value == json_dumps(calls("c7"))
    assert any(r.value == b"{not json" for r in groups[shard_key(shard_of("", 8))])


def test_router_prefetches_the_profiles_of_clicks_only_once_per_batch() -> None:
    spy = SpyProfiles()
    router = ShardRouter(8, DEFAULT_LIMITS, spy, "touch.clicks/")
    router([
        rec(session_start("a"), key=b"a", source="touch.clicks/0"),
        rec(calls("b"), key=b"b", source="net.calls/1"),
        rec(session_start("c"), key=b"c", source="touch.clicks/2"),
    ])
    assert spy.prefetched == [["a", "c"]]


def test_router_does_not_look_up_keys_that_cannot_be_customer_ids() -> None:
    spy = SpyProfiles()
    router = ShardRouter(8, DEFAULT_LIMITS, spy, "touch.clicks/")
    longest = 4 * DEFAULT_LIMITS.max_customer_id_len
    router([
        rec(session_start("a"), key=b"a", source="touch.clicks/0"),
        rec(session_start("a"), key=b"x" * (longest + 1), source="touch.clicks/0"),
        rec(session_start("a"), key=b"", source="touch.clicks/0"),
        rec(session_start("b"), key=b"y" * longest, source="touch.clicks/1"),
    ])
    assert spy.prefetched == [["a", "y" * longest]]


def test_intake_dead_letters_bad_mismatched_stale_and_future_records() -> None:
    intake = LiveIntake(DEFAULT_LIMITS, lateness_ms=300_000, horizon_ms=86_400_000,
                        skew_ms=3_600_000)
    out: list[Any] = []
    envs = intake([[
        rec(calls("a"), key=b"a"),
        rec(b"\xff\xfe"),
        rec(calls("b"), key=b"not-b"),
        rec(calls("c", ts=NOW - 600_000), key=b"c"),       # stale: history only
        rec(calls("d", ts=NOW - 2 * 86_400_000), key=b"d"),  # beyond the horizon
        rec(calls("e", ts=NOW + 2 * 3_600_000), key=b"e"),   # from the future
    ]], NOW, out)
    assert [(e.event.customer_id, e.fresh) for e in envs] == [("a", True), ("c", False)]
    assert all(type(e) is Envelope for e in envs)
    assert sorted(d.reason for d in out if type(d) is DeadLetter) == [
        "invalid_json", "key_mismatch", "late", "ts_in_future"]


def test_live_batch_prefetches_clicking_customers_for_the_shard() -> None:
    spy = SpyProfiles([Profile("a", subscriptions=frozenset({"care_link"}))])
    eng = ShardEngine(0, load_default_rules(), spy, EngineConfig())
    intake = LiveIntake(DEFAULT_LIMITS, 300_000, 86_400_000, 3_600_000)
    out: list[Any] = []
    envs = intake([[rec(session_start("a"), key=b"a"), rec(calls("b"), key=b"b")]], NOW, out)
    eng.on_live_batch(envs, NOW, out)
    assert spy.prefetched == [["a"]]
    assert [p.rule_id for p in out] == ["setup-first"]


class HoldingProfiles(InMemoryProfileStore):
    """Prefetch returns the profiles it was given; ``get`` knows nobody, and counts."""

    def __init__(self, held: Iterable[Profile]) -> None:
        super().__init__()
        self.held = {p.customer_id: p for p in held}
        self.gets: list[str] = []

    def get(self, customer_id: str) -> Profile:
        self.gets.append(customer_id)
        return super().get(customer_id)

    def prefetch(self, customer_ids: Iterable[str]) -> Mapping[str, Profile]:
        return {c: self.held[c] for c in customer_ids if c in self.held}


class CountingProfiles(HoldingProfiles):
    """:class:`HoldingProfiles` that records every prefetch call (thread-safe enough for
    workers in one process: list appends)."""

    def __init__(self, held: Iterable[Profile]) -> None:
        super().__init__(held)
        self.prefetched: list[list[str]] = []
        self.remembered: list[dict[str, Profile]] = []

    def remember(self, profiles: Mapping[str, Profile]) -> None:
        self.remembered.append(dict(profiles))

    def prefetch(self, customer_ids: Iterable[str]) -> Mapping[str, Profile]:
        ids = list(customer_ids)
        self.prefetched.append(ids)
        return super().prefetch(ids)


def click_rec(cid: str, pos: int = 0) -> RawRecord:
    return rec(session_start(cid), key=cid.encode(), source="touch.clicks/0", pos=pos)


def test_router_hands_each_shard_the_profiles_it_read_for_that_shards_clicks() -> None:
    held = [Profile(c, subscriptions=frozenset({"care_link"})) for c in ("a", "c", "b")]
    store = CountingProfiles(held)
    router = ShardRouter(8, DEFAULT_LIMITS, store, "touch.clicks/")
    out = router([click_rec("a", 0), rec(calls("b"), key=b"b", pos=1), click_rec("c", 2),
                  click_rec("a", 3), click_rec("z", 4)])
    assert store.prefetched == [["a", "c", "a", "z"]]  # one read for the batch, clicks only
    by_shard = dict(out)
    assert all(type(b) is ShardBatch for b in by_shard.values())
    for batch in by_shard.values():
        clicking = {r.key.decode() for r in batch.records  # type: ignore[union-attr]
                    if r.source.startswith("touch.clicks/")}
        # what the store returned for this shard's clicking customers, nothing else
        # ("z": the store has nothing; "b": no click, so not read)
        assert dict(batch.profiles) == {c: store.held[c] for c in clicking if c in store.held}
    assert sum(len(b.profiles) for b in by_shard.values()) == 2


def test_router_without_clicks_or_store_reads_nothing_and_hands_nothing() -> None:
    store = CountingProfiles([Profile("b")])
    with_store = ShardRouter(8, DEFAULT_LIMITS, store, "touch.clicks/")
    no_store = ShardRouter(8, DEFAULT_LIMITS)
    for router in (with_store, no_store):
        out = router([rec(calls("b"), key=b"b"), rec(calls("c"))])
        assert all(len(b.profiles) == 0 for _, b in out)
    assert store.prefetched == []


def test_live_batch_reads_what_the_router_handed_it_and_prefetches_only_the_rest() -> None:
    store = CountingProfiles([Profile("b", subscriptions=frozenset({"care_link"}))])
    eng = ShardEngine(0, load_default_rules(), store, EngineConfig())
    intake = LiveIntake(DEFAULT_LIMITS, 300_000, 86_400_000, 3_600_000)
    out: list[Any] = []
    envs = intake([[click_rec("a"), click_rec("b", 1)]], NOW, out)
    handed = {"a": Profile("a", subscriptions=frozenset({"care_link"}))}
    eng.on_live_batch(envs, NOW, out, handed)
    assert store.prefetched == [["b"]]  # "a" came with the batch
    assert store.remembered == [handed]  # and is known here, should Redis go away
    assert store.gets == []  # no rule went back to the store
    assert sorted(p.customer_id for p in out if getattr(p, "rule_id", None) == "setup-first") \
        == ["a", "b"]


def test_live_batch_with_every_profile_handed_reads_no_store() -> None:
    store = CountingProfiles([])
    eng = ShardEngine(0, load_default_rules(), store, EngineConfig())
    intake = LiveIntake(DEFAULT_LIMITS, 300_000, 86_400_000, 3_600_000)
    out: list[Any] = []
    handed = {"a": Profile("a", subscriptions=frozenset({"care_link"}))}
    eng.on_live_batch(intake([[click_rec("a"), rec(calls("x"), key=b"x")]], NOW, out), NOW,
                      out, handed)
    assert store.prefetched == [] and store.gets == []
    assert [p.rule_id for p in out if hasattr(p, "rule_id")] == ["setup-first"]


def test_shard_batches_and_profiles_pickle_round_trip_for_the_exchange() -> None:
    import pickle

    p = Profile("a", subscriptions=frozenset({"music", "care_link"}),
                configured=frozenset({"music"}), handset="h", segment="s",
                prefs={"music": ("jazz", "folk")}, opt_out=True, trials={"x": 5})
    assert pickle.loads(pickle.dumps(p)) == p
    router = ShardRouter(8, DEFAULT_LIMITS, CountingProfiles([p]), "touch.clicks/")
    for _, batch in router([click_rec("a"), rec(calls("b"), key=b"b")]):
        back = pickle.loads(pickle.dumps(batch))
        assert back.records == batch.records
        assert dict(back.profiles) == dict(batch.profiles)
        assert back.shards == batch.shards == 8
        assert back.terms == batch.terms == 0
    terms = ClusterTerms.of(Settings(), load_default_rules()).digest
    [(_, batch)] = ShardRouter(8, DEFAULT_LIMITS, terms=terms)([click_rec("a")])
    assert batch.terms == terms != 0
    assert pickle.loads(pickle.dumps(batch)).terms == terms


def test_a_shard_refuses_records_routed_with_another_shard_count() -> None:
    """A cluster whose processes were started with different ``engine.shards`` fails at
    the first batch one process routes to a shard of the other, instead of splitting
    customers' state between two shards."""
    eng = ShardEngine(-1, load_default_rules(), InMemoryProfileStore(), EngineConfig(shards=8))
    intake = LiveIntake(DEFAULT_LIMITS, lateness_ms=300_000, horizon_ms=86_400_000,
                        skew_ms=3_600_000)
    logic = _ShardLogic(eng, intake, lambda: NOW, 60_000, recovery=False)
    records = [rec(calls("c1"), key=b"c1")]
    [(_, other)] = ShardRouter(16, DEFAULT_LIMITS)(records)
    with pytest.raises(ShardCountError, match=r"engine.shards = 8 got records routed with "
                                              r"engine.shards = 16"):
        logic.on_batch([other])
    assert eng.customers == {}  # nothing of that batch was applied
    [(_, same)] = ShardRouter(8, DEFAULT_LIMITS)(records)
    logic.on_batch([same])
    assert list(eng.customers) == ["c1"]


def _rules_with_help_after(dwell: str) -> RuleSet:
    import yaml

    from flows.rules import DEFAULT_RULES_RESOURCE

    doc = yaml.safe_load((ROOT / "flows" / DEFAULT_RULES_RESOURCE).read_text())
    for r in doc["rules"]:
        if r["id"] == "help-sprite":
            r["trigger"]["dwell"] = dwell
    return parse_rules(doc)


@pytest.mark.parametrize("change", [
    {"engine": {"shards": 32}},
    {"engine": {"allowed_lateness_s": 60}},
    {"engine": {"history_horizon_s": 3600}},
    {"engine": {"max_clock_skew_s": 1}},
    {"engine": {"max_message_bytes": 1024}},
    {"engine": {"max_attrs_bytes": 512}},
    {"engine": {"idle_ttl_s": 3600}},
    {"engine": {"session_idle_s": 60}},
    {"engine": {"conversion_window_s": 60}},
    {"engine": {"sweep_interval_s": 60}},
    "rules",
])
def test_cluster_terms_change_with_every_setting_shards_decide_by(change: Any) -> None:
    rules = load_default_rules()
    base = ClusterTerms.of(Settings(), rules)
    if change == "rules":
        other = ClusterTerms.of(Settings(), _rules_with_help_after("10m"))
        assert other.values["rules"] != base.values["rules"]
    else:
        other = ClusterTerms.of(Settings(**change), rules)
    assert other.digest != base.digest
    assert ClusterTerms.of(Settings(), load_default_rules()) == base
    # what a cluster's processes may differ in is not in them
    assert ClusterTerms.of(Settings(engine={"workers": 2, "process_id": 1,
                                            "addresses": ["a:1", "b:2"],
                                            "epoch_interval_s": 2.0}), rules) == base


def test_cluster_terms_name_every_engine_config_field() -> None:
    """A field added to EngineConfig (what every shard engine runs with) joins the terms,
    or processes could disagree on it unseen."""
    import dataclasses

    keys = set(ClusterTerms.of(Settings(), load_default_rules()).values)
    for f in dataclasses.fields(EngineConfig):
        stem = f.name.removesuffix("_ms")
        assert {f"engine.{stem}", f"engine.{stem}_s"} & keys, f.name


def test_cluster_terms_digest_is_the_same_in_another_process() -> None:
    """The digest crosses processes: no hash seed may reach it (a frozenset's order would)."""
    here = ClusterTerms.of(Settings(), load_default_rules())
    code = ("from flows.experience import ClusterTerms; from flows.settings import Settings; "
            "from flows.rules import load_default_rules; "
            "print(ClusterTerms.of(Settings(), load_default_rules()).digest)")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env={"PYTHONHASHSEED": seed}, cwd=ROOT)
        assert int(out.stdout) == here.digest
    assert str(here).startswith(f"{here.digest:08x} (engine.shards = 64, ")
    assert f"rules = version {here.values['rules'].split()[1]}" in str(here)


def test_a_shard_refuses_records_routed_by_a_process_with_other_cluster_terms() -> None:
    """Processes of one cluster started with another lateness (or limits, windows, rules
    file) would decide for a customer differently depending on which process holds the
    shard: the first batch routed across stops the cluster, naming this side's terms."""
    rules = load_default_rules()
    settings = Settings()
    here = ClusterTerms.of(settings, rules)
    there = ClusterTerms.of(Settings(engine={"allowed_lateness_s": 60}), rules)
    eng = ShardEngine(-1, rules, InMemoryProfileStore(), EngineConfig(shards=64))
    intake = LiveIntake(DEFAULT_LIMITS, lateness_ms=300_000, horizon_ms=86_400_000,
                        skew_ms=3_600_000)
    logic = _ShardLogic(eng, intake, lambda: NOW, 60_000, recovery=False, terms=here)
    records = [rec(calls("c1"), key=b"c1")]
    [(_, other)] = ShardRouter(64, DEFAULT_LIMITS, terms=there.digest)(records)
    with pytest.raises(ClusterTermsError, match="other cluster terms") as err:
        logic.on_batch([other])
    assert "engine.allowed_lateness_s = 300.0" in str(err.value)
    assert f"{there.digest:08x} there, {here.digest:08x} here" in str(err.value)
    assert not isinstance(err.value, ShardCountError)
    assert eng.customers == {}  # nothing of that batch was applied
    [(_, same)] = ShardRouter(64, DEFAULT_LIMITS, terms=here.digest)(records)
    logic.on_batch([same])
    assert list(eng.customers) == ["c1"]
    # another shard count says so, whatever else differs
    [(_, fewer)] = ShardRouter(32, DEFAULT_LIMITS, terms=there.digest)(records)
    with pytest.raises(ShardCountError, match=r"engine\.shards = 32"):
        logic.on_batch([fewer])


@pytest.mark.parametrize("workers", [1, 2])
def test_live_flow_shards_use_the_profiles_the_router_read(workers: int) -> None:
    """Each clicking customer's profile is read once, by the router (a shard reading
    it again would list it twice), and the rules see it (``get`` knows nobody)."""
    ids = [f"s{i}" for i in range(20)]
    store = CountingProfiles([Profile(c, subscriptions=frozenset({"care_link"})) for c in ids])
    pushes: list[Any] = []
    flow = build_flow(
        Settings(), source=TestingSource([click_rec(c, i) for i, c in enumerate(ids)],
                                         batch_size=3),
        outputs=Outputs(pushes=[TestingSink(pushes)]), rules=load_default_rules(),
        profiles=store, now_ms=lambda: NOW)
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    assert sorted(c for call in store.prefetched for c in call) == sorted(ids)
    assert store.gets == []
    assert sorted(p.customer_id for p in pushes) == sorted(ids)


def test_live_batch_rules_read_the_profiles_the_prefetch_returned() -> None:
    store = HoldingProfiles([Profile("a", subscriptions=frozenset({"care_link"}))])
    eng = ShardEngine(0, load_default_rules(), store, EngineConfig())
    intake = LiveIntake(DEFAULT_LIMITS, 300_000, 86_400_000, 3_600_000)
    out: list[Any] = []
    envs = intake([[rec(session_start("a"), key=b"a")]], NOW, out)
    eng.on_live_batch(envs, NOW, out)
    # ``get`` would have said "no subscriptions": the push proves the rule read the
    # prefetched profile, and no rule went back to the store for it
    assert [p.rule_id for p in out] == ["setup-first"]
    assert store.gets == []


def test_what_a_batch_prefetched_is_not_held_after_the_batch() -> None:
    store = HoldingProfiles([Profile("a", subscriptions=frozenset({"care_link"}))])
    eng = ShardEngine(0, load_default_rules(), store, EngineConfig())
    intake = LiveIntake(DEFAULT_LIMITS, 300_000, 86_400_000, 3_600_000)
    out: list[Any] = []
    eng.on_live_batch(intake([[rec(calls("x"), key=b"x"),
                                rec(session_start("a"), key=b"a")]], NOW, out), NOW, out)
    out.clear()
    # a later event outside a prefetching batch reads the store (which knows nobody)
    eng.on_live_event(intake([[rec(session_start("a", NOW + 1), key=b"a")]], NOW, out)[0],
                      NOW + 1, out)
    assert store.gets and set(store.gets) == {"a"}
    assert [p.rule_id for p in out if hasattr(p, "rule_id")] == []


def test_a_store_with_nothing_to_prefetch_is_read_per_rule() -> None:
    store = SpyProfiles([Profile("a", subscriptions=frozenset({"care_link"}))])
    eng = ShardEngine(0, load_default_rules(), store, EngineConfig())
    intake = LiveIntake(DEFAULT_LIMITS, 300_000, 86_400_000, 3_600_000)
    out: list[Any] = []
    eng.on_live_batch(intake([[rec(session_start("a"), key=b"a")]], NOW, out), NOW, out)
    assert [p.rule_id for p in out] == ["setup-first"]


def _live_run(records: list[RawRecord], workers: int) -> tuple[list[Any], list[Any]]:
    pushes: list[Any] = []
    dead: list[Any] = []
    flow = build_flow(
        Settings(), source=TestingSource(records, batch_size=3),
        outputs=Outputs(pushes=[TestingSink(pushes)], dead_letters=[TestingSink(dead)]),
        rules=load_default_rules(),
        profiles=InMemoryProfileStore([Profile(f"s{i}", subscriptions=frozenset({"care_link"}))
                                       for i in range(20)]),
        now_ms=lambda: NOW,
    )
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return pushes, dead


@pytest.mark.parametrize("workers", [1, 2])
def test_live_flow_routes_decodes_and_dead_letters_on_workers(workers: int) -> None:
    records = [rec(session_start(f"s{i}"), key=f"s{i}".encode(), source="touch.clicks/0", pos=i)
               for i in range(20)]
    records += [rec(b"garbage", pos=100), rec(calls("x"), key=b"y", pos=101)]
    pushes, dead = _live_run(records, workers)
    assert sorted(p.customer_id for p in pushes) == sorted(f"s{i}" for i in range(20))
    assert {p.rule_id for p in pushes} == {"setup-first"}
    assert sorted(d.reason for d in dead) == ["invalid_json", "key_mismatch"]


def test_tune_gc_raises_the_threshold_and_zero_leaves_it() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(0)
        assert gc.get_threshold() == before
        tune_gc(12_345)
        assert gc.get_threshold()[0] == 12_345
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_raw_records_pickle_round_trip_for_the_cross_process_exchange() -> None:
    import pickle

    for r in (RawRecord("t/0", 7, b"{}", b"k", "msgpack"), RawRecord("demo", 1, b"x")):
        assert pickle.loads(pickle.dumps(r)) == r


def step_recs(cid: str, ts: int, pos: int = 0) -> list[RawRecord]:
    """A session, a module and a step entered: help-sprite's timer is set for ts+90 s."""
    docs = [session_start(cid, ts),
            {"type": "click", "customer_id": cid, "ts": ts + 1, "terminal_id": "H01-T01",
             "hall_id": "H01", "action": "module_enter", "module": "remote_cam"},
            {"type": "click", "customer_id": cid, "ts": ts + 2, "terminal_id": "H01-T01",
             "hall_id": "H01", "action": "step_enter", "module": "remote_cam",
             "step": "pair"}]
    return [rec(d, key=cid.encode(), source="touch.clicks/0", pos=pos + i)
            for i, d in enumerate(docs)]


def test_due_timers_read_their_profiles_in_one_round_trip() -> None:
    """Many help-sprite timers due at once read the profiles of the customers they fire
    for in one prefetch, no ``get`` per timer; a timer that no longer applies (its
    customer left the step) reads nothing, and ones not yet due wait."""
    ids = [f"t{i}" for i in range(12)]
    store = CountingProfiles([Profile(c, subscriptions=frozenset({"care_link"}))
                              for c in ids])
    eng = ShardEngine(0, load_default_rules(), store, EngineConfig())
    intake = LiveIntake(DEFAULT_LIMITS, 300_000, 86_400_000, 3_600_000)
    out: list[Any] = []
    records = [r for i, c in enumerate(ids) for r in step_recs(c, NOW + 10 * i, 3 * i)]
    left = {"type": "click", "customer_id": "t3", "ts": NOW + 5_000, "terminal_id": "H01-T01",
            "hall_id": "H01", "action": "step_exit", "module": "remote_cam", "step": "pair"}
    records.append(rec(left, key=b"t3", source="touch.clicks/0", pos=99))
    eng.on_live_batch(intake([records], NOW + 5_000, out), NOW + 5_000,
                      out, {c: store.held[c] for c in ids})
    store.prefetched.clear()
    out.clear()
    eng.fire_due(NOW + 90_000 + 75, out)  # t0..t7 are due (t3 no longer applies)
    assert [sorted(p) for p in store.prefetched] == [["t0", "t1", "t2", "t4", "t5", "t6", "t7"]]
    assert store.gets == []
    fired = sorted(p.customer_id for p in out if getattr(p, "rule_id", "") == "help-sprite")
    assert fired == ["t0", "t1", "t2", "t4", "t5", "t6", "t7"]
    eng.fire_due(NOW + 90_000 + 200, out)  # the rest, in a second read
    assert [sorted(p) for p in store.prefetched[1:]] == [["t10", "t11", "t8", "t9"]]
    assert store.gets == []
