"""KafkaInput / KafkaOutput / create_topics against a real Tansu broker.

Outside clients: confluent-kafka (librdkafka) and kafka-python (pure Python), both
reading with ``assign()`` (no consumer-group join).
"""

from __future__ import annotations

import gc
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client import REGISTRY
from pydantic import ValidationError

from connectors.kafka import (
    KafkaConsumeError,
    KafkaDeliveryError,
    KafkaInput,
    KafkaMessage,
    KafkaOutput,
    create_topics,
    mask_config,
)
from flows.codec import json_dumps, pack
from flows.model import DeadLetter, Envelope, RawRecord, decode_record
from flows.runner import kafka_input
from flows.settings import load_settings

TopicFactory = Callable[..., str]

# kafka-python 3.0.12 loads its protocol schemas with the deprecated importlib API.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*is deprecated. Use files\(\) instead")


def _calls(cid: str, n: int) -> dict[str, Any]:
    return {
        "type": "calls",
        "customer_id": cid,
        "ts": 1_700_000_000_000 + n,
        "event_id": f"{cid}-{n}",
        "interval_s": 60,
        "calls_in": n,
        "calls_out": 0,
        "missed": 0,
    }


def _produce(brokers: str, topic: str, items: list[tuple[int, bytes | None, bytes | None]]) -> None:
    """Produce (partition, key, value) with confluent-kafka; fail on any error."""
    p = Producer({"bootstrap.servers": brokers, "linger.ms": 1})
    errors: list[Any] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    for part, key, value in items:
        p.produce(topic, key=key, value=value, partition=part, on_delivery=on_delivery)
    assert p.flush(10) == 0
    assert errors == []


def _run_input(src: KafkaInput) -> list[RawRecord]:
    out: list[RawRecord] = []
    flow = Dataflow("kafka_in")
    op.output("out", op.input("in", flow, src), TestingSink(out))
    run_main(flow)
    return out


def _drain(part: Any, want: int, timeout_s: float = 10.0) -> list[RawRecord]:
    got: list[RawRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got.extend(part.next_batch())
    return got


def _read_back(brokers: str, topic: str, n: int, partitions: int = 1) -> list[Message]:
    c = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": "readback",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
        }
    )
    c.assign([TopicPartition(topic, i, OFFSET_BEGINNING) for i in range(partitions)])
    got: list[Message] = []
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        got.extend(m for m in c.consume(n - len(got), 0.1) if m.error() is None)
    # nothing beyond what was expected
    got.extend(m for m in c.consume(10, 0.2) if m.error() is None)
    c.close()
    return got


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


# --- input ---------------------------------------------------------------------------


@pytest.mark.integration
def test_input_reads_json_and_msgpack_and_survives_tombstone(
    tansu: str, tansu_topic: TopicFactory
) -> None:
    tj, tm = tansu_topic(2), tansu_topic(1)
    _produce(
        tansu,
        tj,
        [(0, b"c1", json_dumps(_calls("c1", i))) for i in range(3)]
        + [(1, b"c2", json_dumps(_calls("c2", i))) for i in range(2)]
        + [(1, b"c2", None)],  # tombstone
    )
    _produce(tansu, tm, [(0, None, pack(_calls("c3", i))) for i in range(3)])

    src = KafkaInput(tansu, {tj: "json", tm: "msgpack"}, stop_after=3, eof_when_idle_s=10)
    assert src.list_parts() == [f"{tj}/0", f"{tj}/1", f"{tm}/0"]
    t0 = time.monotonic()
    recs = _run_input(src)
    assert time.monotonic() - t0 < 10

    by = {(r.source, r.pos): r for r in recs}
    assert len(by) == len(recs) == 9
    assert sorted(by) == sorted(
        [(f"{tj}/0", i) for i in range(3)]
        + [(f"{tj}/1", i) for i in range(3)]
        + [(f"{tm}/0", i) for i in range(3)]
    )
    assert {r.fmt for r in recs if r.source.startswith(tj)} == {"json"}
    assert {r.fmt for r in recs if r.source.startswith(tm)} == {"msgpack"}
    assert by[(f"{tj}/0", 2)].key == b"c1"
    assert by[(f"{tm}/0", 0)].key is None
    tomb = by[(f"{tj}/1", 2)]
    assert tomb.value == b""
    assert tomb.key == b"c2"

    decoded = [decode_record(r) for r in recs]
    envelopes = [d for d in decoded if isinstance(d, Envelope)]
    dead = [d for d in decoded if isinstance(d, DeadLetter)]
    assert len(envelopes) == 8
    assert {e.event.customer_id for e in envelopes} == {"c1", "c2", "c3"}
    assert [(d.reason, d.pos) for d in dead] == [("invalid_json", 2)]


