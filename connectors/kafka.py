"""Kafka connectors: an input of :class:`RawRecord`, an output of :class:`KafkaMessage`.

House style: a connector is a public settings object plus a private partition class
that does the I/O. Clients (consumers, producers) are made in ``build_part()`` /
``build()``, never in ``__init__``, so a connector object is cheap, picklable and
safe to construct on any worker.

* :class:`KafkaInput` reads each topic partition with its own ``assign()``-ed
  consumer (no consumer-group join: fast to start, and Bytewax recovery owns the
  offsets). Its resume state is the next offset to read.
* :class:`KafkaOutput` produces with an idempotent producer, registers a delivery
  callback on every message and fails the flow with :class:`KafkaDeliveryError`
  when a message could not be delivered (so recovery replays instead of losing it).
  A full local queue (``BufferError``) is back-pressure: it waits and retries,
  never drops.
* :func:`create_topics` creates missing topics, idempotently.

Broker outages. librdkafka reconnects by itself: transport errors and "all brokers
down" are logged (warning), counted in ``touchstream_kafka_client_errors`` and never
fail the flow; the consumer resumes at its position and the producer retries queued
messages until ``message.timeout.ms`` (then :class:`KafkaDeliveryError`). A broker that
comes back with *less* data than a partition's position (it lost data, or the topic was
recreated) is detected and handled as ``on_out_of_range`` says (see
:class:`KafkaInput`), always with a log line and ``touchstream_kafka_offset_resets``:
never a silent skip, never a silent re-read.

High watermarks. Tansu 0.6.0 answers ``ListOffsets(latest)`` (what
``get_watermark_offsets()`` queries) with the last batch's base offset + 1, not the
last offset + 1, while its Fetch responses (what librdkafka caches, and what
end-of-partition events are based on) carry the true end. So: end-of-partition and
idleness (``eof_when_idle_s``) come from Fetch; the resume state is the offset after
the last record read, never a watermark; the lag gauge uses the cached (Fetch) value;
only ``tail=True`` resolves its start from ``ListOffsets`` (it may read the last
batch again: duplicates, never losses); and "past the log end" is only concluded once
the record just before the position fails to come back (see ``_check_position``),
never from a watermark alone.

Nothing here logs secrets: configuration is logged only through :func:`mask_config`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, TypeAlias

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # confluent_kafka.admin re-exports it untyped
from prometheus_client import Gauge

from flows.metrics import (
    KAFKA_CLIENT_ERRORS,
    KAFKA_CONSUMER_LAG,
    KAFKA_OFFSET_RESETS,
    KAFKA_OUTPUT_DUPLICATE_ACKS,
)
from flows.model import Format, RawRecord, raw_record

__all__ = [
    "DEFAULT_TOPIC_CONFIG",
    "ConfigValue",
    "KafkaConsumeError",
    "KafkaDeliveryError",
    "KafkaInput",
    "KafkaMessage",
    "KafkaOutput",
    "OutOfRangePolicy",
    "create_topics",
    "mask_config",
]

log = logging.getLogger(__name__)

ConfigValue: TypeAlias = str | int | float | bool
"""A librdkafka configuration value (the type of ``KafkaSettings.config`` values)."""

OutOfRangePolicy: TypeAlias = Literal["earliest", "latest", "fail"]
"""What an input partition does when its position is outside the broker's log."""

_SECRET_MARKERS: Final = ("password", "secret", "sasl", "ssl.key")

DEFAULT_TOPIC_CONFIG: Final[Mapping[str, str]] = {"retention.ms": str(7 * 24 * 3600 * 1000)}
"""Topic configuration :func:`create_topics` sets unless told otherwise.

``retention.ms`` is set explicitly because Tansu reports no topic configuration
(``DescribeConfigs`` answers empty) for a topic created without it, and some clients
expect to find it.
"""

# Consumer-level errors librdkafka recovers from by itself (it reconnects); a broker
# blip must not crash a live flow. Every other error on a message raises.
_TRANSIENT_CONSUMER_ERRORS: Final = frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN})
# Errors librdkafka reports only to ``error_cb`` (not through consume()) that mean the
# assigned partition cannot be read; other error_cb reports are informational.
_PARTITION_GONE_ERRORS: Final = frozenset(
    {
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
    }
)


