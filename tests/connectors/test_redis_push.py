"""RedisPushOutput in real Bytewax dataflows against the session redis-server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pytest
import redis
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, cluster_main, run_main
from pydantic import SecretStr
from redis.crc import key_slot

from connectors.redis_push import (
    GuardSpec,
    RedisPushConfig,
    RedisPushOutput,
    _held_line,
    _read_spool,
    _RedisPushPartition,
    marker_key,
    read_channel,
)
from flows.codec import json_dumps, json_loads
from flows.model import Push, PushGuard
from flows.settings import RedisSettings
from state.guards import GuardRequest, InMemoryGuardStore
from state.redis_store import RedisGuardStore
from tests.faults.redis_server import PersistentRedis, fast_client
from tests.flows.helpers import MIN, H, Harness, click, location, profile, rules_with

T0 = 1_700_000_000_000


def push(
    i: int, channel: str = "terminal:T1", customer: str = "C1", guard: PushGuard | None = None
) -> Push:
    return Push(
        push_id=f"p{i}",
        customer_id=customer,
        channel=channel,
        rule_id="r-welcome",
        rule_version=2,
        content={"title": f"offer {i}", "n": i, "text": "caf\u00e9"},
        event_ts=T0 + i,
        reason={"rule": "r-welcome", "i": i},
        guard=guard,
    )


def flow_of(pushes: Sequence[Push], sink: RedisPushOutput, *, spread: bool = False) -> Dataflow:
    flow = Dataflow("redis_push_test")
    s = op.input("in", flow, TestingSource(list(pushes)))
    if spread:
        s = op.redistribute("spread", s)
    op.output("out", s, sink)
    return flow


def run(pushes: Sequence[Push], sink: RedisPushOutput) -> None:
    run_main(flow_of(pushes, sink))


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def entries(r: redis.Redis, channel: str) -> list[bytes]:
    return [fields[b"data"] for _, fields in r.xrange(f"push:{channel}")]


# --- no server needed -------------------------------------------------------------------


def test_config_from_settings_and_repr_hides_url() -> None:
    s = RedisSettings(url=SecretStr("redis://:secret@h:1/0"), stream_maxlen=50,
                      stream_ttl_s=60)
    cfg = RedisPushConfig.from_settings(s, publish=False)
    assert (cfg.url, cfg.stream_maxlen, cfg.stream_ttl_s, cfg.publish, cfg.cluster) == (
        "redis://:secret@h:1/0", 50, 60, False, False)
    assert RedisPushConfig.from_settings(
        RedisSettings(url=SecretStr("redis://h:1/0"), cluster=True)
    ).cluster
    assert "secret" not in repr(cfg)
    assert (cfg.max_held_effects, cfg.retry_interval_s, cfg.spool_dir) == (10_000, 0.5, None)
    held = RedisPushConfig.from_settings(
        RedisSettings(url=SecretStr("redis://h:1/0"), max_held_effects=7, retry_interval_s=2),
        spool_dir=Path("/var/lib/ts/redis-held"))
    assert (held.max_held_effects, held.retry_interval_s, held.spool_dir) == (
        7, 2.0, Path("/var/lib/ts/redis-held"))
    with pytest.raises(ValueError, match="max_held_effects"):
        RedisPushConfig(url="redis://x", max_held_effects=0)
    with pytest.raises(ValueError, match="url"):
        RedisPushConfig.from_settings(RedisSettings())
    with pytest.raises(ValueError, match="maxlen"):
        RedisPushConfig(url="redis://x", stream_maxlen=0)


def test_sink_makes_no_client_before_build() -> None:
    # an unreachable URL: constructing the sink must not connect
    sink = RedisPushOutput(RedisPushConfig(url="redis://127.0.0.1:1/0"))
    assert sink.stats() == {}


# --- against redis-server -----------------------------------------------------------------

integration = pytest.mark.integration


@integration
def test_flow_writes_push_json_to_channel_streams(redis_url: str, r: redis.Redis) -> None:
    term = [push(i) for i in range(3)]
    cust = [push(10 + i, channel="customer:C1") for i in range(2)]
    sink = RedisPushOutput(RedisPushConfig(url=redis_url))
    run([term[0], cust[0], term[1], term[2], cust[1]], sink)
    assert entries(r, "terminal:T1") == [json_dumps(p.to_dict()) for p in term]
    assert entries(r, "customer:C1") == [json_dumps(p.to_dict()) for p in cust]
    assert json_loads(entries(r, "terminal:T1")[0]) == term[0].to_dict()
    # the streams, and one delivery marker per push in its stream's slot
    assert sorted(k.decode() for k in r.keys("*")) == sorted(
        ["push:customer:C1", "push:terminal:T1"]
        + [f"guard:{{push:terminal:T1}}:sent:{p.push_id}" for p in term]
        + [f"guard:{{push:customer:C1}}:sent:{p.push_id}" for p in cust])
    assert 7 * 24 * 3600 < r.ttl("guard:{push:terminal:T1}:sent:p0") <= 7 * 24 * 3600 + 3600
    assert sink.stats() == {"written": 5}


@integration
def test_maxlen_exact_trim(redis_url: str, r: redis.Redis) -> None:
    sink = RedisPushOutput(
        RedisPushConfig(url=redis_url, stream_maxlen=5, approximate_trim=False)
    )
    pushes = [push(i) for i in range(20)]
    run(pushes, sink)
    assert r.xlen("push:terminal:T1") == 5
    assert entries(r, "terminal:T1") == [json_dumps(p.to_dict()) for p in pushes[-5:]]


@integration
def test_maxlen_approximate_trim_bounds_the_stream(redis_url: str, r: redis.Redis) -> None:
    sink = RedisPushOutput(RedisPushConfig(url=redis_url, stream_maxlen=10))
    pushes = [push(i) for i in range(1000)]
    run(pushes, sink)
    n = r.xlen("push:terminal:T1")
    # MAXLEN ~ trims whole stream nodes (100 entries by default): at least 10 kept,
    # never a full node more than asked for
    assert 10 <= n <= 10 + 100
    assert entries(r, "terminal:T1")[-1] == json_dumps(pushes[-1].to_dict())


@integration
def test_stream_ttl_is_set(redis_url: str, r: redis.Redis) -> None:
    run([push(1)], RedisPushOutput(RedisPushConfig(url=redis_url, stream_ttl_s=300)))
    assert 290 <= r.ttl("push:terminal:T1") <= 300
    run([push(2, channel="terminal:T2")],
        RedisPushOutput(RedisPushConfig(url=redis_url, stream_ttl_s=None)))
    assert r.ttl("push:terminal:T2") == -1  # no expiry asked for


def _collect(ps: Any, n: int, timeout_s: float = 5.0) -> list[tuple[bytes, bytes]]:
    got: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        msg = ps.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if msg is not None and msg["type"] == "message":
            got.append((msg["channel"], msg["data"]))
    return got


@integration
def test_live_subscriber_receives_pushes(redis_url: str, r: redis.Redis) -> None:
    ps = r.pubsub()
    ps.subscribe("push:terminal:T1")
    assert ps.get_message(timeout=2)["type"] == "subscribe"
    pushes = [push(i) for i in range(3)] + [push(9, channel="terminal:T9")]
    run(pushes, RedisPushOutput(RedisPushConfig(url=redis_url)))
    got = _collect(ps, 3)
    assert got == [(b"push:terminal:T1", json_dumps(p.to_dict())) for p in pushes[:3]]
    assert _collect(ps, 1, timeout_s=0.3) == []  # T9's push is not on T1's channel
    # publish=False: the stream is written, nothing is published
    run([push(4)], RedisPushOutput(RedisPushConfig(url=redis_url, publish=False)))
    assert _collect(ps, 1, timeout_s=0.3) == []
    assert r.xlen("push:terminal:T1") == 4
    ps.close()


@integration
def test_offline_terminal_resumes_from_last_id(redis_url: str) -> None:
    sink_cfg = RedisPushConfig(url=redis_url)
    first = [push(i) for i in range(5)]
    run(first, RedisPushOutput(sink_cfg))

    # the terminal reads in pages of 2, then goes offline
    term = redis.Redis.from_url(redis_url)
    seen: list[tuple[str, dict[str, Any]]] = []
    last = "0-0"
    while page := read_channel(term, "terminal:T1", last, count=2):
        seen += page
        last = page[-1][0]
    term.close()
    assert [d for _, d in seen] == [p.to_dict() for p in first]

    # while it is offline, more pushes arrive (another run of the engine)
    second = [push(100 + i) for i in range(4)]
    run(second, RedisPushOutput(sink_cfg))

    # "reconnect" with a new client and the saved id: exactly what was missed
    term = redis.Redis.from_url(redis_url, decode_responses=True)
    missed = read_channel(term, "terminal:T1", last, count=100)
    assert [d for _, d in missed] == [p.to_dict() for p in second]
    ids = [i for i, _ in seen + missed]
    assert len(set(ids)) == len(ids) == 9
    assert read_channel(term, "terminal:T1", missed[-1][0]) == []

    # a reader blocked on its last id wakes up with the next push
    got: list[list[tuple[str, dict[str, Any]]]] = []
    reader = threading.Thread(
        target=lambda: got.append(
            read_channel(term, "terminal:T1", missed[-1][0], block_ms=5000)
        )
    )
    reader.start()
    time.sleep(0.2)
    run([push(200)], RedisPushOutput(sink_cfg))
    reader.join(timeout=10)
    assert [d for _, d in got[0]] == [push(200).to_dict()]
    assert read_channel(term, "terminal:never") == []
    term.close()


@integration
@pytest.mark.parametrize("guard_kind", ["redis-factory", "redis-instance", "memory"])
def test_guard_stops_replayed_duplicates(
    redis_url: str, r: redis.Redis, guard_kind: str
) -> None:
    guard_client = redis.Redis.from_url(redis_url)
    guard: GuardSpec
    if guard_kind == "redis-factory":
        guard = RedisGuardStore
    elif guard_kind == "redis-instance":
        guard = RedisGuardStore(guard_client)
    else:
        guard = InMemoryGuardStore()
    cfg = RedisPushConfig(url=redis_url)
    pushes = [push(i) for i in range(4)]

    sink = RedisPushOutput(cfg, guard=guard)
    run([*pushes, pushes[1]], sink)  # a duplicate inside the same run too
    assert r.xlen("push:terminal:T1") == 4
    assert sink.stats() == {"written": 4, "duplicate": 1}

    # "restart": a new sink replays the same pushes plus one new one
    sink2 = RedisPushOutput(cfg, guard=guard)
    run([*pushes, push(4)], sink2)
    assert entries(r, "terminal:T1") == [json_dumps(p.to_dict()) for p in [*pushes, push(4)]]
    assert sink2.stats() == {"written": 1, "duplicate": 4}
    guard_client.close()


class RecordingOutput(RedisPushOutput):
    """Counts the items each worker's partition wrote."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.per_worker: Counter[int] = Counter()
        self._lock = threading.Lock()

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _RedisPushPartition:
        part = super().build(step_id, worker_index, worker_count)
        write = part.write_batch

        def counted(items: list[Push]) -> None:
            write(items)
            with self._lock:
                self.per_worker[worker_index] += len(items)

        part.write_batch = counted  # type: ignore[method-assign]
        return part