@pytest.mark.integration
def test_input_ends_when_idle(tansu: str, tansu_topic: TopicFactory) -> None:
    t, empty = tansu_topic(1), tansu_topic(1)
    _produce(tansu, t, [(0, b"k", b"1"), (0, b"k", b"2")])
    t0 = time.monotonic()
    recs = _run_input(KafkaInput(tansu, {t: "json", empty: "json"}, eof_when_idle_s=0.3))
    assert [r.value for r in recs] == [b"1", b"2"]
    assert time.monotonic() - t0 < 5


@pytest.mark.integration
def test_list_parts_of_a_missing_topic_raises_and_does_not_create_it(
    tansu: str, tansu_topic: TopicFactory
) -> None:
    t, missing = tansu_topic(2), f"missing-{uuid.uuid4().hex[:8]}"
    assert KafkaInput(tansu, {t: "json"}).list_parts() == [f"{t}/0", f"{t}/1"]
    with pytest.raises(KafkaConsumeError, match=missing):
        KafkaInput(tansu, {t: "json", missing: "json"}).list_parts()
    topics = AdminClient({"bootstrap.servers": tansu}).list_topics(timeout=5).topics
    assert missing not in topics


@pytest.mark.integration
def test_resume_from_snapshot_reads_only_the_remainder(
    tansu: str, tansu_topic: TopicFactory
) -> None:
    t = tansu_topic(1)
    _produce(tansu, t, [(0, b"k", b"%d" % i) for i in range(10)])
    src = KafkaInput(tansu, {t: "json"}, batch_size=4)

    first = src.build_part("in", f"{t}/0", None)
    got = _drain(first, 4)
    assert [r.pos for r in got] == list(range(len(got)))
    snap = first.snapshot()
    assert snap == got[-1].pos + 1
    first.close()

    second = src.build_part("in", f"{t}/0", snap)
    rest = _drain(second, 10 - snap)
    rest.extend(second.next_batch())  # and nothing more
    assert [r.pos for r in rest] == list(range(snap, 10))
    assert [r.value for r in rest] == [b"%d" % i for i in range(snap, 10)]
    assert second.snapshot() == 10
    second.close()


@pytest.mark.integration
def test_consumer_error_raises(tansu: str, tansu_topic: TopicFactory) -> None:
    """A partition that cannot be read (here: it does not exist) fails the flow.

    librdkafka reports this only to ``error_cb`` when partitions are assign()-ed.
    """
    t = tansu_topic(1)
    part = KafkaInput(tansu, {t: "json"}).build_part("in", f"{t}/3", None)
    with pytest.raises(KafkaConsumeError, match=f"{t}/3.*nknown partition"):
        _drain(part, 1, timeout_s=10.0)
    part.close()


@pytest.mark.integration
def test_tail_starts_at_the_end(tansu: str, tansu_topic: TopicFactory) -> None:
    t = tansu_topic(1)
    _produce(tansu, t, [(0, None, b"old%d" % i) for i in range(5)])
    # The last batch holds one message, so Tansu's end offset is exact (see below).
    _produce(tansu, t, [(0, None, b"old5")])
    part = KafkaInput(tansu, {t: "json"}, tail=True).build_part("in", f"{t}/0", None)
    assert part.snapshot() == 6  # a real offset even before the first record
    assert _drain(part, 1, timeout_s=1.0) == []
    _produce(tansu, t, [(0, None, b"new0"), (0, None, b"new1")])
    got = _drain(part, 2)
    assert [(r.pos, r.value) for r in got] == [(6, b"new0"), (7, b"new1")]
    assert part.snapshot() == 8
    part.close()


@pytest.mark.integration
def test_tail_on_tansu_rereads_at_most_the_last_batch(
    tansu: str, tansu_topic: TopicFactory
) -> None:
    """Tansu 0.6.0 answers ListOffsets(latest) with the last batch's base offset + 1.

    So a tail start lands inside the last batch: its later messages are read again
    (duplicates), and nothing is lost. Real Kafka answers last offset + 1.
    """
    t = tansu_topic(1)
    _produce(tansu, t, [(0, None, b"old%d" % i) for i in range(5)])  # one batch, 0..4
    c = Consumer({"bootstrap.servers": tansu, "group.id": "wm"})
    _low, high = c.get_watermark_offsets(TopicPartition(t, 0), timeout=5)
    c.close()
    part = KafkaInput(tansu, {t: "json"}, tail=True).build_part("in", f"{t}/0", None)
    old = _drain(part, 5, timeout_s=1.0)
    assert [r.pos for r in old] == list(range(high, 5))
    _produce(tansu, t, [(0, None, b"new0")])
    got = _drain(part, 1)
    assert [(r.pos, r.value) for r in got] == [(5, b"new0")]
    part.close()


