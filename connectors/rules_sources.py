"""Where rule changes come from, and where their outcome goes.

:class:`ControlSource` is the dataflow's second input (one partition, so every change
is validated once, on one worker). It polls its *backends* in order:

* :class:`FileRules`: the rules file, watched by polling its size / mtime / inode every
  ``interval_s`` (0.2 s); a change is read once the file has been stable for one poll
  (a half-written file is not read);
* :class:`RedisRules`: a Redis key holding the active set (a change message, usually a
  whole set), re-read on every message on its pub/sub channel and every ``resync_s``;
* :class:`KafkaRules`: the control topic ``ops.rules`` (each message a whole set or one
  rule upsert / delete), read with an ``assign()``-ed consumer from the beginning (or
  from the recovered offsets);
* :class:`QueueRules`: changes handed over in-process (tests, embedding).

Each change is checked against the active set by :func:`flows.control.decide`; the
source emits a :class:`~flows.control.RulesStatus` for every decision (``accepted`` /
``rejected``; ``unchanged`` is only logged) and a :class:`~flows.control.RulesUpdate`
for every accepted one, which the flow broadcasts to every shard. Its resume state is
the active set and the backends' cursors (Kafka offsets), so a restart with recovery
neither forgets an accepted change nor applies one twice.

Reads at start (the file's first read, the Redis key's first value, the part of
``ops.rules`` that was already there when reading from the beginning) are *catch-up*:
an older version than the active one is skipped quietly and their outcomes are logged,
not published again on every restart.

:func:`end_with_input` ties the control source's end to the end of the event input
(a dataflow ends only when all of its inputs have ended).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bytewax.inputs import (
    FixedPartitionedSource,
    Source,
    StatefulSourcePartition,
)
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from redis import RedisError

from connectors.wrapped import wrap_source
from flows.codec import json_dumps
from flows.control import (
    ActiveRules,
    RulesChange,
    RulesStatus,
    RulesUpdate,
    change_message,
    decide,
    parse_change,
    rejected,
)
from flows.metrics import RULES_ACTIVE_VERSION, RULES_CHANGES
from flows.rules import MAX_RULES_FILE_BYTES, RulesError

__all__ = [
    "DEFAULT_CONTROL_TOPIC",
    "DEFAULT_REDIS_CHANNEL",
    "DEFAULT_REDIS_KEY",
    "DEFAULT_STATUS_TOPIC",
    "ControlSource",
    "FileRules",
    "Incoming",
    "InputEnd",
    "KafkaRules",
    "QueueRules",
    "RedisRules",
    "RulesBackend",
    "RulesStatusLog",
    "end_with_input",
    "publish_kafka",
    "publish_redis",
    "read_kafka_rules",
    "status_message",
]

log = logging.getLogger(__name__)

DEFAULT_CONTROL_TOPIC = "ops.rules"
DEFAULT_STATUS_TOPIC = "ops.rules.status"
DEFAULT_REDIS_KEY = "touchstream:rules"
DEFAULT_REDIS_CHANNEL = "touchstream:rules"


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message a backend read: the raw change, where it came from, whether catch-up."""

    data: bytes | dict[str, Any] | RulesError
    origin: str
    catch_up: bool = False


class RulesBackend(Protocol):
    """A place rule changes come from. ``start`` (re)opens it at ``cursor``."""

    name: str

    def start(self, cursor: Any) -> None:
        """Open (again), resuming at ``cursor`` (None: from the start)."""

    def poll(self) -> list[Incoming]:
        """The changes that arrived since the last poll; never blocks."""

    def cursor(self) -> Any:
        """Where to resume (plain data for the snapshot)."""

    def close(self) -> None:
        """Release connections."""


# --- the rules file ------------------------------------------------------------------