@integration
def test_two_workers_write_everything_once(redis_url: str, r: redis.Redis) -> None:
    channels = [f"terminal:T{i}" for i in range(4)]
    pushes = [push(i, channel=channels[i % 4], customer=f"C{i % 7}") for i in range(400)]
    sink = RecordingOutput(RedisPushConfig(url=redis_url), guard=RedisGuardStore)
    cluster_main(flow_of(pushes, sink, spread=True), [], 0, worker_count_per_proc=2)
    assert set(sink.per_worker) == {0, 1}  # both workers wrote
    assert sum(sink.per_worker.values()) == 400
    got = [json_loads(d)["push_id"] for ch in channels for d in entries(r, ch)]
    assert sorted(got) == sorted(p.push_id for p in pushes)
    for ch in channels:  # each channel keeps its own order of arrival, no repeats
        ids = [json_loads(d)["push_id"] for d in entries(r, ch)]
        assert len(ids) == len(set(ids)) == 100

    # replay the whole input on 2 workers: the shared guard admits nothing again
    sink2 = RecordingOutput(RedisPushConfig(url=redis_url), guard=RedisGuardStore)
    cluster_main(flow_of(pushes, sink2, spread=True), [], 0, worker_count_per_proc=2)
    assert sum(r.xlen(f"push:{ch}") for ch in channels) == 400
    assert sink2.stats() == {"duplicate": 400}