# --- outages, out-of-range positions and Tansu's high watermark ----------------------


def _resets(topic: str, policy: str) -> float:
    value = REGISTRY.get_sample_value(
        "touchstream_kafka_offset_resets_total",
        {"topic": topic, "partition": "0", "policy": policy},
    )
    return value or 0.0


def _produce_batches(brokers: str, topic: str, batches: int, per_batch: int) -> None:
    """``batches`` produce requests of ``per_batch`` records each (one record batch each)."""
    n = 0
    for _ in range(batches):
        _produce(brokers, topic, [(0, None, b"r%d" % (n + i)) for i in range(per_batch)])
        n += per_batch


def _until_stop(part: Any, timeout_s: float = 15.0) -> list[RawRecord]:
    got: list[RawRecord] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got.extend(part.next_batch())
        except StopIteration:
            return got
    raise AssertionError(f"partition did not end within {timeout_s}s ({len(got)} records)")


@pytest.mark.integration
def test_eof_idle_and_resume_ignore_tansus_low_high_watermark(
    tansu: str, tansu_topic: TopicFactory
) -> None:
    """Multi-record batches: ListOffsets answers below the end on Tansu 0.6.0 (last batch's
    base offset + 1), yet the idle end, the snapshot and a resume are exact."""
    t = tansu_topic(1)
    _produce_batches(tansu, t, batches=3, per_batch=20)  # offsets 0..59, 3 record batches
    c = Consumer({"bootstrap.servers": tansu, "group.id": "wm"})
    _low, listed_high = c.get_watermark_offsets(TopicPartition(t, 0), timeout=5)
    c.close()
    assert listed_high <= 60  # 41 on Tansu 0.6.0 (base offset 40 + 1), 60 on Kafka

    src = KafkaInput(tansu, {t: "json"}, batch_size=7, eof_when_idle_s=0.5,
                     lag_interval_s=0.1)
    part = src.build_part("in", f"{t}/0", None)
    got = _until_stop(part)  # ends by idleness only after the true end
    assert [r.pos for r in got] == list(range(60))
    assert part.snapshot() == 60  # the offset after the last record, not a watermark
    part.close()

    _produce_batches(tansu, t, batches=1, per_batch=5)  # 60..64
    again = src.build_part("in", f"{t}/0", 60)
    rest = _until_stop(again)
    assert [(r.pos, r.value) for r in rest] == [(60 + i, b"r%d" % i) for i in range(5)]
    assert again.snapshot() == 65
    again.close()
    assert _resets(t, "earliest") == 0  # the position check never fired


@pytest.mark.integration
def test_a_snapshot_at_the_end_of_an_empty_partition_is_offset_0(
    tansu: str, tansu_topic: TopicFactory
) -> None:
    """After an end-of-partition event librdkafka's ``position()`` answers the event's
    offset + 1 (1 on an empty partition, whose end is 0). A snapshot taken then must
    still be 0, and the partition's first record must be read, not skipped as already
    read, with no "broker lost data" reset."""
    t = tansu_topic(1)
    part = KafkaInput(tansu, {t: "json"}, eof_when_idle_s=60).build_part("in", f"{t}/0", None)
    deadline = time.monotonic() + 10
    while not part._at_end and time.monotonic() < deadline:
        assert part.next_batch() == []
    assert part._at_end, "no end-of-partition event within 10 s"
    assert part.snapshot() == 0
    _produce(tansu, t, [(0, None, b"first")])
    got = _drain(part, 1)
    assert [(r.pos, r.value) for r in got] == [(0, b"first")]
    assert part.snapshot() == 1
    part.close()
    assert _resets(t, "earliest") == 0


@pytest.mark.integration
def test_idle_at_the_end_of_a_multi_record_batch_is_not_out_of_range(
    tansu: str, tansu_topic: TopicFactory
) -> None:
    """Resumed exactly at the end of a 30-record batch and idle for many position checks:
    no reset, nothing read twice, new records read once."""
    t = tansu_topic(1)
    _produce_batches(tansu, t, batches=1, per_batch=30)
    part = KafkaInput(tansu, {t: "json"}, lag_interval_s=0.1).build_part("in", f"{t}/0", 30)
    idle_until = time.monotonic() + 1.5
    idle: list[RawRecord] = []
    while time.monotonic() < idle_until:
        idle.extend(part.next_batch())
    assert idle == []
    _produce(tansu, t, [(0, None, b"new")])
    got = _drain(part, 1)
    got.extend(_drain(part, 1, timeout_s=0.5))  # and nothing more
    assert [(r.pos, r.value) for r in got] == [(30, b"new")]
    part.close()
    assert _resets(t, "earliest") == 0


