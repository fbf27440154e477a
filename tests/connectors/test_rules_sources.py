"""Rule change sources: the watched file, the Redis key + pub/sub, the Kafka control
topic (against the private redis-server and Tansu fixtures), and the control source's
decisions, resume state and end."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from connectors.rules_sources import (
    ControlSource,
    FileRules,
    Incoming,
    InputEnd,
    KafkaRules,
    QueueRules,
    RedisRules,
    RulesBackend,
    end_with_input,
    publish_kafka,
    publish_redis,
    read_kafka_rules,
)
from flows.codec import json_dumps, json_loads
from flows.control import ActiveRules, RulesChange, RulesStatus, RulesUpdate
from flows.runner import rules_status_message
from tests.flows.helpers import default_rules_doc


def v(n: int, min_visits: int | None = None) -> dict[str, Any]:
    doc = default_rules_doc()
    doc["version"] = n
    if min_visits is not None:
        r = next(r for r in doc["rules"] if r["id"] == "cinema-pay")
        r["trigger"]["min_visits"] = min_visits
        r["version"] = n
    return doc


def _bytes(inc: Incoming) -> bytes:
    assert isinstance(inc.data, bytes)
    return inc.data


def wait_for(poll: Callable[[], list[Incoming]], timeout: float = 5.0) -> list[Incoming]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = poll()
        if got:
            return got
        time.sleep(0.02)
    return []


def drain(part: Any, timeout: float = 5.0, want: int = 1) -> list[Any]:
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(out) < want:
        out.extend(part.next_batch())
        time.sleep(0.02)
    return out


# --- the file --------------------------------------------------------------------------


def _write(path: Path, doc: dict[str, Any], mtime_ns: int) -> None:
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_the_file_watcher_reads_a_stable_new_content_once(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    t = time.time_ns()
    _write(f, v(1), t)
    w = FileRules(f, interval_s=0.0)
    w.start(None)
    first = w.poll()
    assert len(first) == 1 and first[0].catch_up and yaml.safe_load(_bytes(first[0])) == v(1)
    assert w.poll() == []  # nothing changed
    _write(f, v(2, 3), t + 1_000_000_000)
    assert w.poll() == []  # changed: waits one poll to see it stable
    got = w.poll()
    assert len(got) == 1 and not got[0].catch_up
    assert yaml.safe_load(_bytes(got[0]))["version"] == 2
    assert w.poll() == []


def test_a_bad_file_is_rejected_and_the_running_set_stays(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    t = time.time_ns()
    _write(f, v(1), t)
    src = ControlSource(ActiveRules.of(v(1), str(f)), [FileRules(f, interval_s=0.0)],
                        now_ms=lambda: 42)
    part = src.build_part("rules_in", "rules", None)
    assert drain(part, 0.2, want=99) == []  # the start file again: unchanged, nothing
    bad = v(2, 3)
    bad["rules"][0]["trigger"]["window"] = "a fortnight"
    _write(f, bad, t + 1_000_000_000)
    items = drain(part)
    assert len(items) == 1 and isinstance(items[0], RulesStatus)
    assert items[0].outcome == "rejected" and items[0].active_version == 1
    assert any("window" in e for e in items[0].errors)
    good = v(2, 3)
    _write(f, good, t + 2_000_000_000)
    items = drain(part, want=2)
    assert [type(i) for i in items] == [RulesUpdate, RulesStatus]
    assert items[0].version == 2 and items[0].doc == good
    assert items[1].outcome == "accepted"
    assert part.snapshot()["active"][0] == 2


# --- control source ------------------------------------------------------------------


def test_the_resume_state_keeps_the_active_set_and_never_applies_twice() -> None:
    q = QueueRules()
    src = ControlSource(ActiveRules.of(v(1)), [q], now_ms=lambda: 1)
    part = src.build_part("rules_in", "rules", None)
    q.put(json_dumps(v(2, 3)))
    assert [type(i) for i in drain(part, want=2)] == [RulesUpdate, RulesStatus]
    state = part.snapshot()
    part.close()
    announced: list[int] = []
    src2 = ControlSource(ActiveRules.of(v(1)), [q], now_ms=lambda: 2,
                         on_accept=lambda a: announced.append(a.version))
    part2 = src2.build_part("rules_in", "rules", state)
    assert announced == [2]  # the resumed set is announced (the /ops console)
    q.put(json_dumps(v(2, 3)))  # the same change delivered again
    assert drain(part2, 0.2, want=99) == []
    q.put(json_dumps(v(2, 4)))  # same version, other content: a conflict
    (st,) = drain(part2)
    assert isinstance(st, RulesStatus) and st.outcome == "rejected"


def test_the_control_source_ends_with_the_event_input() -> None:
    from bytewax.testing import TestingSource

    latch = InputEnd()
    events = end_with_input(TestingSource([1, 2]), latch)
    src = ControlSource(ActiveRules.of(v(1)), [QueueRules()], until=latch)
    part = src.build_part("rules_in", "rules", None)
    assert part.next_batch() == []
    assert not latch.done()
    ev_part = events.build_part("events_in", "iterable", None)  # type: ignore[attr-defined]
    with pytest.raises(StopIteration):
        for _ in range(10):
            ev_part.next_batch()
    assert latch.done()
    with pytest.raises(StopIteration):
        part.next_batch()


def test_the_status_message_is_the_decision_as_json() -> None:
    s = RulesStatus("rejected", "replace", 3, 2, "kafka:ops.rules/0@5", 7, ("bad",))
    msg = rules_status_message("ops.rules.status")(s)
    assert msg.topic == "ops.rules.status" and msg.key == b"rejected"
    assert json_loads(msg.value) == s.to_dict()


# --- Redis -----------------------------------------------------------------------------


@pytest.mark.integration
def test_redis_key_changes_arrive_through_pub_sub(redis_url: str) -> None:
    pub = redis.Redis.from_url(redis_url)
    key, chan = "touchstream:rules:test", "touchstream:rules:test"
    # resync every minute: only the pub/sub message can make it read the key in time
    b: RulesBackend = RedisRules(lambda: redis.Redis.from_url(redis_url), key, chan,
                                 resync_s=60.0)
    b.start(None)
    try:
        assert b.poll() == []  # no key yet
        publish_redis(pub, RulesChange.replace(v(2, 3), "t"), key, chan)
        got = wait_for(b.poll, timeout=1.0)
        assert len(got) == 1 and not got[0].catch_up
        change = json_loads(_bytes(got[0]))
        assert change["op"] == "replace" and change["ruleset"] == v(2, 3)
        pub.publish(chan, b"2")  # told again, same value: nothing new
        time.sleep(0.05)
        assert b.poll() == []
    finally:
        b.close()
        pub.close()


@pytest.mark.integration
def test_a_value_already_in_redis_at_start_is_catch_up(redis_url: str) -> None:
    pub = redis.Redis.from_url(redis_url)
    publish_redis(pub, RulesChange.replace(v(3, 5), "t"), "k", "c")
    src = ControlSource(ActiveRules.of(v(1)),
                        [RedisRules(lambda: redis.Redis.from_url(redis_url), "k", "c")],
                        now_ms=lambda: 1)
    part = src.build_part("rules_in", "rules", None)
    try:
        items = drain(part, want=2)
        assert [type(i) for i in items] == [RulesUpdate, RulesStatus]
        assert items[0].version == 3
    finally:
        part.close()
        pub.close()


# --- Kafka -----------------------------------------------------------------------------


@pytest.mark.integration
def test_the_kafka_control_topic_is_folded_in_order(tansu: str,
                                                    tansu_topic: Callable[..., str]) -> None:
    topic = tansu_topic(1)
    base = v(1)
    cinema = copy.deepcopy(next(r for r in base["rules"] if r["id"] == "cinema-pay"))
    cinema["version"] = 3
    cinema["trigger"]["min_visits"] = 4
    publish_kafka(tansu, RulesChange.replace(v(2, 3), "t"), topic)
    publish_kafka(tansu, RulesChange("upsert", 3, "t", rule=cinema), topic)
    publish_kafka(tansu, RulesChange("delete", 3, "t", rule_id="call-spike"), topic)  # stale

    src = ControlSource(ActiveRules.of(base), [KafkaRules(tansu, topic)], now_ms=lambda: 1)
    part = src.build_part("rules_in", "rules", None)
    try:
        items = drain(part, timeout=10.0, want=4)
        updates = [i for i in items if isinstance(i, RulesUpdate)]
        statuses = [i for i in items if isinstance(i, RulesStatus)]
        assert [u.version for u in updates] == [2, 3]
        cp = next(r for r in updates[-1].doc["rules"] if r["id"] == "cinema-pay")
        assert cp["trigger"]["min_visits"] == 4
        # the stale delete was already there at start: catch-up, logged but not published
        assert [(s.outcome, s.version) for s in statuses] == [("accepted", 2), ("accepted", 3)]
        state = part.snapshot()
        assert state["cursors"][f"kafka:{topic}"] == {"0": 3}
        # a live change after start: its rejection is published
        publish_kafka(tansu, RulesChange("delete", 3, "t", rule_id="call-spike"), topic)
        (st,) = drain(part, timeout=10.0)
        assert isinstance(st, RulesStatus) and st.outcome == "rejected"
        assert st.origin == f"kafka:{topic}/0@3"
    finally:
        part.close()

    # resumed from the snapshot: nothing is read or applied again
    part2 = src.build_part("rules_in", "rules", state)
    try:
        again = drain(part2, timeout=1.5, want=99)
        assert [i.outcome for i in again if isinstance(i, RulesStatus)] == ["rejected"]
        assert not [i for i in again if isinstance(i, RulesUpdate)]
    finally:
        part2.close()

    active, decisions = read_kafka_rules(tansu, ActiveRules.of(base), topic)
    assert active.version == 3
    assert [d.outcome for d in decisions] == ["accepted", "accepted", "rejected", "rejected"]


# --- the runner: demo traffic, the watched file, Redis -------------------------------


@pytest.mark.integration
def test_run_live_takes_rule_changes_from_the_file_and_redis(
        tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import threading

    from flows.runner import run_live
    from flows.settings import load_settings

    f = tmp_path / "rules.yaml"
    t = time.time_ns()
    _write(f, v(1), t)
    settings = load_settings(mode="live", rules_file=str(f), demo_rate=50.0,
                             redis={"url": redis_url}, recovery={"enabled": False})
    pub = redis.Redis.from_url(redis_url)

    def operator() -> None:
        time.sleep(1.0)
        _write(f, v(2, 3), t + 1_000_000_000)  # the file: v2
        time.sleep(1.0)
        publish_redis(pub, RulesChange.replace(v(3, 4), "ops"))  # Redis: v3
        time.sleep(1.0)
        bad = v(4, 5)
        bad["rules"][0]["push"] = None  # cinema-pay with neither push nor alert
        _write(f, bad, t + 2_000_000_000)

    th = threading.Thread(target=operator)
    caplog.set_level(logging.INFO, logger="connectors.rules_sources")
    th.start()
    try:
        run_live(settings, duration_s=4.5, handle_signals=False)  # ends by itself
    finally:
        th.join()
    msgs = [r.getMessage() for r in caplog.records if r.name == "connectors.rules_sources"]
    assert any("version 2 (replace" in m and "accepted" in m for m in msgs), msgs
    assert any("version 3 (replace" in m and "accepted" in m for m in msgs), msgs
    assert any("rejected; version 3 stays active" in m for m in msgs), msgs
    # the /ops console's copy of the active set follows the accepted changes
    raw = pub.get("ops:rules")
    assert isinstance(raw, bytes)
    summary = json_loads(raw)
    assert summary["version"] == 3 and summary["timezone"] == "UTC"
    assert next(r for r in summary["rules"] if r["id"] == "cinema-pay")["version"] == 3
    pub.close()


# --- the command line ------------------------------------------------------------------


@pytest.mark.integration
def test_cli_publishes_and_shows_through_redis(tmp_path: Path, redis_url: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main as cli_main

    f = tmp_path / "v2.yaml"
    f.write_text(yaml.safe_dump(v(2, 3)), encoding="utf-8")
    assert cli_main(["rules", "publish", str(f), "--redis", redis_url]) == 0
    assert cli_main(["rules", "show", "--redis", redis_url]) == 0
    out = capsys.readouterr().out
    assert "version 2 published to Redis touchstream:rules" in out
    assert "version 2 (" in out and "cinema-pay" in out
    bad = tmp_path / "bad.yaml"
    doc = v(3, 0)  # min_visits 0: invalid, refused before anything is sent
    bad.write_text(yaml.safe_dump(doc), encoding="utf-8")
    assert cli_main(["rules", "publish", str(bad), "--redis", redis_url]) == 2
    assert "min_visits" in capsys.readouterr().err
    assert cli_main(["rules", "show", "--redis", redis_url, "--json"]) == 0
    assert json_loads(capsys.readouterr().out)["version"] == 2


@pytest.mark.integration
def test_cli_publishes_changes_to_the_control_topic_and_shows_their_fold(
        tmp_path: Path, tansu: str, capsys: pytest.CaptureFixture[str],
        tansu_topic: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli import main as cli_main

    # A topic of its own: engines of other tests on this broker read the default
    # ops.rules from its start, and would run this test's rule sets.
    topic = tansu_topic(1)
    monkeypatch.setenv("TOUCHSTREAM_KAFKA__RULES_TOPIC", topic)
    start, _ = read_kafka_rules(tansu, ActiveRules.of(v(1)), topic)
    n = start.version
    f = tmp_path / "next.yaml"
    f.write_text(yaml.safe_dump(v(n + 1, 3)), encoding="utf-8")
    assert cli_main(["rules", "publish", str(f), "--kafka", tansu]) == 0
    assert cli_main(["rules", "publish", "--delete", "call-spike", "--version", str(n + 2),
                     "--kafka", tansu]) == 0
    capsys.readouterr()
    assert cli_main(["rules", "show", "--kafka", tansu, "--json"]) == 0
    shown = json_loads(capsys.readouterr().out)
    assert shown["version"] == n + 2
    assert "call-spike" not in [r["id"] for r in shown["rules"]]