# --- cap and once-per at delivery --------------------------------------------------------

DAY = 24 * 3600 * 1000
CAP3 = PushGuard(cap=3, cap_window_ms=DAY)
ONCE = PushGuard(once_key="cinema-pay", once_ttl_ms=DAY, cap=3, cap_window_ms=DAY)


def test_push_json_has_no_guard() -> None:
    p = push(1, guard=ONCE)
    assert "guard" not in p.to_dict()
    assert p.to_dict() == push(1).to_dict()


@integration
def test_two_sinks_never_exceed_the_cap(redis_url: str, r: redis.Redis) -> None:
    """Two processes (each its own sink and guard store) push for one customer."""
    cfg = RedisPushConfig(url=redis_url)
    a = RedisPushOutput(cfg, guard=RedisGuardStore)
    b = RedisPushOutput(cfg, guard=RedisGuardStore)
    run([push(i, guard=CAP3) for i in range(2)], a)
    run([push(10 + i, guard=CAP3) for i in range(3)], b)
    assert a.stats() == {"written": 2}
    assert b.stats() == {"written": 1, "cap": 2}
    assert [json_loads(d)["push_id"] for d in entries(r, "terminal:T1")] == ["p0", "p1", "p10"]
    # another customer has a cap of its own; a push with no guard is not capped
    run([push(20 + i, customer="C2", guard=CAP3) for i in range(4)]
        + [push(30 + i) for i in range(4)], b)
    assert b.stats() == {"written": 8, "cap": 3}