class FileRules:
    """Watch a rules file (YAML); every stable new content is a whole-set change."""

    def __init__(self, path: str | Path, interval_s: float = 0.2) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self.name = f"file:{self.path}"
        self._seen: tuple[int, int, int] | None = None
        self._pending: tuple[int, int, int] | None = None
        self._next = 0.0
        self._first = True
        self._missing_reported = False

    def start(self, cursor: Any) -> None:
        """Read the file again from scratch (its first read is catch-up)."""
        self._seen = self._pending = None
        self._next = 0.0
        self._first = True

    def _sig(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def poll(self) -> list[Incoming]:
        """Check the file at most every ``interval_s``."""
        now = time.monotonic()
        if now < self._next:
            return []
        self._next = now + self.interval_s
        sig = self._sig()
        if sig is None:
            if not self._missing_reported:
                self._missing_reported = True
                log.warning("rules file %s cannot be read; keeping the active rules", self.path)
            return []
        self._missing_reported = False
        if sig == self._seen:
            return []
        if sig != self._pending and not self._first:
            self._pending = sig  # changed: read it once it stays the same for one poll
            return []
        self._pending = None
        self._seen = sig
        catch_up, self._first = self._first, False
        try:
            with self.path.open("rb") as fh:
                data = fh.read(MAX_RULES_FILE_BYTES + 1)
        except OSError as exc:
            return [Incoming(RulesError([f"{self.path}: cannot read: {exc.strerror}"]),
                             self.name, catch_up)]
        return [Incoming(data, self.name, catch_up)]

    def cursor(self) -> Any:
        """Nothing: the file is read again at start."""
        return None

    def close(self) -> None:
        """Nothing to release."""


# --- a Redis key + pub/sub ---------------------------------------------------------------


class RedisRules:
    """A Redis key holding the active set; its pub/sub channel says when it changed.

    ``client_factory`` makes the client (with the settings' AUTH and TLS). The key is
    read at start, on every message on ``channel`` and every ``resync_s`` (a message
    missed while disconnected is caught up by the next read).
    """

    def __init__(self, client_factory: Callable[[], Any], key: str = DEFAULT_REDIS_KEY,
                 channel: str = DEFAULT_REDIS_CHANNEL, resync_s: float = 5.0) -> None:
        self.client_factory = client_factory
        self.key = key
        self.channel = channel
        self.resync_s = resync_s
        self.name = f"redis:{key}"
        self._client: Any = None
        self._pubsub: Any = None
        self._last: bytes | None = None
        self._next_read = 0.0
        self._first = True
        self._down_logged = False

    def start(self, cursor: Any) -> None:
        """Connect lazily; the first value read is catch-up."""
        self.close()
        self._last = None
        self._next_read = 0.0
        self._first = True

    def _connect(self) -> None:
        if self._client is None:
            self._client = self.client_factory()
        if self._pubsub is None:
            ps = self._client.pubsub(ignore_subscribe_messages=True)
            ps.subscribe(self.channel)
            self._pubsub = ps

    def poll(self) -> list[Incoming]:
        """Drain the channel; read the key if told to, or if it is time to."""
        try:
            self._connect()
            told = False
            while self._pubsub.get_message(timeout=0.0) is not None:
                told = True
            now = time.monotonic()
            if not told and now < self._next_read:
                return []
            self._next_read = now + self.resync_s
            val = self._client.get(self.key)
        except RedisError as exc:
            if not self._down_logged:
                log.warning("rules from Redis: %s; keeping the active rules, retrying",
                            type(exc).__name__)
                self._down_logged = True
            if self._pubsub is not None:
                with contextlib.suppress(RedisError):
                    self._pubsub.close()
                self._pubsub = None
            self._next_read = 0.0
            return []
        self._down_logged = False
        catch_up, self._first = self._first, False
        if val is None or val == self._last:
            return []
        self._last = val
        return [Incoming(bytes(val), self.name, catch_up)]

    def cursor(self) -> Any:
        """Nothing: the key is read again at start."""
        return None

    def close(self) -> None:
        """Unsubscribe and close the client."""
        if self._pubsub is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                self._pubsub.close()
            self._pubsub = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None


# --- the Kafka control topic -----------------------------------------------------------


class KafkaRules:
    """The control topic: every message one change, in offset order (one partition).

    Read from the beginning with an ``assign()``-ed consumer (no group), or from the
    offsets of the snapshot; what was already there at a fresh start is catch-up.
    """

    def __init__(self, brokers: str, topic: str = DEFAULT_CONTROL_TOPIC,
                 config: dict[str, Any] | None = None, metadata_timeout_s: float = 5.0,
                 retry_s: float = 5.0) -> None:
        self.brokers = brokers
        self.topic = topic
        self.config = dict(config or {})
        self.metadata_timeout_s = metadata_timeout_s
        self.retry_s = retry_s
        self.name = f"kafka:{topic}"
        self._consumer: Consumer | None = None
        self._next: dict[int, int] = {}
        self._catch_up_until: dict[int, int] = {}
        self._resumed = False
        self._assigned = False
        self._next_try = 0.0
        self._warned: dict[str, float] = {}

    def _warn(self, what: str, msg: str, *args: Any) -> None:
        """Log a problem at most once a minute per kind (it is retried every poll)."""
        now = time.monotonic()
        if now >= self._warned.get(what, 0.0):
            self._warned[what] = now + 60.0
            log.warning(msg, *args)

    def start(self, cursor: Any) -> None:
        """Resume at the snapshot's offsets (``{partition: next offset}``) or the start."""
        self.close()
        self._next = {int(k): int(v) for k, v in (cursor or {}).items()}
        self._resumed = cursor is not None
        self._assigned = False
        self._next_try = 0.0

    def _assign(self) -> bool:
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + self.retry_s
        if self._consumer is None:
            self._consumer = Consumer({
                "bootstrap.servers": self.brokers, "group.id": "touchstream-rules",
                "enable.auto.commit": False, "enable.auto.offset.store": False,
                "fetch.wait.max.ms": 10, "auto.offset.reset": "earliest", **self.config})
        try:
            md = self._consumer.list_topics(self.topic, timeout=self.metadata_timeout_s)
        except Exception as exc:  # KafkaException: the broker is away
            self._warn("metadata", "rules from Kafka: no metadata for %s: %s; retrying",
                       self.topic, exc)
            return False
        tmd = md.topics.get(self.topic)
        if tmd is None or tmd.error is not None or not tmd.partitions:
            self._warn("missing", "rules from Kafka: topic %s not found (touchstream topics "
                       "create makes it); retrying every %g s", self.topic, self.retry_s)
            return False
        parts = sorted(tmd.partitions)
        if len(parts) > 1:
            log.warning("rules from Kafka: %s has %d partitions; changes are only ordered "
                        "within one: give it one partition", self.topic, len(parts))
        tps = []
        for p in parts:
            start = self._next.get(p, OFFSET_BEGINNING)
            tps.append(TopicPartition(self.topic, p, start))
            if not self._resumed:
                try:
                    _low, high = self._consumer.get_watermark_offsets(
                        TopicPartition(self.topic, p), timeout=self.metadata_timeout_s)
                except Exception:
                    high = 0
                self._catch_up_until[p] = high
        self._consumer.assign(tps)
        self._assigned = True
        return True

    def poll(self) -> list[Incoming]:
        """The messages that arrived (up to 100), in offset order."""
        if not self._assigned and not self._assign():
            return []
        assert self._consumer is not None
        out: list[Incoming] = []
        for msg in self._consumer.consume(num_messages=100, timeout=0):
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    self._warn(str(err.code()), "rules from Kafka: %s", err.str())
                continue
            p, off = msg.partition(), msg.offset()
            assert p is not None and off is not None
            self._next[p] = off + 1
            val = msg.value()
            origin = f"kafka:{self.topic}/{p}@{off}"
            catch_up = off < self._catch_up_until.get(p, 0)
            if val is None:
                out.append(Incoming(RulesError([f"{origin}: empty message"]), origin, catch_up))
            else:
                out.append(Incoming(bytes(val), origin, catch_up))
        return out

    def cursor(self) -> Any:
        """``{partition: next offset}``."""
        return {str(p): o for p, o in self._next.items()}

    def close(self) -> None:
        """Close the consumer."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self._assigned = False


# --- in-process ---------------------------------------------------------------------


class QueueRules:
    """Changes handed over in-process with :meth:`put` (tests, embedding)."""

    def __init__(self, name: str = "queue") -> None:
        self.name = name
        self._q: queue.Queue[Incoming] = queue.Queue()

    def put(self, data: bytes | str | dict[str, Any], origin: str | None = None) -> None:
        """Hand over one change message."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        self._q.put(Incoming(raw, origin or self.name))

    def start(self, cursor: Any) -> None:
        """Nothing to open."""

    def poll(self) -> list[Incoming]:
        """What was put since the last poll."""
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out

    def cursor(self) -> Any:
        """Nothing."""
        return None

    def close(self) -> None:
        """Nothing to release."""


# --- the end of input ------------------------------------------------------------------


class InputEnd:
    """Counts the event input's partitions built and ended in this process.

    The control source ends when every event partition of its process has ended (and
    at least one was built): a dataflow ends only when all of its inputs do.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.built = 0
        self.ended = 0

    def on_build(self) -> None:
        """One more event partition."""
        with self._lock:
            self.built += 1

    def on_end(self) -> None:
        """One event partition ended."""
        with self._lock:
            self.ended += 1

    def done(self) -> bool:
        """Every event partition built here has ended."""
        with self._lock:
            return self.built > 0 and self.ended >= self.built


X = TypeVar("X")


class _EndHooks:
    """Tells ``latch`` of every event partition built and of each one's end."""

    def __init__(self, latch: InputEnd) -> None:
        self.latch = latch

    def built(self) -> None:
        self.latch.on_build()

    def before_batch(self) -> None:
        pass

    def ended(self) -> None:
        self.latch.on_end()

    def awake(self, at: datetime | None) -> datetime | None:
        return at


def end_with_input(source: Source[X], latch: InputEnd) -> Source[X]:
    """``source`` (the event input) reporting its partitions' ends to ``latch``."""
    return wrap_source(source, _EndHooks(latch))


# --- the control source ----------------------------------------------------------------


ControlItem = RulesUpdate | RulesStatus


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Poller:
    """One backend polled on its own thread: the worker never waits on its I/O (a
    broker or Redis that is down, a metadata request). Each message is queued with the
    backend's cursor after it, so the snapshot only covers what the flow was handed."""

    def __init__(self, backend: RulesBackend, cursor: Any, poll_s: float,
                 out: queue.Queue[tuple[str, Incoming, Any]]) -> None:
        self.backend = backend
        self.poll_s = poll_s
        self.out = out
        self._stop = threading.Event()
        self._cursor = cursor
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"rules-{backend.name}"[:60])

    def _run(self) -> None:
        b = self.backend
        try:
            b.start(self._cursor)
            while not self._stop.is_set():
                try:
                    for inc in b.poll():
                        self.out.put((b.name, inc, b.cursor()))
                except Exception:  # a bug or an unexpected client error: log, go on
                    log.exception("rules: reading %s failed; retrying", b.name)
                    self._stop.wait(1.0)
                self._stop.wait(self.poll_s)
        finally:
            b.close()

    def close(self) -> None:
        self._stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(5.0)