def mask_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a librdkafka config safe to log.

    Values of keys containing ``password``, ``secret``, ``sasl`` or ``ssl.key`` are
    replaced by ``"***"``.
    """
    return {
        k: "***" if any(m in k.lower() for m in _SECRET_MARKERS) else v for k, v in config.items()
    }


def _base_config(brokers: str, extra: Mapping[str, ConfigValue] | None) -> dict[str, Any]:
    config: dict[str, Any] = {"bootstrap.servers": brokers}
    if extra:
        config.update(extra)
    return config


# --- input ----------------------------------------------------------------------------


class KafkaConsumeError(RuntimeError):
    """The consumer reported an error that is neither end-of-partition nor transient."""


def _weak_error_cb(method: Callable[[KafkaError], None]) -> Callable[[KafkaError], None]:
    """``method`` (a partition's ``_on_error``) for a librdkafka client's ``error_cb``,
    through a weak reference to the partition.

    The partition holds its client; a client holding the partition's bound method would
    close a reference cycle, and the client's handle (its threads, its reconnects to a
    broker long gone) would outlive the partition until the garbage collector broke it:
    a dataflow that failed never closes its partitions. Errors reported after the
    partition is gone are dropped, with nobody left to raise them to.
    """
    ref = weakref.WeakMethod(method)

    def error_cb(err: KafkaError) -> None:
        m = ref()
        if m is not None:
            m(err)

    return error_cb


class _KafkaPartition(StatefulSourcePartition[RawRecord, int]):
    """One topic partition read through an ``assign()``-ed consumer."""

    def __init__(
        self,
        config: dict[str, Any],
        topic: str,
        partition: int,
        fmt: Format,
        start: int,
        batch_size: int,
        poll_timeout_s: float,
        stop_after: int | None,
        eof_when_idle_s: float | None,
        metadata_timeout_s: float,
        lag_interval_s: float = 5.0,
        on_out_of_range: OutOfRangePolicy = "earliest",
        idle_rest_s: float | None = None,
        idle_after_s: float = 1.0,
    ) -> None:
        self._topic = topic
        self._partition = partition
        self._fmt: Format = fmt
        self._source = f"{topic}/{partition}"
        # The next offset to read, or a logical one (OFFSET_BEGINNING / OFFSET_END)
        # until the first message tells us where we are.
        self._next = start
        self._batch_size = batch_size
        self._rest_for = timedelta(seconds=poll_timeout_s)
        # A partition that has found no record for idle_after_s rests longer: each rest
        # costs the worker a Bytewax activation, which is most of an idle engine's CPU.
        self._idle_rest_for = timedelta(seconds=max(poll_timeout_s, idle_rest_s or 0.0))
        self._idle_after_s = idle_after_s
        self._last_record = time.monotonic()
        self._left = stop_after
        self._eof_when_idle_s = eof_when_idle_s
        # The idle clock starts at the first answer (a record or end-of-partition),
        # not at build: connecting and the first fetch can take a while.
        self._last_activity: float | None = None
        # True from an end-of-partition event until the next record: only a partition
        # that is really at its end can end by idleness.
        self._at_end = False
        self._done = False
        # When Bytewax may ask again after a poll that found nothing queued (next_awake).
        self._rest: datetime | None = None
        self._error: KafkaError | None = None
        # consumer lag gauge: made at the first measurement, updated every lag_interval_s
        self._lag_interval_s = lag_interval_s
        self._lag_due = 0.0
        self._lag: Gauge | None = None
        # past-the-end detection (_check_position): the offset being re-read to prove
        # the log still holds the record before our position, until when to wait for
        # it, and the last position proven fine (so it is proven once, not every check)
        self._metadata_timeout_s = metadata_timeout_s
        self._on_out_of_range: OutOfRangePolicy = on_out_of_range
        self._probe_at: int | None = None
        self._probe_deadline = 0.0
        self._proven_pos = -1
        self._consumer = Consumer({**config, "error_cb": _weak_error_cb(self._on_error)})
        if start == OFFSET_END:
            # Resolve "the end" to a real offset now, so that a snapshot taken before
            # the first record is a real offset too (resuming at OFFSET_END would skip
            # what arrived in between). On Tansu this is the last batch's base
            # offset + 1, so up to that batch's other records are read again:
            # duplicates, never losses. Same value librdkafka's OFFSET_END uses.
            try:
                _low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=metadata_timeout_s
                )
                if high is not None and high >= 0:
                    start = self._next = high
            except KafkaException as exc:
                log.warning("kafka input %s: end offset unknown (%s); tailing", self._source, exc)
        log.debug("kafka input %s from %s, config %s", self._source, start, mask_config(config))
        self._consumer.assign([TopicPartition(topic, partition, start)])

    def _on_error(self, err: KafkaError) -> None:
        # Called from consume() on this thread.
        KAFKA_CLIENT_ERRORS.labels("consumer", err.name()).inc()
        if err.fatal() or err.code() in _PARTITION_GONE_ERRORS:
            self._error = self._error or err
        else:
            log.warning("kafka input %s: %s (librdkafka retries)", self._source, err)

    def next_batch(self) -> list[RawRecord]:
        """Up to ``batch_size`` records, those already queued, without waiting; empty
        (and :meth:`next_awake` a poll timeout later) when none are.

        :raises KafkaConsumeError: on a consumer error other than end-of-partition
            or a transient connection error (librdkafka reconnects by itself).
        """
        if self._done:
            raise StopIteration
        # Never blocks: what is queued comes back at once. consume() with a timeout waits
        # for a full batch, and Bytewax asks the partitions one after the other on one
        # thread, so the worker idled up to the timeout at every partition with fewer
        # records queued (records of the others waited meanwhile). A partition that
        # finds nothing rests for the poll timeout instead (next_awake), so an idle
        # input does not spin.
        msgs: list[Message] = self._consumer.consume(self._batch_size, 0)
        self._rest = None
        if self._error is not None:
            raise KafkaConsumeError(f"error consuming from Kafka {self._source}: {self._error}")
        batch: list[RawRecord] = []
        for msg in msgs:
            err = msg.error()
            if err is not None:
                code = err.code()
                if code == KafkaError._PARTITION_EOF:
                    eof_at = msg.offset()
                    if eof_at is not None and 0 <= eof_at < self._next:
                        # The broker's end is below our position (seen while proving it).
                        self._out_of_range(f"end of partition at offset {eof_at}")
                        break
                    if eof_at is not None and eof_at >= 0 and self._next < 0:
                        # A logical start (OFFSET_BEGINNING) at the end: the event's
                        # offset is where reading goes on. Not position(): after this
                        # event it answers the offset + 1, and a snapshot of that would
                        # skip the partition's next record as already read.
                        self._next = eof_at
                    self._at_end = True
                    if self._last_activity is None:
                        self._last_activity = time.monotonic()
                    continue
                if code == KafkaError._AUTO_OFFSET_RESET:
                    # auto.offset.reset=error: the broker said OFFSET_OUT_OF_RANGE.
                    KAFKA_CLIENT_ERRORS.labels("consumer", err.name()).inc()
                    self._out_of_range(str(err))
                    break
                if code in _TRANSIENT_CONSUMER_ERRORS and not err.fatal():
                    KAFKA_CLIENT_ERRORS.labels("consumer", err.name()).inc()
                    log.warning("kafka input %s: %s (librdkafka retries)", self._source, err)
                    continue
                raise KafkaConsumeError(f"error consuming from Kafka {self._source}: {err}")
            offset = msg.offset()
            if offset is None:
                continue
            if self._probe_at is not None and offset >= self._probe_at:
                # The log still holds the record before our position: all is well.
                self._probe_at = None
                self._proven_pos = self._next
            if self._next >= 0 and offset < self._next:
                continue  # never re-emit what the resume state says was read
            value: bytes | None = msg.value()
            # A tombstone (null value) becomes b"" so decoding dead-letters it.
            batch.append(raw_record(self._source, offset, b"" if value is None else value,
                                    msg.key(), self._fmt))
            self._next = offset + 1
            self._at_end = False
            if self._left is not None:
                self._left -= 1
                if self._left <= 0:
                    self._done = True
                    break
        now = time.monotonic()
        if now >= self._lag_due:
            self._report_lag(now)
            if not batch:
                self._check_position(now)
        if batch:
            self._last_activity = self._last_record = now
        elif (
            self._eof_when_idle_s is not None
            and self._at_end
            and self._last_activity is not None
            and now - self._last_activity >= self._eof_when_idle_s
        ):
            self._done = True
            raise StopIteration
        if not msgs:
            quiet = now - self._last_record >= self._idle_after_s
            self._rest = datetime.now(UTC) + (self._idle_rest_for if quiet else self._rest_for)
        return batch

    def next_awake(self) -> datetime | None:
        """After a poll that found nothing queued, the poll timeout later (the idle rest
        once the partition has found no record for ``idle_after_s``); else None (Bytewax
        asks again at once)."""
        return self._rest

    def _cached_high(self) -> int | None:
        """The high watermark of the last Fetch response (no round trip), if known."""
        try:
            _low, high = self._consumer.get_watermark_offsets(
                TopicPartition(self._topic, self._partition), cached=True
            )
        except KafkaException:
            return None
        return high if high is not None and high >= 0 else None

    def _report_lag(self, now: float) -> None:
        """Set the lag gauge from the consumer's cached high watermark (no round trip).

        librdkafka updates the cached high watermark from every Fetch response (on
        Tansu 0.6.0 that one is the true end; only its ``ListOffsets`` answer is the
        last batch's base offset + 1). The lag is clamped at 0: a position past the
        end is :meth:`_check_position`'s business, not a negative lag.
        """
        if self._next < 0:
            return
        high = self._cached_high()
        if high is None:
            return  # not known before the first fetch
        self._lag_due = now + self._lag_interval_s
        if self._lag is None:
            self._lag = KAFKA_CONSUMER_LAG.labels(self._topic, str(self._partition))
        self._lag.set(max(0, high - self._next))

    def _check_position(self, now: float) -> None:
        """Notice, without trusting a watermark alone, that the broker lost our position.

        A broker that comes back with less data than our position (Tansu with memory
        storage restarted, data lost, topic recreated) may answer Fetch at that position
        with nothing at all and no error (Tansu 0.6.0 does): the partition would wait
        forever while new records are written at offsets below it. So, when idle and the
        Fetch high watermark is below the position, the record just before the position
        is read again (the resume filter drops it): if it comes back, the position is
        fine (remembered, no second proof); if, after ``lag_interval_s`` (at least 1 s),
        it has not and ``ListOffsets`` also answers an end below the position, the
        position is past the log end and :meth:`_out_of_range` applies the policy. While
        the broker cannot be asked (down), nothing is concluded.
        """
        if self._next <= 0:
            return
        if self._probe_at is not None:
            if now < self._probe_deadline:
                return
            try:
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self._topic, self._partition),
                    timeout=self._metadata_timeout_s,
                )
            except KafkaException as exc:
                log.warning("kafka input %s: log end unknown (%s); position check waits",
                            self._source, exc)
                self._probe_deadline = now + max(1.0, self._lag_interval_s)
                return
            if high is not None and high >= self._next:
                # Not past the end after all; go back to reading at the position.
                self._probe_at = None
                self._proven_pos = self._next
                self._consumer.assign([TopicPartition(self._topic, self._partition,
                                                      self._next)])
                return
            cached = self._cached_high()
            self._reposition(
                int(low or 0), max(int(high or 0), cached or 0),
                f"the record before position {self._next} did not come back",
            )
            return
        cached = self._cached_high()
        if cached is None or cached >= self._next or self._proven_pos == self._next:
            return
        self._probe_at = self._next - 1
        self._probe_deadline = now + max(1.0, self._lag_interval_s)
        log.debug("kafka input %s: fetch high watermark %d below position %d; checking",
                  self._source, cached, self._next)
        self._consumer.assign([TopicPartition(self._topic, self._partition, self._probe_at)])

    def _out_of_range(self, why: str) -> None:
        """The broker said our position is not in its log: ask where it is, then move."""
        try:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(self._topic, self._partition), timeout=self._metadata_timeout_s
            )
        except KafkaException as exc:
            # Cannot ask now (broker going down again?): retry from the same position.
            log.warning("kafka input %s: offset out of range (%s) and log bounds unknown "
                        "(%s); retrying at %d", self._source, why, exc, self._next)
            self._consumer.assign([TopicPartition(self._topic, self._partition, self._next)])
            return
        low, high = int(low or 0), max(int(high or 0), self._cached_high() or 0)
        if self._next < 0 or low <= self._next <= high:
            self._probe_at = None
            self._consumer.assign([TopicPartition(self._topic, self._partition,
                                                  max(self._next, low))])
            return
        self._reposition(low, high, why)

    def _reposition(self, low: int, high: int, why: str) -> None:
        """Move a partition whose position is outside ``[low, high]``, loudly, by policy.

        * position below ``low`` (retention deleted records not yet read): they are lost
          at the broker; logged as an error with their count; ``earliest`` goes on at
          ``low``, ``latest`` at ``high``.
        * position above ``high`` (the broker lost data or the topic was recreated):
          ``earliest`` re-reads from ``low`` (records read before may be read a second
          time: duplicates, which pushes' idempotency keys absorb; records written since
          the broker came back are not lost); ``latest`` goes on at ``high`` (records
          written since the broker came back, up to ``high - low``, are skipped).
        * ``fail`` raises :class:`KafkaConsumeError` in both cases.

        Every case logs a warning or an error and counts ``touchstream_kafka_offset_resets``.
        """
        policy = self._on_out_of_range
        pos = self._next
        KAFKA_OFFSET_RESETS.labels(self._topic, str(self._partition), policy).inc()
        where = f"position {pos} outside the broker's log [{low}, {high}) ({why})"
        if policy == "fail":
            raise KafkaConsumeError(f"Kafka input {self._source}: {where}")
        target = low if policy == "earliest" else high
        if pos < low:
            log.error("kafka input %s: %s: %d record(s) were deleted by the broker before "
                      "they were read; continuing at %d (on_out_of_range=%s)",
                      self._source, where, low - pos, target, policy)
        elif policy == "earliest":
            log.warning("kafka input %s: %s: the broker lost data or the topic was "
                        "recreated; re-reading from the earliest offset %d, up to %d "
                        "record(s) may be read a second time", self._source, where, target,
                        high - low)
        else:
            log.warning("kafka input %s: %s: the broker lost data or the topic was "
                        "recreated; skipping to the end %d, up to %d record(s) written "
                        "since are NOT read", self._source, where, target, high - low)
        self._next = target
        self._probe_at = None
        self._proven_pos = -1
        self._at_end = False
        self._consumer.assign([TopicPartition(self._topic, self._partition, target)])

    def snapshot(self) -> int:
        """The next offset to read.

        Before the first message it is the start position: a real offset when
        resuming or tailing, or the offset of an end-of-partition event, else
        ``OFFSET_BEGINNING`` (-2) until librdkafka knows the real position
        (``OFFSET_END`` (-1) only if the end could not be resolved).
        """
        if self._next < 0:
            try:
                (tp,) = self._consumer.position([TopicPartition(self._topic, self._partition)])
                if tp.error is None and tp.offset >= 0:
                    self._next = tp.offset
            except KafkaException:
                pass
        return self._next

    def close(self) -> None:
        """Close the consumer (no offsets are committed: the snapshot is the state)."""
        if self._lag is not None:
            with contextlib.suppress(KeyError):
                KAFKA_CONSUMER_LAG.remove(self._topic, str(self._partition))
            self._lag = None
        self._consumer.close()


class KafkaInput(FixedPartitionedSource[RawRecord, int]):
    """Read Kafka topics as :class:`RawRecord` s, one Bytewax partition per topic partition.

    Each record has ``source="topic/partition"``, ``pos`` the offset, the message
    key, the value (``b""`` for a tombstone) and ``fmt`` the topic's wire format.
    No consumer group is joined (``assign()``); the resume state of a partition is
    the next offset to read, so Bytewax recovery resumes exactly after the last
    snapshot.

    ``stop_after`` and ``eof_when_idle_s`` make the otherwise endless source finite,
    for tests and replays: a partition ends after emitting ``stop_after`` records,
    or after ``eof_when_idle_s`` seconds without a record, counted from its last
    record or, before any, from the first time it reached the end of the partition
    (so a slow first connection does not end it early). Both apply per partition;
    leave them ``None`` in live mode.

    A broker outage does not end or fail a partition: librdkafka reconnects, and
    reading resumes at the position (transport errors are logged and counted). A
    position outside the broker's log is never skipped or rewound silently: the
    consumer runs with ``auto.offset.reset=error`` (unless ``config`` overrides it), so
    Kafka's OFFSET_OUT_OF_RANGE reaches this class, and a broker that answers a
    position past its end with nothing at all (Tansu) is caught by re-reading the
    record before the position when idle; then ``on_out_of_range`` decides (see
    ``_KafkaPartition._reposition``), with a log line and a count in
    ``touchstream_kafka_offset_resets``.
    """

    def __init__(
        self,
        brokers: str,
        topics: Mapping[str, Format],
        config: Mapping[str, ConfigValue] | None = None,
        *,
        tail: bool = False,
        batch_size: int = 1000,
        poll_timeout_s: float = 0.001,
        fetch_wait_max_ms: int = 5,
        fetch_queue_backoff_ms: int = 1,
        fetch_min_bytes: int = 1,
        group_id: str = "touchstream",
        stop_after: int | None = None,
        eof_when_idle_s: float | None = None,
        metadata_timeout_s: float = 10.0,
        lag_interval_s: float = 5.0,
        on_out_of_range: OutOfRangePolicy = "earliest",
        idle_rest_s: float | None = 0.01,
        idle_after_s: float = 1.0,
    ) -> None:
        """Describe the input; nothing connects until Bytewax builds it.

        :arg brokers: bootstrap servers, ``"host:port[,host:port...]"``.
        :arg topics: topic name -> wire format (``"json"`` or ``"msgpack"``).
        :arg config: extra librdkafka properties, passed through untouched
            (SASL, SSL, ...); they override the defaults set here.
        :arg tail: without resume state, start at the end (``True``) or the
            beginning (``False``) of each partition.
        :arg batch_size: most records one ``next_batch()`` returns.
        :arg poll_timeout_s: how long a partition rests (``next_awake()``) after a
            ``next_batch()`` found no record queued; ``next_batch()`` itself never
            waits (what is queued comes back at once, up to ``batch_size``).
        :arg idle_rest_s: the rest instead, once a partition has found no record for
            ``idle_after_s`` seconds (since its last record, or since it was built); the
            larger of it and ``poll_timeout_s``; ``None``: never a longer rest. Each rest
            costs the worker one Bytewax activation (``bench/engine_idle.py`` measures
            what an idle engine costs); the first record after a quiet spell waits up
            to this long more.
        :arg idle_after_s: how long a partition goes without a record before it takes
            the idle rest.
        :arg fetch_wait_max_ms: librdkafka ``fetch.wait.max.ms``.
        :arg fetch_queue_backoff_ms: librdkafka ``fetch.queue.backoff.ms``.
        :arg fetch_min_bytes: librdkafka ``fetch.min.bytes``.
        :arg group_id: ``group.id`` (librdkafka needs one; no group is joined and
            nothing is committed).
        :arg stop_after: end each partition after this many records (tests, replay).
        :arg eof_when_idle_s: end each partition after this long without a record.
        :arg metadata_timeout_s: timeout of the metadata calls (``list_parts()``,
            and resolving the end offset when tailing).
        :arg lag_interval_s: how often (at most) each partition updates its
            ``touchstream_kafka_consumer_lag`` gauge (from the cached high watermark)
            and, when idle, checks that its position is still inside the broker's log.
        :arg on_out_of_range: when a partition's position is outside the broker's log
            (the broker lost data, the topic was recreated, retention deleted unread
            records): ``"earliest"`` (default) goes on from the earliest offset, so
            nothing the broker still has is lost (records read before may be read
            again: duplicates); ``"latest"`` goes on from the end (skips what was
            written since); ``"fail"`` raises :class:`KafkaConsumeError`. Each case is
            logged and counted.
        """
        if on_out_of_range not in ("earliest", "latest", "fail"):
            raise ValueError(f"on_out_of_range must be earliest, latest or fail, "
                             f"not {on_out_of_range!r}")
        if not topics:
            raise ValueError("KafkaInput needs at least one topic")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if stop_after is not None and stop_after < 1:
            raise ValueError("stop_after must be at least 1")
        if idle_after_s < 0:
            raise ValueError("idle_after_s must not be negative")
        self.brokers = brokers
        self.topics: dict[str, Format] = dict(topics)
        self.config: dict[str, ConfigValue] = dict(config or {})
        self.tail = tail
        self.batch_size = batch_size
        self.poll_timeout_s = poll_timeout_s
        self.fetch_wait_max_ms = fetch_wait_max_ms
        self.fetch_queue_backoff_ms = fetch_queue_backoff_ms
        self.fetch_min_bytes = fetch_min_bytes
        self.group_id = group_id
        self.stop_after = stop_after
        self.eof_when_idle_s = eof_when_idle_s
        self.metadata_timeout_s = metadata_timeout_s
        self.lag_interval_s = lag_interval_s
        self.on_out_of_range: OutOfRangePolicy = on_out_of_range
        self.idle_rest_s = idle_rest_s
        self.idle_after_s = idle_after_s

    def consumer_config(self) -> dict[str, Any]:
        """The librdkafka consumer configuration each partition uses."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.brokers,
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # End-of-partition events only start the idle clock of eof_when_idle_s.
            "enable.partition.eof": self.eof_when_idle_s is not None,
            "fetch.wait.max.ms": self.fetch_wait_max_ms,
            "fetch.queue.backoff.ms": self.fetch_queue_backoff_ms,
            "fetch.min.bytes": self.fetch_min_bytes,
            # An out-of-range position reaches next_batch() (and on_out_of_range)
            # instead of librdkafka resetting it silently.
            "auto.offset.reset": "error",
        }
        config.update(self.config)
        return config

    def list_parts(self) -> list[str]:
        """Every partition of every topic, as ``"topic/partition"`` (a metadata call each).

        A missing topic raises :class:`KafkaConsumeError`; it is not auto-created
        (Tansu would otherwise create it, with its default partition count, on the
        metadata request).
        """
        # A consumer, not an AdminClient: librdkafka makes an admin client a producer,
        # which would log a CONFWARN for every consumer-only property of the config.
        meta = Consumer({**self.consumer_config(), "allow.auto.create.topics": False})
        try:
            parts: list[str] = []
            for topic in self.topics:
                md = meta.list_topics(topic, timeout=self.metadata_timeout_s)
                tmd = md.topics.get(topic)
                if tmd is None or tmd.error is not None:
                    why = "not found" if tmd is None else str(tmd.error)
                    raise KafkaConsumeError(
                        f"cannot list partitions of Kafka topic {topic!r}: {why}")
                parts.extend(f"{topic}/{p}" for p in sorted(tmd.partitions))
            return parts
        finally:
            meta.close()

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _KafkaPartition:
        """Open one partition at ``resume_state`` (the next offset), else beginning/end."""
        topic, _, idx = for_part.rpartition("/")
        if topic not in self.topics:
            raise ValueError(
                f"partition {for_part!r} is not of a configured topic; "
                "resuming with a different set of topics is not supported"
            )
        if resume_state is not None:
            start = resume_state
        else:
            start = OFFSET_END if self.tail else OFFSET_BEGINNING
        return _KafkaPartition(
            self.consumer_config(),
            topic,
            int(idx),
            self.topics[topic],
            start,
            self.batch_size,
            self.poll_timeout_s,
            self.stop_after,
            self.eof_when_idle_s,
            self.metadata_timeout_s,
            self.lag_interval_s,
            self.on_out_of_range,
            self.idle_rest_s,
            self.idle_after_s,
        )