@integration
def test_concurrent_sinks_share_one_cap(redis_url: str, r: redis.Redis) -> None:
    """Two dataflows run at the same time; together they admit exactly the cap."""
    cfg = RedisPushConfig(url=redis_url)
    sinks = [RedisPushOutput(cfg, guard=RedisGuardStore) for _ in range(2)]
    batches = [[push(100 * k + i, guard=CAP3) for i in range(50)] for k in range(2)]
    errors: list[BaseException] = []

    def go(k: int) -> None:
        try:
            run(batches[k], sinks[k])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    written = sum(s.stats().get("written", 0) for s in sinks)
    capped = sum(s.stats().get("cap", 0) for s in sinks)
    assert (written, capped) == (3, 97)
    assert r.xlen("push:terminal:T1") == 3


@integration
def test_once_key_across_sinks_and_replay(redis_url: str, r: redis.Redis) -> None:
    cfg = RedisPushConfig(url=redis_url)
    a = RedisPushOutput(cfg, guard=RedisGuardStore)
    run([push(1, guard=ONCE)], a)
    b = RedisPushOutput(cfg, guard=RedisGuardStore)
    # another worker's cinema push (another trigger, so another push id): blocked
    run([push(2, guard=ONCE), push(3, channel="customer:C1", guard=ONCE)], b)
    assert b.stats() == {"once": 2}
    # a replay of the first push: a duplicate, not a second delivery
    c = RedisPushOutput(cfg, guard=RedisGuardStore)
    run([push(1, guard=ONCE)], c)
    assert c.stats() == {"duplicate": 1}
    assert r.xlen("push:terminal:T1") == 1
    assert not r.exists("push:customer:C1")