class _ControlPartition(StatefulSourcePartition[ControlItem, dict[str, Any]]):
    def __init__(self, backends: Sequence[RulesBackend], active: ActiveRules,
                 cursors: dict[str, Any], poll_s: float, until: InputEnd | None,
                 now_ms: Callable[[], int],
                 on_accept: Callable[[ActiveRules], None] | None) -> None:
        self.on_accept = on_accept
        self.active = active
        self.poll_s = poll_s
        self.until = until
        self.now_ms = now_ms
        self.cursors = {b.name: cursors.get(b.name) for b in backends}
        self._q: queue.Queue[tuple[str, Incoming, Any]] = queue.Queue()
        self._pollers = [_Poller(b, cursors.get(b.name), poll_s, self._q) for b in backends]
        for p in self._pollers:
            p.thread.start()
        RULES_ACTIVE_VERSION.set(active.version)

    def next_batch(self) -> list[ControlItem]:
        if self.until is not None and self.until.done():
            raise StopIteration
        out: list[ControlItem] = []
        while True:
            try:
                name, inc, cursor = self._q.get_nowait()
            except queue.Empty:
                return out
            self.cursors[name] = cursor
            self._handle(inc, out)

    def _handle(self, inc: Incoming, out: list[ControlItem]) -> None:
        now = self.now_ms()
        ch: RulesChange | None = None
        if isinstance(inc.data, RulesError):
            status = rejected(self.active, inc.data, "?", inc.origin, now)
        else:
            try:
                ch = parse_change(inc.data, inc.origin)
            except RulesError as exc:
                status = rejected(self.active, exc, "?", inc.origin, now)
        if ch is not None:
            if inc.catch_up and ch.version < self.active.version:
                log.info("rules: %s holds version %d, older than the active %d: skipped",
                         inc.origin, ch.version, self.active.version)
                return
            d = decide(self.active, ch, now)
            status = d.status
            if d.update is not None:
                self.active = d.active
                out.append(d.update)
                RULES_ACTIVE_VERSION.set(d.active.version)
                self._accepted()
        if status.outcome == "unchanged":
            log.debug("rules: %s: version %s unchanged", inc.origin, status.version)
            return
        RULES_CHANGES.labels(status.outcome).inc()
        if status.outcome == "accepted":
            log.info("rules: version %d (%s, %s) accepted from %s: %d rule(s)",
                     status.version, status.op, status.digest, inc.origin, len(status.rule_ids))
        else:
            log.warning("rules: change from %s rejected; version %d stays active: %s",
                        inc.origin, self.active.version, "; ".join(status.errors))
        if inc.catch_up and status.outcome == "rejected":
            return  # read again at every start: logged, not published again
        out.append(status)

    def _accepted(self) -> None:
        if self.on_accept is None:
            return
        try:
            self.on_accept(self.active)
        except Exception as exc:
            log.warning("rules: version %d accepted, but announcing it failed: %s",
                        self.active.version, type(exc).__name__)

    def next_awake(self) -> datetime | None:
        return datetime.now(UTC) + timedelta(seconds=self.poll_s)

    def snapshot(self) -> dict[str, Any]:
        return {"active": self.active.to_state(), "cursors": dict(self.cursors)}

    def close(self) -> None:
        for p in self._pollers:
            p.close()


