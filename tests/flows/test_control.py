"""Rule changes while running: change messages, validation and versions (flows.control),
and the live flow applying a change once, at the same point, on every shard."""

from __future__ import annotations

import copy
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.testing import TestingSource, cluster_main

from connectors.rules_sources import ControlSource, InputEnd, QueueRules, end_with_input
from flows.aggregates import shard_key
from flows.codec import json_dumps
from flows.control import (
    ActiveRules,
    RulesChange,
    RulesStatus,
    change_message,
    compile_update,
    decide,
    parse_change,
)
from flows.experience import Outputs, RulesApplied, build_flow
from flows.model import Push, RawRecord
from flows.rules import RulesError, parse_rules
from flows.settings import load_settings
from state.profiles import InMemoryProfileStore
from tests.flows.helpers import default_rules_doc
from tests.flows.test_live import Recorder

NOW = 1_700_000_000_000


def base_doc() -> dict[str, Any]:
    """The default rules at version 1."""
    return default_rules_doc()


def active() -> ActiveRules:
    return ActiveRules.of(base_doc(), "test")


def rule(doc: dict[str, Any], rid: str) -> dict[str, Any]:
    return next(r for r in doc["rules"] if r["id"] == rid)


# --- parsing ---------------------------------------------------------------------------


def test_a_bare_rules_file_is_a_whole_set_replacement() -> None:
    doc = base_doc()
    doc["version"] = 4
    ch = parse_change(json_dumps(doc), "t")
    assert (ch.op, ch.version, ch.ruleset) == ("replace", 4, doc)


def test_change_messages_round_trip_through_their_wire_form() -> None:
    r = copy.deepcopy(rule(base_doc(), "cinema-pay"))
    for ch in (RulesChange("upsert", 2, "t", rule=r, base_version=1),
               RulesChange("delete", 3, "t", rule_id="cinema-pay"),
               RulesChange.replace({**base_doc(), "version": 5}, "t")):
        back = parse_change(change_message(ch), "t")
        assert (back.op, back.version, back.rule, back.rule_id, back.ruleset,
                back.base_version) == (ch.op, ch.version, ch.rule, ch.rule_id, ch.ruleset,
                                       ch.base_version)