@integration
def test_two_workers_hold_the_cap_per_customer(redis_url: str, r: redis.Redis) -> None:
    """One dataflow, two workers each with its own client; pushes spread between them."""
    customers = [f"C{i}" for i in range(5)]
    pushes = [push(i, channel=f"customer:{customers[i % 5]}", customer=customers[i % 5],
                   guard=CAP3) for i in range(100)]
    sink = RecordingOutput(RedisPushConfig(url=redis_url), guard=RedisGuardStore)
    cluster_main(flow_of(pushes, sink, spread=True), [], 0, worker_count_per_proc=2)
    assert set(sink.per_worker) == {0, 1}
    assert sink.stats() == {"written": 15, "cap": 85}
    for c in customers:
        assert r.xlen(f"push:customer:{c}") == 3


CID = "13900000001"


@integration
def test_engine_restart_with_fresh_state_cannot_exceed_the_cap(
    redis_url: str, r: redis.Redis
) -> None:
    """The engine's pushes carry their guard: a second engine (no snapshot) is held.

    Engine A sends three pushes at a session start (the default cap is 3 per 24 h).
    Engine B starts from empty flow state, as after a restart without a snapshot or a
    second deployment reading the same customers: its own state lets its three pushes
    through, the shared Redis guard does not.
    """
    busy = profile(CID, subscriptions=["care_link", "remote_cam"], trials={"a": T0 + 30 * H})
    cfg = RedisPushConfig(url=redis_url)
    engine_a = Harness(profiles=[busy])
    engine_a.feed(click(CID, T0, "session_start"))
    assert len(engine_a.pushes) == 3
    assert all(p.guard is not None and p.guard.cap == 3 for p in engine_a.pushes)
    sink_a = RedisPushOutput(cfg, guard=RedisGuardStore)
    run(engine_a.pushes, sink_a)
    assert sink_a.stats() == {"written": 3}

    engine_b = Harness(profiles=[busy])  # fresh flow state
    engine_b.feed(location(CID, T0 + H), location(CID, T0 + 3 * H))  # cinema-pay
    engine_b.feed(click(CID, T0 + 4 * H, "session_start", terminal="T2"))
    assert len(engine_b.pushes) == 3  # the fresh state saw no earlier pushes
    sink_b = RedisPushOutput(cfg, guard=RedisGuardStore)
    run(engine_b.pushes, sink_b)
    assert sink_b.stats() == {"cap": 3}
    assert not r.exists("push:terminal:T2", f"push:customer:{CID}")