class ControlSource(FixedPartitionedSource[ControlItem, dict[str, Any]]):
    """The rule-change input: one partition polling ``backends`` every ``poll_s``.

    ``initial`` is the rule set the flow starts with (the one given to
    :func:`flows.experience.build_flow`); a snapshot's active set and cursors win over
    it on a resume. With ``until``, the source ends once the event input has ended.
    ``on_accept`` is called with each newly accepted set (and with a resumed one), e.g.
    to show it on the /ops console; its failures are logged, never fatal.
    """

    def __init__(self, initial: ActiveRules, backends: Sequence[RulesBackend], *,
                 poll_s: float = 0.05, until: InputEnd | None = None,
                 now_ms: Callable[[], int] = _now_ms,
                 on_accept: Callable[[ActiveRules], None] | None = None) -> None:
        self.on_accept = on_accept
        self.initial = initial
        self.backends = list(backends)
        self.poll_s = poll_s
        self.until = until
        self.now_ms = now_ms

    def list_parts(self) -> list[str]:
        """One partition: changes are decided in one place, in one order."""
        return ["rules"]

    def build_part(self, step_id: str, for_part: str,
                   resume_state: dict[str, Any] | None) -> _ControlPartition:
        """The partition, resumed from its active set and cursors if there are some."""
        active = self.initial
        cursors: dict[str, Any] = {}
        if resume_state:
            active = ActiveRules.from_state(resume_state["active"])
            cursors = dict(resume_state.get("cursors") or {})
            log.info("rules: resuming with version %d (%s)", active.version, active.digest)
        part = _ControlPartition(self.backends, active, cursors, self.poll_s, self.until,
                                 self.now_ms, self.on_accept)
        if resume_state:
            part._accepted()
        return part