@pytest.mark.parametrize(("msg", "err"), [
    (b"{not json", "not valid YAML/JSON"),
    (b'{"op": "rename", "version": 2}', "op: must be"),
    (b'{"op": "upsert", "version": 2}', "an upsert needs one rule"),
    (b'{"op": "delete", "version": 0, "rule_id": "x"}', "version: must be a positive"),
    (b'{"op": "replace", "version": 3, "ruleset": {"version": 2, "rules": []}}',
     "differs from the rule set's own version"),
    (b"[1, 2]", "must be a mapping"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_malformed_change_messages_are_refused_with_a_reason(msg: bytes, err: str) -> None:
    with pytest.raises(RulesError) as ei:
        parse_change(msg, "kafka:ops.rules/0@7")
    assert err in str(ei.value)
    assert "kafka:ops.rules/0@7" in str(ei.value)


# --- decisions -------------------------------------------------------------------------


def test_a_valid_higher_version_is_accepted_whole() -> None:
    doc = base_doc()
    doc["version"] = 2
    rule(doc, "cinema-pay")["trigger"]["min_visits"] = 3
    rule(doc, "cinema-pay")["version"] = 2
    d = decide(active(), RulesChange.replace(doc, "f"), NOW)
    assert d.status.outcome == "accepted"
    assert d.update is not None and d.update.version == 2 and d.active.doc == doc
    assert d.status.to_dict()["rule_ids"] == [r.id for r in parse_rules(doc).rules]


@pytest.mark.parametrize(("active_version", "version"), [(1, 1), (3, 2)])
def test_a_version_that_does_not_increase_is_rejected(active_version: int,
                                                      version: int) -> None:
    a = ActiveRules.of({**base_doc(), "version": active_version}, "test")
    doc = base_doc()
    doc["version"] = version
    doc["guards"]["max_pushes_per_customer"] = 9
    d = decide(a, RulesChange.replace(doc, "f"), NOW)
    assert d.status.outcome == "rejected"
    assert d.active is a and d.update is None
    assert any(f"must be higher than the active version {active_version}" in e
               for e in d.status.errors)


def test_one_bad_rule_rejects_the_whole_set_and_the_old_one_stays() -> None:
    doc = base_doc()
    doc["version"] = 2
    rule(doc, "cinema-pay")["trigger"]["min_visits"] = "lots"
    rule(doc, "call-spike")["version"] = 2
    rule(doc, "call-spike")["trigger"]["factor"] = 5.0
    a = active()
    d = decide(a, RulesChange.replace(doc, "f"), NOW)
    assert d.status.outcome == "rejected" and d.active is a and d.update is None
    assert any("cinema-pay" in e and "min_visits" in e for e in d.status.errors)
    assert d.status.active_version == 1


def test_a_changed_rule_must_carry_a_higher_rule_version() -> None:
    doc = base_doc()
    doc["version"] = 2
    rule(doc, "cinema-pay")["trigger"]["min_visits"] = 5  # content changed, version not
    d = decide(active(), RulesChange.replace(doc, "f"), NOW)
    assert d.status.outcome == "rejected"
    assert any("rule 'cinema-pay': version" in e for e in d.status.errors)


def test_the_same_set_again_is_unchanged_not_rejected() -> None:
    a = active()
    d = decide(a, RulesChange.replace(base_doc(), "f"), NOW)
    assert d.status.outcome == "unchanged" and d.update is None and d.active is a


def test_upsert_replaces_or_adds_one_rule_and_sets_the_version() -> None:
    a = active()
    r = copy.deepcopy(rule(a.doc, "cinema-pay"))
    r["version"] = 2
    r["trigger"]["min_visits"] = 4
    d = decide(a, RulesChange("upsert", 2, "k", rule=r, base_version=1), NOW)
    assert d.status.outcome == "accepted"
    assert rule(d.active.doc, "cinema-pay")["trigger"]["min_visits"] == 4
    assert d.active.version == d.active.doc["version"] == 2
    assert len(d.active.doc["rules"]) == len(a.doc["rules"])
    new = {"id": "stadium", "trigger": {"kind": "location_frequency", "poi": "stadium"},
           "push": {"module": "music", "kind": "offer"}}
    d2 = decide(d.active, RulesChange("upsert", 3, "k", rule=new), NOW)
    assert d2.status.outcome == "accepted"
    assert [x["id"] for x in d2.active.doc["rules"]][-1] == "stadium"
    assert rule(a.doc, "cinema-pay")["trigger"]["min_visits"] == 2  # the old doc untouched


def test_upsert_checks_the_base_version_and_the_rule() -> None:
    a = active()
    r = copy.deepcopy(rule(a.doc, "cinema-pay"))
    r["version"] = 2
    stale = decide(a, RulesChange("upsert", 3, "k", rule=r, base_version=7), NOW)
    assert stale.status.outcome == "rejected"
    assert any("base_version: 7 is not the active version 1" in e for e in stale.status.errors)
    r["trigger"]["window"] = "forever"
    bad = decide(a, RulesChange("upsert", 2, "k", rule=r), NOW)
    assert bad.status.outcome == "rejected" and bad.active is a


def test_delete_removes_one_rule_and_refuses_an_unknown_id() -> None:
    a = active()
    d = decide(a, RulesChange("delete", 2, "k", rule_id="call-spike"), NOW)
    assert d.status.outcome == "accepted"
    assert "call-spike" not in [r["id"] for r in d.active.doc["rules"]]
    gone = decide(d.active, RulesChange("delete", 3, "k", rule_id="call-spike"), NOW)
    assert gone.status.outcome == "rejected"
    assert any("no rule 'call-spike'" in e for e in gone.status.errors)


def test_compiled_sets_are_shared_per_digest() -> None:
    doc = base_doc()
    doc["version"] = 2
    d = decide(active(), RulesChange.replace(doc, "f"), NOW)
    assert d.update is not None
    u = d.update
    a = compile_update(u.version, u.doc, u.digest, u.origin)
    b = compile_update(u.version, u.doc, u.digest, u.origin)
    assert a is b and a.version == 2


def test_active_rules_survive_their_snapshot_form() -> None:
    a = active()
    assert ActiveRules.from_state(a.to_state()) == a


# --- the live flow, two workers ----------------------------------------------------------


def _now() -> int:
    return time.time_ns() // 1_000_000


class _PhasePart(StatefulSourcePartition[RawRecord, None]):
    def __init__(self, phases: list[tuple[float, list[dict[str, Any]]]], end_s: float,
                 marks: dict[str, float]) -> None:
        self.t0 = time.monotonic()
        self.phases = list(phases)
        self.end_s = end_s
        self.marks = marks
        self.pos = 0

    def next_batch(self) -> list[RawRecord]:
        el = time.monotonic() - self.t0
        if el >= self.end_s:
            raise StopIteration
        out: list[RawRecord] = []
        if self.phases and self.phases[0][0] <= el:
            at, events = self.phases.pop(0)
            now = _now()
            for i, ev in enumerate(events):
                self.pos += 1
                # distinct times (one ms apart, just behind the wall clock) for each event
                doc = {**ev, "ts": now - 2 * len(events) + i}
                out.append(RawRecord("clicks/0", self.pos, json_dumps(doc),
                                     key=ev["customer_id"].encode()))
            self.marks[f"phase@{at}"] = time.monotonic()
        return out

    def next_awake(self) -> datetime | None:
        nxt = self.phases[0][0] if self.phases else self.end_s
        return datetime.fromtimestamp(time.time() + max(0.0, nxt - (time.monotonic()
                                                                    - self.t0)), tz=UTC)

    def snapshot(self) -> None:
        return None


class PhasedSource(FixedPartitionedSource[RawRecord, None]):
    """Batches of events at planned offsets (seconds), then the end at ``end_s``."""

    def __init__(self, phases: list[tuple[float, list[dict[str, Any]]]], end_s: float) -> None:
        self.phases = phases
        self.end_s = end_s
        self.marks: dict[str, float] = {}

    def list_parts(self) -> list[str]:
        return ["plan"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _PhasePart:
        return _PhasePart(self.phases, self.end_s, self.marks)


def _cinema(cid: str, n: int) -> list[dict[str, Any]]:
    return [{"type": "location", "customer_id": cid, "cell_id": "C1", "poi": "cinema"}] * n


def _v1() -> dict[str, Any]:
    doc = base_doc()
    # visits a few ms apart count separately; 3 of them make a push
    rule(doc, "cinema-pay")["trigger"].update(min_visits=3, visit_gap="1ms")
    return doc


def _v2(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["version"] = 2
    r = rule(doc, "cinema-pay")
    r["version"] = 2
    r["push"]["text"] = "Pay for the film with your phone"
    return doc


SHARDS = 4


def test_a_change_mid_stream_applies_once_at_the_same_point_on_every_shard() -> None:
    v1 = _v1()
    v1_rules = parse_rules(v1, "v1")
    early = [f"1380000{i:04d}" for i in range(12)]  # 3 visits before the change: v1 pushes
    split = [f"1390000{i:04d}" for i in range(12)]  # 2 before, 1 after: history kept, v2
    late = [f"1370000{i:04d}" for i in range(12)]  # 3 visits after the change: v2 pushes
    bad_doc = _v2(v1)
    bad_doc["version"] = 3
    rule(bad_doc, "cinema-pay")["version"] = 3
    rule(bad_doc, "cinema-pay")["trigger"]["min_visits"] = 0  # invalid: ge=1
    rule(bad_doc, "call-spike")["version"] = 3
    rule(bad_doc, "call-spike")["trigger"]["min_total"] = 1  # valid, but the set is bad
    phases = [
        (0.0, [e for c in early for e in _cinema(c, 3)] + [e for c in split
                                                           for e in _cinema(c, 2)]),
        (1.2, [e for c in split for e in _cinema(c, 1)] + [e for c in late
                                                           for e in _cinema(c, 3)]),
        (2.4, [e for c in early for e in _cinema(c, 1)]),  # once_per: nothing new
    ]
    source = PhasedSource(phases, end_s=3.0)
    queue = QueueRules()
    latch = InputEnd()
    control = ControlSource(ActiveRules.of(v1, "v1"), [queue], poll_s=0.02, until=latch)
    settings = load_settings(mode="live", engine={"stats_interval_s": 0.5, "shards": SHARDS})
    pushes, statuses, applied = Recorder(), Recorder(), Recorder()
    flow = build_flow(settings, source=end_with_input(source, latch),
                      outputs=Outputs(pushes=[pushes], rules_status=[statuses],
                                      rules_applied=[applied]),
                      rules=v1_rules, profiles=InMemoryProfileStore(), control=control)

    changed: dict[str, float] = {}

    def operator() -> None:
        time.sleep(0.6)
        queue.put(json_dumps({"op": "replace", "ruleset": _v2(v1)}), "ops")
        changed["v2"] = time.monotonic()
        time.sleep(1.2)
        queue.put(json_dumps({"op": "replace", "ruleset": bad_doc}), "ops")
        queue.put(b"{broken", "ops")

    t = threading.Thread(target=operator)
    t.start()
    cluster_main(flow, [], 0, worker_count_per_proc=2)  # type: ignore[no-untyped-call]
    t.join()

    got: list[Push] = [p for _, p in pushes.got]
    by_customer = {p.customer_id: p for p in got if p.rule_id == "cinema-pay"}
    assert sorted(by_customer) == sorted(early + split + late)  # one push each
    assert len([p for p in got if p.rule_id == "cinema-pay"]) == len(by_customer)
    assert {by_customer[c].rule_version for c in early} == {1}
    assert {by_customer[c].rule_version for c in split + late} == {2}
    # the change reached the shards between the two phases
    assert source.marks["phase@0.0"] < changed["v2"] < source.marks["phase@1.2"]

    # every shard key and the friction key took version 2 exactly once; nothing took 3
    keys = [(k, a.version) for _, (k, a) in applied.got]
    assert all(isinstance(a, RulesApplied) for _, (_k, a) in applied.got)
    assert sorted(keys) == sorted([(shard_key(i), 2) for i in range(SHARDS)]
                                  + [("friction", 2)])

    sts: list[RulesStatus] = [s for _, s in statuses.got]
    assert [(s.outcome, s.version) for s in sts] == [("accepted", 2), ("rejected", 3),
                                                     ("rejected", None)]
    assert sts[1].active_version == 2
    assert any("cinema-pay" in e and "min_visits" in e for e in sts[1].errors)


def test_rule_changes_are_read_by_the_event_input_step_not_a_second_one() -> None:
    """Two input steps' epochs drift apart in Bytewax 0.21.1 (connectors.wrapped,
    ``with_partitions_of``): the rule-change partition is one more partition of
    ``events_in``, and the flow has no other input step."""
    latch = InputEnd()
    control = ControlSource(active(), [QueueRules()], poll_s=0.05, until=latch)
    settings = load_settings(mode="live", engine={"shards": SHARDS})
    flow = build_flow(settings, source=end_with_input(TestingSource([]), latch),
                      outputs=Outputs(), rules=parse_rules(base_doc(), "t"),
                      profiles=InMemoryProfileStore(), control=control)
    inputs = [s for s in flow.substeps if type(s).__name__ == "input"]  # op.input steps
    assert [s.step_name for s in inputs] == ["events_in"]
    assert inputs[0].source.list_parts() == ["iterable", "control:rules"]


def test_the_active_set_survives_a_crash_with_the_shard_state(tmp_path: Path) -> None:
    """Recovery: the rule set a shard took is in its snapshot, with the customers."""
    from bytewax.recovery import RecoveryConfig, init_db_dir
    from bytewax.testing import TestingSink, TestingSource, run_main

    init_db_dir(tmp_path, 1)  # type: ignore[no-untyped-call]
    t0 = 1_700_000_000_000
    v1 = _v1()
    rule(v1, "cinema-pay")["trigger"]["min_visits"] = 2

    def rec(pos: int, ts: int) -> RawRecord:
        return RawRecord("net.location/0", pos, json_dumps(
            {"type": "location", "customer_id": "13800000009", "ts": ts, "cell_id": "c",
             "poi": "cinema", "event_id": f"e{pos}"}), b"13800000009")

    items: list[Any] = [TestingSource.PAUSE(timedelta(seconds=0.3)), rec(0, t0 - 10),
                        TestingSource.PAUSE(timedelta(seconds=0.4)), TestingSource.ABORT(),
                        rec(1, t0)]

    def run(queue: QueueRules) -> list[Push]:
        settings = load_settings(mode="live", engine={"shards": SHARDS,
                                                      "stats_interval_s": 3600})
        pushes: list[Push] = []
        latch = InputEnd()
        control = ControlSource(ActiveRules.of(v1, "v1"), [queue], poll_s=0.02, until=latch)
        flow = build_flow(settings, source=end_with_input(TestingSource(items), latch),
                          outputs=Outputs(pushes=[TestingSink(pushes)]),
                          rules=parse_rules(v1, "v1"), profiles=InMemoryProfileStore(),
                          now_ms=lambda: t0 + 1000, recovery=True, control=control)
        run_main(flow, epoch_interval=timedelta(milliseconds=50),  # type: ignore[no-untyped-call]
                 recovery_config=RecoveryConfig(tmp_path))  # type: ignore[no-untyped-call]
        return pushes

    q1 = QueueRules()
    q1.put(json_dumps({"op": "replace", "ruleset": _v2(v1)}))
    assert run(q1) == []  # one visit: nothing yet; v2 taken, snapshot, then the crash
    second = run(QueueRules())  # started again with v1 as the start set, no change
    assert [(p.rule_id, p.rule_version) for p in second] == [("cinema-pay", 2)]