@integration
def test_engine_restart_with_fresh_state_cannot_repeat_a_once_push(
    redis_url: str, r: redis.Redis
) -> None:
    """Once per 24 h (cinema-pay) and once per service (trial-ending) hold at delivery.

    The cap is raised to 10 so that only the once-per guards decide. Session scopes
    (setup-first: once per session and service) stay flow-only: a new session may
    push the setup guide again.
    """
    rules = rules_with(guards={"max_pushes_per_customer": 10})
    fan = profile(CID, subscriptions=["care_link"], trials={"a": T0 + 30 * H})
    cfg = RedisPushConfig(url=redis_url)
    engine_a = Harness(rules=rules, profiles=[fan])
    engine_a.feed(location(CID, T0 - 2 * H), location(CID, T0))  # cinema-pay at T0
    engine_a.feed(click(CID, T0 + MIN, "session_start"))  # setup-first + trial-ending
    assert sorted(p.rule_id for p in engine_a.pushes) == [
        "cinema-pay", "setup-first", "trial-ending"]
    cinema = engine_a.pushes_of("cinema-pay")[0]
    assert cinema.guard == PushGuard(once_key="cinema-pay", once_ttl_ms=24 * H, cap=10,
                                     cap_window_ms=24 * H)
    trial = engine_a.pushes_of("trial-ending")[0]
    assert trial.guard == PushGuard(once_key="trial-ending:a", once_ttl_ms=None, cap=10,
                                    cap_window_ms=24 * H)
    setup = engine_a.pushes_of("setup-first")[0]
    assert setup.guard is not None and setup.guard.once_key is None  # session: flow-only
    sink_a = RedisPushOutput(cfg, guard=RedisGuardStore)
    run(engine_a.pushes, sink_a)
    assert sink_a.stats() == {"written": 3}

    engine_b = Harness(rules=rules, profiles=[fan])  # fresh flow state
    engine_b.feed(location(CID, T0 + H), location(CID, T0 + 3 * H))  # cinema-pay again
    engine_b.feed(click(CID, T0 + 4 * H, "session_start", terminal="T2"))
    assert sorted(p.rule_id for p in engine_b.pushes) == [
        "cinema-pay", "setup-first", "trial-ending"]
    sink_b = RedisPushOutput(cfg, guard=RedisGuardStore)
    run(engine_b.pushes, sink_b)
    assert sink_b.stats() == {"written": 1, "once": 2}
    assert [json_loads(d)["rule_id"] for d in entries(r, "terminal:T2")] == ["setup-first"]

    # a day after the first cinema push its period is over; the trial push never returns
    engine_c = Harness(rules=rules, profiles=[fan])
    engine_c.feed(location(CID, T0 + 23 * H), location(CID, T0 + 25 * H))
    engine_c.feed(click(CID, T0 + 26 * H, "session_start", terminal="T3"))
    sink_c = RedisPushOutput(cfg, guard=RedisGuardStore)
    run(engine_c.pushes, sink_c)
    assert sink_c.stats() == {"written": 2, "once": 1}
    assert sorted(json_loads(d)["rule_id"] for d in entries(r, "terminal:T3")) == [
        "setup-first"]
    assert [json_loads(d)["rule_id"] for d in entries(r, f"customer:{CID}")] == [
        "cinema-pay", "cinema-pay"]


# --- exactly once across connection drops, and Redis outages ----------------------------


def test_marker_key_shares_the_stream_slot() -> None:
    assert marker_key("push:terminal:T1", "p1") == "guard:{push:terminal:T1}:sent:p1"
    odd = ["push:terminal:T1", "push:customer:{C9}", "push:a}b", "push:a{b", "push:{}x}y",
           "push:}{", "push:{", "push:x{}"]
    for stream in odd:
        m = marker_key(stream, "p1")
        assert m.startswith("guard:{") and not m.startswith("push:")
        assert key_slot(m.encode()) == key_slot(stream.encode()), stream


def test_held_push_record_round_trips_and_torn_lines_are_skipped(tmp_path: Path) -> None:
    pushes = [push(1, guard=ONCE), push(2), push(3, guard=CAP3)]
    path = tmp_path / "push-held-0.jsonl"
    path.write_bytes(b"".join(_held_line(p) for p in pushes) + _held_line(push(4))[:25])
    assert _read_spool(path) == pushes  # guards included; the torn tail is skipped