# --- status out, publishing ---------------------------------------------------------------


def status_message(s: RulesStatus) -> bytes:
    """The ``ops.rules.status`` JSON of a decision."""
    return json_dumps(s.to_dict())


class _StatusLogPartition(StatelessSinkPartition[RulesStatus]):
    def __init__(self, path: Path) -> None:
        self.path = path

    def write_batch(self, items: list[RulesStatus]) -> None:
        with self.path.open("ab") as fh:
            for s in items:
                fh.write(status_message(s) + b"\n")


class RulesStatusLog(DynamicSink[RulesStatus]):
    """Append every decision to a JSONL file (when there is no Kafka)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def build(self, step_id: str, worker_index: int,
              worker_count: int) -> _StatusLogPartition:
        """One appender per worker (decisions only come from the control worker)."""
        return _StatusLogPartition(self.path)


def publish_kafka(brokers: str, change: RulesChange, topic: str = DEFAULT_CONTROL_TOPIC,
                  config: dict[str, Any] | None = None, timeout_s: float = 10.0) -> None:
    """Produce one change to the control topic and wait for the broker's ack."""
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    p = Producer({"bootstrap.servers": brokers, "enable.idempotence": True, **(config or {})})
    p.produce(topic, change_message(change), key=b"rules", on_delivery=on_delivery)
    left = p.flush(timeout_s)
    if left or errors:
        raise RuntimeError(f"could not write to {topic}: {errors or 'timed out'}")


