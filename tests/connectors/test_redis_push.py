"""RedisPushOutput in real Bytewax dataflows against the session redis-server."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import bytewax.operators as op
import pytest
import redis
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, cluster_main, run_main
from pydantic import SecretStr

from connectors.redis_push import (
    GuardSpec,
    RedisPushConfig,
    RedisPushOutput,
    _RedisPushPartition,
    read_channel,
)
from flows.codec import json_dumps, json_loads
from flows.model import Push
from flows.settings import RedisSettings
from state.guards import InMemoryGuardStore
from state.redis_store import RedisGuardStore

T0 = 1_700_000_000_000


def push(i: int, channel: str = "terminal:T1", customer: str = "C1") -> Push:
    return Push(
        push_id=f"p{i}",
        customer_id=customer,
        channel=channel,
        rule_id="r-welcome",
        rule_version=2,
        content={"title": f"offer {i}", "n": i, "text": "caf\u00e9"},
        event_ts=T0 + i,
        reason={"rule": "r-welcome", "i": i},
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
    assert (cfg.url, cfg.stream_maxlen, cfg.stream_ttl_s, cfg.publish) == (
        "redis://:secret@h:1/0", 50, 60, False)
    assert "secret" not in repr(cfg)
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
    assert sorted(k.decode() for k in r.keys("*")) == ["push:customer:C1", "push:terminal:T1"]
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