@integration
def test_admitted_but_not_appended_is_appended_once(redis_url: str, r: redis.Redis) -> None:
    """The two round trips of a batch (guard, append) interrupted in between, or after
    the append with the reply lost: sending the batch again delivers each push once."""
    cfg = RedisPushConfig(url=redis_url)
    sink = RedisPushOutput(cfg, guard=RedisGuardStore)
    part = sink.build("s", 0, 1)
    pushes = [push(i, guard=CAP3) for i in range(3)]
    # 1. the guard admitted p0 and p1, then the connection dropped before the append
    guard = RedisGuardStore(r)
    assert guard.admit([GuardRequest.for_push(p) for p in pushes[:2]]) == ["ok", "ok"]
    part.write_batch(pushes)  # sent again: p0/p1 are "duplicate" for the guard
    assert [json_loads(d)["push_id"] for d in entries(r, "terminal:T1")] == ["p0", "p1", "p2"]
    assert sink.stats() == {"written": 3}
    assert guard.record("C1")["sent"] == [T0, T0 + 1, T0 + 2]  # the cap counted each once
    # 2. everything ran, the replies were lost: sent again, nothing is appended twice
    part.write_batch(pushes)
    assert r.xlen("push:terminal:T1") == 3
    assert sink.stats() == {"written": 3, "duplicate": 3}
    part.close()