def publish_redis(client: Any, change: RulesChange, key: str = DEFAULT_REDIS_KEY,
                  channel: str = DEFAULT_REDIS_CHANNEL) -> None:
    """SET the key to the change (a whole set) and PUBLISH its version on the channel."""
    client.set(key, change_message(change))
    client.publish(channel, str(change.version).encode())


def read_kafka_rules(brokers: str, initial: ActiveRules, topic: str = DEFAULT_CONTROL_TOPIC,
                     config: dict[str, Any] | None = None,
                     timeout_s: float = 10.0) -> tuple[ActiveRules, list[RulesStatus]]:
    """Fold the whole control topic over ``initial``, as the engine does: the active set
    and every decision (for ``touchstream rules show --kafka``)."""
    b = KafkaRules(brokers, topic, config, retry_s=0.5)
    b.start(None)
    active = initial
    statuses: list[RulesStatus] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not b._assign():
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic} not found on {brokers}")
            time.sleep(0.2)
        ends = dict(b._catch_up_until)
        while any(b._next.get(p, 0) < h for p, h in ends.items()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out reading {topic}")
            batch = b.poll()
            if not batch:
                time.sleep(0.05)
            for inc in batch:
                if isinstance(inc.data, RulesError):
                    continue
                try:
                    ch = parse_change(inc.data, inc.origin)
                except RulesError:
                    continue
                d = decide(active, ch, _now_ms())
                active = d.active
                statuses.append(d.status)
    finally:
        b.close()
    return active, statuses