# --- output ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KafkaMessage:
    """One message for :class:`KafkaOutput`."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


class KafkaDeliveryError(RuntimeError):
    """Messages could not be delivered; raised so the flow fails and recovery replays.

    ``failures`` lists ``(topic, error)`` pairs (at most the first 20 seen).
    """

    def __init__(self, failures: Iterable[tuple[str, str]], count: int, note: str = "") -> None:
        self.failures = list(failures)
        self.count = count
        shown = "; ".join(f"topic {t!r}: {e}" for t, e in self.failures)
        more = f" (+{count - len(self.failures)} more)" if count > len(self.failures) else ""
        super().__init__(f"{count} Kafka message(s) not delivered{note}: {shown}{more}")


_MAX_KEPT_FAILURES: Final = 20


class _ProducerPartition(StatelessSinkPartition[KafkaMessage]):
    """One idempotent producer with a delivery callback on every message."""

    def __init__(self, config: dict[str, Any], retry_poll_s: float, flush_timeout_s: float):
        log.debug("kafka output config %s", mask_config(config))
        self._producer = Producer({**config, "error_cb": _weak_error_cb(self._on_error)})
        self._retry_poll_s = retry_poll_s
        self._flush_timeout_s = flush_timeout_s
        self.delivered = 0
        self.failed = 0
        self.buffer_waits = 0
        self.duplicate_acks = 0
        # With acks=0 no delivery report carries an offset: nothing to tell apart.
        self._offsets_expected = str(config.get("acks", config.get("request.required.acks",
                                                                   "all"))) != "0"
        self._new_failures: list[tuple[str, str]] = []
        self._new_failure_count = 0

    def _on_error(self, err: KafkaError) -> None:
        # Called from poll()/flush() on this thread. Transport errors while a broker is
        # down are retried by librdkafka (queued messages wait, up to message.timeout.ms,
        # then fail through _on_delivery); a fatal error (e.g. the idempotent producer's
        # sequence state lost) makes the next write_batch() raise.
        KAFKA_CLIENT_ERRORS.labels("producer", err.name()).inc()
        if err.fatal():
            self._fail("*", f"fatal producer error: {err}")
        else:
            log.warning("kafka output: %s (librdkafka retries)", err)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            offset = msg.offset()
            if self._offsets_expected and (offset is None or offset < 0):
                self._duplicate_ack(str(msg.topic()), msg.partition())
            return
        self._fail(str(msg.topic()), str(err))

    def _duplicate_ack(self, topic: str, partition: int | None) -> None:
        """A delivered batch without offsets: the broker answered a retry with
        DUPLICATE_SEQUENCE_NUMBER, which librdkafka counts as delivered ("offset and
        timestamp will be invalid"); only the batch's first message reports offset -1.

        On a broker that keeps what it acknowledged this is harmless (the first attempt
        was written, its answer lost). Tansu 0.6.0 on S3 storage records a producer's
        sequence before it writes the batch: killed in between, it answers the retry
        this way and the batch is gone (``tests/faults/test_broker_restart.py``).
        Nothing can be re-sent safely from here, so it is logged and counted.
        """
        self.duplicate_acks += 1
        KAFKA_OUTPUT_DUPLICATE_ACKS.labels(topic).inc()
        log.warning("kafka output: the broker acknowledged a batch to %s [%s] as a duplicate "
                    "of an earlier write (no offsets given): delivered if the broker kept that "
                    "write, lost if it did not", topic, partition)

    def _fail(self, topic: str, error: str) -> None:
        self.failed += 1
        self._new_failure_count += 1
        if len(self._new_failures) < _MAX_KEPT_FAILURES:
            self._new_failures.append((topic, error))

    def _raise_failures(self, note: str = "") -> None:
        if self._new_failure_count:
            failures, count = self._new_failures, self._new_failure_count
            self._new_failures, self._new_failure_count = [], 0
            raise KafkaDeliveryError(failures, count, note)

    def _produce(self, m: KafkaMessage) -> None:
        while True:
            try:
                self._producer.produce(
                    m.topic,
                    value=m.value,
                    key=m.key,
                    headers=list(m.headers) if m.headers else None,
                    on_delivery=self._on_delivery,
                )
                return
            except BufferError:
                # The local queue is full: serve delivery reports until it fits.
                self.buffer_waits += 1
                self._producer.poll(self._retry_poll_s)
                self._raise_failures()
            except KafkaException as exc:
                # Refused before queueing (e.g. larger than message.max.bytes).
                self._fail(m.topic, str(exc.args[0] if exc.args else exc))
                self._raise_failures()

    def write_batch(self, items: list[KafkaMessage]) -> None:
        """Queue every message (waiting when the queue is full) and wait for the broker.

        Once Bytewax commits an epoch, a crash never replays its input, so messages
        still in librdkafka's queue at the commit would be lost. Bytewax 0.21's commit
        waits on the snapshot streams only, not on a ``DynamicSink`` (its ``worker.rs``
        and ``recovery.rs``); what puts this call before the commit is the worker thread:
        it runs the sink, built before Bytewax's recovery steps, ahead of them, and
        cannot take part in the commit while this call holds it. The batch is therefore
        flushed before returning: while the broker is away this waits (back-pressure)
        until every message is acknowledged or fails by ``message.timeout.ms``
        (``tests/faults/test_kill.py`` kills the engine at random moments and finds
        nothing lost).

        :raises KafkaDeliveryError: if any message failed.
        """
        for m in items:
            self._produce(m)
        while self._producer.flush(self._retry_poll_s) > 0:
            self._raise_failures()
        self._raise_failures()

    def close(self) -> None:
        """Flush within the timeout, then let the producer go; raise if anything failed
        or is still undelivered.

        :class:`KafkaOutput` keeps its partitions for their counters; dropped here, the
        producer's librdkafka handle (threads, connections) ends now rather than with
        the output.
        """
        try:
            remaining: int = self._producer.flush(self._flush_timeout_s)
        finally:
            del self._producer
        self._raise_failures()
        if remaining:
            raise KafkaDeliveryError(
                [], remaining, f" (still queued after {self._flush_timeout_s}s flush)"
            )


class KafkaOutput(DynamicSink[KafkaMessage]):
    """Write :class:`KafkaMessage` s to Kafka, failing loudly on any undelivered message.

    Unlike Bytewax's own ``KafkaSink``, every message carries a delivery callback:
    a broker-side failure raises :class:`KafkaDeliveryError` from the next
    ``write_batch()`` (or from ``close()``), and a full local queue
    (``BufferError``) waits for room instead of crashing or dropping.
    ``delivered`` and ``failed`` count over all partitions built from this object
    in this process.
    """

    def __init__(
        self,
        brokers: str,
        config: Mapping[str, ConfigValue] | None = None,
        *,
        linger_ms: int = 1,
        max_queued_messages: int = 100_000,
        retry_poll_s: float = 0.05,
        flush_timeout_s: float = 30.0,
    ) -> None:
        """Describe the output; nothing connects until Bytewax builds it.

        :arg brokers: bootstrap servers, ``"host:port[,host:port...]"``.
        :arg config: extra librdkafka properties, passed through untouched
            (SASL, SSL, ...); they override the defaults set here.
        :arg linger_ms: librdkafka ``linger.ms``.
        :arg max_queued_messages: librdkafka ``queue.buffering.max.messages``, the
            bound of the local queue; when full, writes wait.
        :arg retry_poll_s: how long to serve callbacks before retrying a full queue.
        :arg flush_timeout_s: how long ``close()`` waits for outstanding deliveries.
        """
        self.brokers = brokers
        self.config: dict[str, ConfigValue] = dict(config or {})
        self.linger_ms = linger_ms
        self.max_queued_messages = max_queued_messages
        self.retry_poll_s = retry_poll_s
        self.flush_timeout_s = flush_timeout_s
        self._parts: list[_ProducerPartition] = []

    def producer_config(self) -> dict[str, Any]:
        """The librdkafka producer configuration each partition uses."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.brokers,
            "enable.idempotence": True,
            # A message to a missing topic fails (after message.timeout.ms) instead
            # of creating the topic with the broker's default partition count.
            "allow.auto.create.topics": False,
            "linger.ms": self.linger_ms,
            "queue.buffering.max.messages": self.max_queued_messages,
        }
        config.update(self.config)
        return config

    @property
    def delivered(self) -> int:
        """Messages the broker acknowledged."""
        return sum(p.delivered for p in self._parts)

    @property
    def failed(self) -> int:
        """Messages that could not be delivered."""
        return sum(p.failed for p in self._parts)

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ProducerPartition:
        """Make this worker's producer."""
        part = _ProducerPartition(self.producer_config(), self.retry_poll_s, self.flush_timeout_s)
        self._parts.append(part)
        return part

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the description only, never built producers."""
        state = self.__dict__.copy()
        state["_parts"] = []
        return state


# --- admin ----------------------------------------------------------------------------


def create_topics(
    brokers: str,
    topics: Mapping[str, int],
    replication_factor: int = 1,
    extra_config: Mapping[str, ConfigValue] | None = None,
    *,
    topic_config: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    Idempotent: existing topics are left as they are (a warning is logged when one
    has fewer partitions than asked for).

    :arg topics: topic name -> partition count.
    :arg extra_config: librdkafka properties for the admin client (SASL, SSL, ...).
    :arg topic_config: topic properties; default :data:`DEFAULT_TOPIC_CONFIG`
        (``retention.ms`` set explicitly).
    """
    admin = AdminClient(_base_config(brokers, extra_config))
    existing = admin.list_topics(timeout=timeout_s).topics
    for name, want in topics.items():
        if name in existing and len(existing[name].partitions) < want:
            log.warning(
                "Kafka topic %r has %d partitions, fewer than %d; left as is",
                name,
                len(existing[name].partitions),
                want,
            )
    new = [
        NewTopic(
            name,
            num_partitions=n,
            replication_factor=replication_factor,
            config=dict(DEFAULT_TOPIC_CONFIG if topic_config is None else topic_config),
        )
        for name, n in topics.items()
        if name not in existing
    ]
    if not new:
        return []
    created: list[str] = []
    for name, fut in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            fut.result(timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue  # created concurrently by someone else: fine
            raise
    # Wait until the new topics show up in metadata (immediate on Tansu).
    deadline = time.monotonic() + timeout_s
    while created and time.monotonic() < deadline:
        md = admin.list_topics(timeout=timeout_s).topics
        if all(name in md and md[name].error is None for name in created):
            break
        time.sleep(0.05)
    log.info("created Kafka topics %s", created)
    return sorted(created)