def wait_until(pred: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    """A persistent redis-server of this test alone, to stop and start again."""
    server = PersistentRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def outage_sink(url: str, **kw: Any) -> RedisPushOutput:
    cfg = RedisPushConfig(url=url, retry_interval_s=0.05, **kw)
    return RedisPushOutput(cfg, guard=RedisGuardStore, client_factory=lambda: fast_client(url))


@integration
def test_outage_holds_pushes_and_delivers_them_in_order_once(
    own_redis: PersistentRedis,
) -> None:
    sink = outage_sink(own_redis.url)
    part = sink.build("s", 0, 1)
    part.write_batch([push(i) for i in range(3)])
    own_redis.stop()
    part.write_batch([push(3), push(4)])  # returns: held, not raised
    part.write_batch([push(5), push(6, channel="customer:C1")])
    assert sink.stats()["held"] == 4
    assert sink.stats()["redis_errors"] >= 1
    time.sleep(0.3)  # the retry thread keeps failing meanwhile
    assert sink.stats()["held"] == 4
    own_redis.start()
    # no new push arrives: the retry thread alone delivers what was held
    assert wait_until(lambda: sink.stats()["held"] == 0)
    r = fast_client(own_redis.url)
    assert [json_loads(d)["push_id"] for d in entries(r, "terminal:T1")] == [
        f"p{i}" for i in range(6)]
    assert [json_loads(d)["push_id"] for d in entries(r, "customer:C1")] == ["p6"]
    stats = sink.stats()
    assert (stats["written"], stats["held_total"], stats["held_max"]) == (7, 4, 4)
    assert "lost" not in stats and "backpressure" not in stats
    part.write_batch([push(7)])  # back to writing directly
    assert r.xlen("push:terminal:T1") == 7
    part.close()
    r.close()


@integration
def test_full_hold_applies_backpressure_and_never_drops(own_redis: PersistentRedis) -> None:
    sink = outage_sink(own_redis.url, max_held_effects=5)
    part = sink.build("s", 0, 1)
    own_redis.stop()
    part.write_batch([push(i) for i in range(4)])  # held: 4 of 5
    done = threading.Event()
    errors: list[BaseException] = []

    def write_more() -> None:
        try:
            part.write_batch([push(i) for i in range(4, 8)])  # 1 fits, 3 wait
        except BaseException as exc:
            errors.append(exc)
        done.set()

    writer = threading.Thread(target=write_more)
    writer.start()
    assert wait_until(lambda: sink.stats().get("backpressure") == 1, 5)
    assert not done.wait(1.0)  # write_batch blocks while Redis is down and the hold is full
    assert sink.stats()["held"] == 5  # at the bound, nothing dropped
    own_redis.start()
    assert done.wait(20)
    writer.join()
    assert not errors
    assert wait_until(lambda: sink.stats()["held"] == 0)
    r = fast_client(own_redis.url)
    assert [json_loads(d)["push_id"] for d in entries(r, "terminal:T1")] == [
        f"p{i}" for i in range(8)]
    stats = sink.stats()
    assert stats["written"] == 8 and stats["held_max"] == 5 and stats["held_total"] == 8
    assert stats["backpressure_ms"] >= 1000
    part.close()
    r.close()


_KILLED_WORKER = """
import os, signal, sys
from pathlib import Path
from connectors.redis_push import RedisPushConfig, RedisPushOutput
from state.redis_store import RedisGuardStore
from tests.connectors.test_redis_push import push
from tests.faults.redis_server import fast_client
url, spool = sys.argv[1], Path(sys.argv[2])
cfg = RedisPushConfig(url=url, retry_interval_s=0.05, spool_dir=spool)
part = RedisPushOutput(cfg, guard=RedisGuardStore,
                       client_factory=lambda: fast_client(url)).build("s", 1, 2)
part.write_batch([push(i) for i in range(2)])     # Redis up: written
input()                                           # the test stops Redis
part.write_batch([push(i) for i in range(2, 5)])  # held, and in the spool
print("held", flush=True)
os.kill(os.getpid(), signal.SIGKILL)              # the epoch counts as done: no replay
"""


@integration
def test_spooled_hold_survives_sigkill(own_redis: PersistentRedis, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WORKER, own_redis.url, str(spool)],
                            cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.stdin is not None and proc.stdout is not None
    r = fast_client(own_redis.url)
    assert wait_until(lambda: r.exists("push:terminal:T1") == 1, 30)
    own_redis.stop()
    proc.stdin.write(b"\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == b"held\n"
    assert proc.wait(30) == -signal.SIGKILL
    assert len(_read_spool(spool / "push-held-1.jsonl")) == 3

    own_redis.start()
    # the restarted flow has one worker: worker 0 adopts worker 1's spool
    sink = outage_sink(own_redis.url, spool_dir=spool)
    part = sink.build("s", 0, 1)
    assert not (spool / "push-held-1.jsonl").exists()
    assert wait_until(lambda: sink.stats()["held"] == 0)
    assert sink.stats()["restored"] == 3
    assert (spool / "push-held-0.jsonl").read_bytes() == b""  # truncated once delivered
    part.write_batch([push(i) for i in range(5)])  # an input replay on top: duplicates
    assert [json_loads(d)["push_id"] for d in entries(r, "terminal:T1")] == [
        f"p{i}" for i in range(5)]
    assert sink.stats()["duplicate"] == 5
    part.close()
    r.close()


@integration
def test_close_keeps_what_is_held_in_the_spool(own_redis: PersistentRedis,
                                               tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    sink = outage_sink(own_redis.url, spool_dir=spool, close_timeout_s=0.2)
    part = sink.build("s", 0, 1)
    own_redis.stop()
    part.write_batch([push(i) for i in range(3)])
    part.close()  # Redis still down: kept on disk, not lost
    assert "lost" not in sink.stats()
    assert _read_spool(spool / "push-held-0.jsonl") == [push(i) for i in range(3)]
    no_spool = outage_sink(own_redis.url, close_timeout_s=0.2)
    part = no_spool.build("s", 0, 1)
    part.write_batch([push(9)])
    part.close()
    assert no_spool.stats()["lost"] == 1  # said, counted and logged, never silent


@integration
def test_an_error_that_is_not_an_outage_fails_the_flow(own_redis: PersistentRedis) -> None:
    """A held push whose stream key holds a string (WRONGTYPE) is not retried forever
    nor dropped: the next write_batch raises, as a direct write would have."""
    r = fast_client(own_redis.url)
    r.set("push:terminal:BAD", "not a stream")  # kept across the restart (append-only file)
    sink = outage_sink(own_redis.url)
    part = sink.build("s", 0, 1)
    own_redis.stop()
    part.write_batch([push(1, channel="terminal:BAD")])
    own_redis.start()
    assert wait_until(lambda: part._fatal is not None)
    with pytest.raises(RuntimeError, match="held pushes"):
        part.write_batch([push(2)])
    assert sink.stats()["held"] == 1 and "written" not in sink.stats()
    part.close()
    r.close()