@pytest.mark.integration
def test_position_past_the_log_end_rewinds_to_earliest_loudly(
    tansu: str, tansu_topic: TopicFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker has less data than the position (what a broker that lost data or a
    recreated topic looks like). Tansu answers such a fetch with nothing and no error;
    the partition notices, says so, and re-reads from the earliest offset: nothing the
    broker has is lost, and a record written after the loss is read too."""
    t = tansu_topic(1)
    _produce_batches(tansu, t, batches=2, per_batch=5)  # 0..9
    before = _resets(t, "earliest")
    part = KafkaInput(tansu, {t: "json"}, lag_interval_s=0.2).build_part("in", f"{t}/0", 50)
    with caplog.at_level(logging.WARNING, logger="connectors.kafka"):
        got = _drain(part, 10)
    assert [r.pos for r in got] == list(range(10))
    assert _resets(t, "earliest") == before + 1
    warned = [m for m in (r.getMessage() for r in caplog.records)
              if "outside the broker's log" in m]
    assert len(warned) == 1 and "position 50" in warned[0] and "re-reading" in warned[0]
    _produce(tansu, t, [(0, None, b"after")])
    more = _drain(part, 1)
    assert [(r.pos, r.value) for r in more] == [(10, b"after")]
    assert part.snapshot() == 11
    part.close()


@pytest.mark.integration
def test_position_past_the_log_end_with_latest_skips_loudly(
    tansu: str, tansu_topic: TopicFactory, caplog: pytest.LogCaptureFixture
) -> None:
    t = tansu_topic(1)
    _produce_batches(tansu, t, batches=2, per_batch=5)  # 0..9
    src = KafkaInput(tansu, {t: "json"}, lag_interval_s=0.2, on_out_of_range="latest")
    part = src.build_part("in", f"{t}/0", 50)
    with caplog.at_level(logging.WARNING, logger="connectors.kafka"):
        deadline = time.monotonic() + 10
        while _resets(t, "latest") == 0 and time.monotonic() < deadline:
            assert part.next_batch() == []
    assert _resets(t, "latest") == 1
    assert part.snapshot() == 10
    assert any("NOT read" in r.getMessage() for r in caplog.records)
    _produce(tansu, t, [(0, None, b"after")])
    assert [(r.pos, r.value) for r in _drain(part, 1)] == [(10, b"after")]
    part.close()


@pytest.mark.integration
def test_position_past_the_log_end_with_fail_raises(
    tansu: str, tansu_topic: TopicFactory
) -> None:
    t = tansu_topic(1)
    _produce(tansu, t, [(0, None, b"x")])
    src = KafkaInput(tansu, {t: "json"}, lag_interval_s=0.2, on_out_of_range="fail")
    part = src.build_part("in", f"{t}/0", 7)
    with pytest.raises(KafkaConsumeError, match=r"position 7 outside the broker's log"):
        _drain(part, 1)
    part.close()


def test_on_out_of_range_is_checked_and_the_consumer_never_resets_silently() -> None:
    with pytest.raises(ValueError, match="on_out_of_range"):
        KafkaInput("b:9092", {"t": "json"}, on_out_of_range="skip")  # type: ignore[arg-type]
    assert KafkaInput("b:9092", {"t": "json"}).consumer_config()["auto.offset.reset"] == "error"


class _QueuedMessage:
    """What ``Consumer.consume`` returns for one record (the fields the input reads)."""

    def __init__(self, offset: int, value: bytes) -> None:
        self._offset, self._value = offset, value

    def error(self) -> None:
        return None

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return b"c1"


class _QueueConsumer:
    """A consumer whose local queue holds ``queued`` and that records each consume's
    (count, timeout): what a partition asks librdkafka for, without a broker."""

    def __init__(self, queued: list[_QueuedMessage]) -> None:
        self.queued = queued
        self.calls: list[tuple[int, float]] = []

    def assign(self, _parts: list[TopicPartition]) -> None:
        pass

    def consume(self, n: int, timeout: float) -> list[_QueuedMessage]:
        self.calls.append((n, timeout))
        out, self.queued = self.queued[:n], self.queued[n:]
        return out

    def get_watermark_offsets(self, _tp: TopicPartition, **_kw: Any) -> tuple[int, int]:
        return -1, -1

    def close(self) -> None:
        pass


def _queue_partition(monkeypatch: pytest.MonkeyPatch,
                     queued: list[_QueuedMessage]) -> tuple[Any, _QueueConsumer]:
    consumer = _QueueConsumer(queued)
    monkeypatch.setattr("connectors.kafka.Consumer", lambda _config: consumer)
    src = KafkaInput("b:9092", {"t": "json"}, batch_size=1000, poll_timeout_s=0.5)
    return src.build_part("in", "t/0", None), consumer


def test_queued_records_come_back_without_waiting_for_a_full_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Bytewax asks the partitions one after the other on one thread: a partition with
    # fewer records queued than a batch must hand them over at once, not idle the
    # worker until the poll timeout.
    part, consumer = _queue_partition(
        monkeypatch, [_QueuedMessage(i, b'{"n": %d}' % i) for i in range(3)])
    assert [r.pos for r in part.next_batch()] == [0, 1, 2]
    assert consumer.calls == [(1000, 0)]
    assert part.next_awake() is None  # there may be more: ask again at once


def test_an_empty_queue_rests_the_poll_timeout_instead_of_spinning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    part, consumer = _queue_partition(monkeypatch, [])
    before = datetime.now(UTC)
    assert part.next_batch() == []
    assert consumer.calls == [(1000, 0)]  # the poll itself does not wait
    awake = part.next_awake()
    after = datetime.now(UTC)
    assert awake is not None
    assert before + timedelta(seconds=0.5) <= awake <= after + timedelta(seconds=0.5)
    consumer.queued = [_QueuedMessage(0, b"{}")]
    assert [r.pos for r in part.next_batch()] == [0]
    assert part.next_awake() is None


def _rest_of_an_empty_poll(part: Any) -> tuple[timedelta, timedelta]:
    """Poll ``part`` (its queue empty): ``(awake - the time before the poll, awake - the
    time after it)``, the bounds its rest lies within (most, least)."""
    before = datetime.now(UTC)
    assert part.next_batch() == []
    awake = part.next_awake()
    after = datetime.now(UTC)
    assert awake is not None
    return awake - before, awake - after


def test_a_quiet_partition_rests_longer_until_a_record_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each rest costs the worker one Bytewax activation: an idle engine spent most of
    # its CPU on them (bench/engine_idle.py), so a partition that has found nothing for
    # idle_after_s rests idle_rest_s; a record brings the short rest back.
    clock = [1000.0]
    monkeypatch.setattr("connectors.kafka.time", SimpleNamespace(monotonic=lambda: clock[0]))
    consumer = _QueueConsumer([])
    monkeypatch.setattr("connectors.kafka.Consumer", lambda _config: consumer)
    src = KafkaInput("b:9092", {"t": "json"}, poll_timeout_s=0.001, idle_rest_s=0.25,
                     idle_after_s=1.0)
    part = src.build_part("in", "t/0", None)  # built at 1000.0: the quiet clock starts

    def rests(short: bool) -> None:
        rest = timedelta(seconds=0.001 if short else 0.25)
        most, least = _rest_of_an_empty_poll(part)
        assert least <= rest <= most

    clock[0] = 1000.9
    rests(short=True)
    clock[0] = 1001.0  # 1 s without a record
    rests(short=False)
    clock[0] = 1005.0
    consumer.queued = [_QueuedMessage(0, b"{}")]
    assert [r.pos for r in part.next_batch()] == [0]
    assert part.next_awake() is None
    clock[0] = 1005.5
    rests(short=True)  # the record restarted the quiet clock
    clock[0] = 1006.0
    rests(short=False)
    # an idle rest below the poll rest never makes a quiet partition asked more often
    slow = KafkaInput("b:9092", {"t": "json"}, poll_timeout_s=0.5, idle_rest_s=0.01)
    part = slow.build_part("in", "t/0", None)
    clock[0] = 2000.0
    most, least = _rest_of_an_empty_poll(part)
    assert least <= timedelta(seconds=0.5) <= most
    with pytest.raises(ValueError, match="idle_after_s"):
        KafkaInput("b:9092", {"t": "json"}, idle_after_s=-1)


def test_the_rest_of_an_empty_partition_comes_from_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Operators trade idle CPU against how soon an idle input answers, without code.
    with pytest.raises(ValidationError, match="poll_rest_ms"):
        load_settings(kafka={"brokers": "b:9092", "poll_rest_ms": 0})
    assert load_settings(kafka={"brokers": "b:9092"}).kafka.poll_rest_ms == 1.0
    src = kafka_input(load_settings(kafka={"brokers": "b:9092", "poll_rest_ms": 250}))
    monkeypatch.setattr("connectors.kafka.Consumer", lambda _config: _QueueConsumer([]))
    part = src.build_part("in", "touch.clicks/0", None)
    most, least = _rest_of_an_empty_poll(part)
    assert least <= timedelta(seconds=0.25) <= most
    # the idle rest and when it starts, likewise
    for bad in ({"idle_rest_ms": 0}, {"idle_after_s": -1}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            load_settings(kafka={"brokers": "b:9092", **bad})
    shipped = kafka_input(load_settings(kafka={"brokers": "b:9092"}))
    assert (shipped.idle_rest_s, shipped.idle_after_s) == (0.01, 1.0)
    idle = kafka_input(load_settings(kafka={"brokers": "b:9092", "idle_rest_ms": 300,
                                            "idle_after_s": 0}))
    part = idle.build_part("in", "touch.clicks/0", None)
    most, least = _rest_of_an_empty_poll(part)  # quiet from the start: idle_after_s is 0
    assert least <= timedelta(seconds=0.3) <= most
    # the other input settings reach it too
    other = kafka_input(load_settings(kafka={"brokers": "b:9092", "start": "latest",
                                             "on_out_of_range": "fail"}))
    assert (other.tail, other.on_out_of_range, other.poll_timeout_s) == (True, "fail", 0.001)
    with pytest.raises(ValueError, match=r"kafka\.brokers"):
        kafka_input(load_settings())


# --- output --------------------------------------------------------------------------


@pytest.mark.integration
def test_output_writes_with_headers(tansu: str, tansu_topic: TopicFactory) -> None:
    t = tansu_topic(1)
    msgs = [
        KafkaMessage(t, b"k%d" % i, b"v%d" % i, (("trace", b"%d" % i), ("kind", b"push")))
        for i in range(20)
    ] + [KafkaMessage(t, None, b"nokey")]
    out = KafkaOutput(tansu)
    flow = Dataflow("kafka_out")
    op.output("out", op.input("in", flow, TestingSource(msgs)), out)
    run_main(flow)
    assert (out.delivered, out.failed) == (21, 0)

    got = _read_back(tansu, t, 21)
    assert [(m.key(), m.value()) for m in got] == [(m.key, m.value) for m in msgs]
    assert [tuple(m.headers() or ()) for m in got] == [m.headers for m in msgs]


@pytest.mark.integration
def test_delivery_failure_fails_the_flow(tansu: str) -> None:
    missing = f"no-such-topic-{uuid.uuid4().hex[:8]}"
    # allow.auto.create.topics is off by default in KafkaOutput
    out = KafkaOutput(tansu, {"message.timeout.ms": 1000})
    flow = Dataflow("kafka_out_fail")
    op.output("out", op.input("in", flow, TestingSource([KafkaMessage(missing, None, b"x")])), out)
    with pytest.raises(Exception) as info:  # bytewax wraps the sink's exception
        run_main(flow)
    errs = [e for e in _chain(info.value) if isinstance(e, KafkaDeliveryError)]
    assert errs, f"no KafkaDeliveryError in {_chain(info.value)!r}"
    assert errs[0].failures[0][0] == missing
    assert missing in str(errs[0])
    assert (out.delivered, out.failed) == (0, 1)
    topics = AdminClient({"bootstrap.servers": tansu}).list_topics(timeout=5).topics
    assert missing not in topics


@pytest.mark.integration
def test_message_too_large_raises_and_producer_keeps_working(
    tansu: str, tansu_topic: TopicFactory
) -> None:
    t = tansu_topic(1)
    part = KafkaOutput(tansu, {"message.max.bytes": 1000}).build("out", 0, 1)
    with pytest.raises(KafkaDeliveryError, match=r"MSG_SIZE_TOO_LARGE|too large") as info:
        part.write_batch([KafkaMessage(t, None, b"x" * 5000)])
    assert info.value.failures[0][0] == t
    part.write_batch([KafkaMessage(t, None, b"small")])
    part.close()
    assert (part.delivered, part.failed) == (1, 1)
    assert [m.value() for m in _read_back(tansu, t, 1)] == [b"small"]


def _producers() -> int:
    return sum(type(o) is Producer for o in gc.get_objects())


def test_a_closed_output_partition_lets_its_producer_go() -> None:
    """close() drops its librdkafka producer, whose handle (threads, reconnects) then
    ends at once, though the output keeps the partition for its counters."""
    gc.collect()
    gc.disable()  # what follows must not rely on the collector
    try:
        before = _producers()
        out = KafkaOutput("127.0.0.1:1")  # no broker: nothing to deliver, nothing waits
        part = out.build("out", 0, 1)
        assert _producers() == before + 1
        part.close()
        assert _producers() == before
        assert out.delivered == 0 and out.failed == 0  # the counters are still there
    finally:
        gc.enable()


def test_an_unclosed_output_partition_and_its_producer_go_with_their_last_reference(
) -> None:
    """A failed dataflow never closes its partitions: the producer must not keep its own
    partition alive through its error callback (a cycle only the collector breaks; it
    used to leave librdkafka handles reconnecting to brokers of finished tests)."""
    gc.collect()
    gc.disable()
    try:
        before = _producers()
        out = KafkaOutput("127.0.0.1:1")
        out.build("out", 0, 1)
        assert _producers() == before + 1
        del out  # the output, and with it its partition
        assert _producers() == before
    finally:
        gc.enable()


@pytest.mark.integration
def test_full_queue_is_back_pressure_not_loss(tansu: str, tansu_topic: TopicFactory) -> None:
    t = tansu_topic(1)
    out = KafkaOutput(tansu, max_queued_messages=2)
    part = out.build("out", 0, 1)
    msgs = [KafkaMessage(t, None, b"%d" % i) for i in range(500)]
    part.write_batch(msgs[:250])
    part.write_batch(msgs[250:])
    part.close()
    assert part.buffer_waits > 0  # BufferError was hit and handled
    assert (out.delivered, out.failed) == (500, 0)
    assert [m.value() for m in _read_back(tansu, t, 500)] == [m.value for m in msgs]


@pytest.mark.integration
def test_full_queue_in_a_dataflow(tansu: str, tansu_topic: TopicFactory) -> None:
    t = tansu_topic(1)
    out = KafkaOutput(tansu, max_queued_messages=2)
    msgs = [KafkaMessage(t, b"k", b"%d" % i) for i in range(500)]
    flow = Dataflow("kafka_out_bp")
    op.output("out", op.input("in", flow, TestingSource(msgs, batch_size=100)), out)
    run_main(flow)
    assert (out.delivered, out.failed) == (500, 0)
    assert [m.value() for m in _read_back(tansu, t, 500)] == [m.value for m in msgs]


# --- kafka-python as the outside client ----------------------------------------------


@pytest.mark.integration
def test_kafka_python_producer_to_kafka_input(tansu: str, tansu_topic: TopicFactory) -> None:
    from kafka import KafkaProducer

    t = tansu_topic(2)
    prod = KafkaProducer(bootstrap_servers=tansu)
    futures = [
        prod.send(
            t,
            key=b"c%d" % (i % 2),
            value=json_dumps(_calls(f"c{i % 2}", i)),
            partition=i % 2,
            headers=[("h", b"1")],
        )
        for i in range(6)
    ]
    prod.flush(10)
    meta = [f.get(10) for f in futures]
    prod.close()
    assert sorted((m.partition, m.offset) for m in meta) == [
        (p, o) for p in (0, 1) for o in (0, 1, 2)
    ]

    recs = _run_input(KafkaInput(tansu, {t: "json"}, stop_after=3, eof_when_idle_s=10))
    assert sorted((r.source, r.pos) for r in recs) == [
        (f"{t}/{p}", o) for p in (0, 1) for o in (0, 1, 2)
    ]
    decoded = [decode_record(r) for r in recs]
    assert all(isinstance(d, Envelope) for d in decoded), decoded
    assert {r.key for r in recs} == {b"c0", b"c1"}


@pytest.mark.integration
def test_kafka_output_read_by_kafka_python(tansu: str, tansu_topic: TopicFactory) -> None:
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KpTopicPartition

    t = tansu_topic(1)
    msgs = [KafkaMessage(t, b"k%d" % i, b"v%d" % i, (("n", b"%d" % i),)) for i in range(10)]
    out = KafkaOutput(tansu)
    flow = Dataflow("kafka_out_kp")
    op.output("out", op.input("in", flow, TestingSource(msgs)), out)
    run_main(flow)

    consumer = KafkaConsumer(bootstrap_servers=tansu, group_id=None, enable_auto_commit=False)
    tp = KpTopicPartition(t, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    got: list[Any] = []
    deadline = time.monotonic() + 10
    while len(got) < 10 and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=100).values():
            got.extend(records)
    consumer.close()
    assert [(r.offset, r.key, r.value, list(r.headers)) for r in got] == [
        (i, m.key, m.value, list(m.headers)) for i, m in enumerate(msgs)
    ]


# --- admin ---------------------------------------------------------------------------


@pytest.mark.integration
def test_create_topics_is_idempotent(tansu: str) -> None:
    from confluent_kafka.admin._config import ConfigResource

    a, b = (f"ct-{x}-{uuid.uuid4().hex[:8]}" for x in "ab")
    assert create_topics(tansu, {a: 3, b: 1}) == sorted([a, b])
    assert create_topics(tansu, {a: 3, b: 1}) == []
    c = f"ct-c-{uuid.uuid4().hex[:8]}"
    assert create_topics(tansu, {a: 3, c: 2}) == [c]

    admin = AdminClient({"bootstrap.servers": tansu})
    md = admin.list_topics(timeout=5).topics
    assert {n: len(md[n].partitions) for n in (a, b, c)} == {a: 3, b: 1, c: 2}
    cfg = admin.describe_configs([ConfigResource("topic", a)])
    entries = next(iter(cfg.values())).result(5)
    assert entries["retention.ms"].value == "604800000"


def test_mask_config_hides_secrets() -> None:
    masked = mask_config(
        {
            "bootstrap.servers": "b:9092",
            "sasl.password": "hunter2",
            "sasl.username": "me",
            "ssl.key.password": "k",
            "ssl.key.pem": "PEM",
            "client.secret": "s",
            "linger.ms": 1,
        }
    )
    assert masked == {
        "bootstrap.servers": "b:9092",
        "sasl.password": "***",
        "sasl.username": "***",
        "ssl.key.password": "***",
        "ssl.key.pem": "***",
        "client.secret": "***",
        "linger.ms": 1,
    }


def test_consumer_and_producer_config_reach_only_their_clients() -> None:
    s = load_settings(kafka={
        "brokers": "b:9092", "config": {"client.id": "ts", "linger.ms": 9},
        "consumer_config": {"fetch.wait.max.ms": 100},
        "producer_config": {"linger.ms": 20, "compression.type": "lz4"},
    })
    assert s.kafka.for_consumers() == {"client.id": "ts", "linger.ms": 9,
                                       "fetch.wait.max.ms": 100}
    assert s.kafka.for_producers() == {"client.id": "ts", "linger.ms": 20,
                                       "compression.type": "lz4"}
    consumer = kafka_input(s).consumer_config()
    assert consumer["fetch.wait.max.ms"] == 100 and consumer["client.id"] == "ts"
    assert "compression.type" not in consumer


def _live_clients_stderr(tansu: str, capfd: pytest.CaptureFixture[str],
                         **kafka: dict[str, Any]) -> str:
    """Run the live flow on topics of its own until its input is idle; librdkafka's
    own log lines (written to fd 2) of every client it made."""
    from connectors.kafka import create_topics
    from flows.runner import all_topics, run_live

    tag = uuid.uuid4().hex[:8]
    names = ("clicks", "location", "calls", "pushes", "alerts", "alerts_dlq",
             "dead_letters", "stats", "rules", "rules_status")
    topics = {f"{n}_topic": f"cfg-{tag}.{n}" for n in names}
    settings = load_settings(mode="live", kafka={"brokers": tansu, "eof_when_idle_s": 1.0,
                                                  **topics, **kafka},
                             recovery={"enabled": False})
    create_topics(tansu, all_topics(settings))
    capfd.readouterr()
    run_live(settings, handle_signals=False)
    return capfd.readouterr().err


@pytest.mark.integration
def test_a_producer_key_in_producer_config_warns_no_consumer(
    tansu: str, capfd: pytest.CaptureFixture[str]
) -> None:
    # in the shared config, each consumer librdkafka makes warns about linger.ms ...
    shared = _live_clients_stderr(tansu, capfd, config={"linger.ms": 3})
    assert "CONFWARN" in shared and "is a producer property" in shared
    # ... in producer_config (and a consumer key in consumer_config) nothing does
    split = _live_clients_stderr(tansu, capfd, producer_config={"linger.ms": 3},
                                 consumer_config={"fetch.wait.max.ms": 50})
    assert "CONFWARN" not in split


class _Delivered:
    """What a delivery report's message answers: topic, partition and offset."""

    def __init__(self, offset: int | None) -> None:
        self._offset = offset

    def topic(self) -> str:
        return "dup-acks"

    def partition(self) -> int:
        return 2

    def offset(self) -> int | None:
        return self._offset


def test_a_batch_acknowledged_without_offsets_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # librdkafka counts a DUPLICATE_SEQUENCE_NUMBER answer to a retried batch as
    # delivered, its first message with offset -1 (None here): seen from Tansu on S3
    # storage after a SIGKILL (tests/faults/test_broker_restart.py)
    def count() -> float:
        return REGISTRY.get_sample_value("touchstream_kafka_output_duplicate_acks_total",
                                         {"topic": "dup-acks"}) or 0.0

    part = KafkaOutput("127.0.0.1:1").build("out", 0, 1)
    before = count()
    with caplog.at_level(logging.WARNING, logger="connectors.kafka"):
        for offset in (None, 0, 1, 7):
            part._on_delivery(None, _Delivered(offset))  # type: ignore[arg-type]
    assert (part.delivered, part.duplicate_acks, count() - before) == (4, 1, 1)
    assert "dup-acks [2] as a duplicate" in caplog.text
    part.close()
    # with acks=0 no report carries an offset: nothing to count
    quiet = KafkaOutput("127.0.0.1:1", {"acks": 0, "enable.idempotence": False}).build(
        "out", 0, 1)
    quiet._on_delivery(None, _Delivered(None))  # type: ignore[arg-type]
    assert (quiet.delivered, quiet.duplicate_acks, count() - before) == (1, 0, 1)
    quiet.close()
