"""Event -> push latency at paced input rates, and ``help-sprite`` timer lateness.

Method (one *run* = one rate with its own engine process and fresh topics):

1. Topics are created for the run (``plan.partitions`` each); the engine starts as its
   own process (``python -m flows.cli run --kafka ... --redis ...``, i.e.
   ``touchstream run``), reading profiles loaded beforehand into a private Redis db
   (:data:`REDIS_DB`).
2. Reader processes ``XREAD BLOCK`` over every push stream the traffic can reach: the
   terminal streams of the demo-hall terminals and the customer streams of the
   scripted network customers (see :mod:`bench.pacer`); each notes the wall clock the
   moment ``XREAD`` returns.
3. Probes on every input partition (:class:`_Probe`) wait until the engine answers;
   a warm-up at the run's rate; the phase (full: 1k events/s for 20 s, 5k for 102 s,
   10k for 20 s; quick: 300 events/s for 5 s). Push latency is measured for the events
   of the first 20 s at every rate (quick: 2 s); the 5k run goes on at 5k events/s
   after that for the ``help-sprite`` timers (90 s). Probes again at the end of the
   measured 20 s (sent by the pacer's thread, in the 5k run while it goes on): once
   they are pushed, every push of the measured events is in, and the time they took is
   how far behind the engine was. The 5k run then waits only for the stuck customers'
   ``help-sprite`` pushes, not for the engine to work off the rest of the phase.
4. Each push is traced through ``reason.trigger_event`` to the send time of its
   event: latency = seen - sent, in an HDR histogram (p50, p99, p99.9, max), also per
   10 s window with the engine's and the broker's CPU use. ``help-sprite`` pushes of
   the customers made to get stuck during the first 10 s of the 5k run give the
   timer lateness = seen - (sent + 90 s).

Before commit 6152a22 the 5k figures covered all 102 s of that run and the part waited
for the engine to catch up after it (up to 33 s per run on Tansu): the 5k figures of
tables made before it (the last at 9e65d50, dated 2026-11-23 like the first made after
it) are not comparable with their 1k and 10k ones, nor with the figures since.

``--compare-kafka-settings`` runs 5k events/s for 20 s once per set of Kafka latency
settings (librdkafka's defaults against small values), passed to the engine through
``TOUCHSTREAM_KAFKA__CONSUMER_CONFIG`` and ``__PRODUCER_CONFIG`` (``linger.ms``), and
also measures event -> ``exp.pushes`` (Kafka)
latency, the path the engine's ``linger.ms`` acts on.

``python -m bench.latency [--quick] [--runs N] [--compare-kafka-settings] [--profile]``
runs this part alone (starting its own Tansu and redis-server unless ``--kafka`` and
``--redis`` are given).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import orjson
import redis
from hdrh.histogram import HdrHistogram

from bench.core import BenchContext, PartResult
from bench.mock_kafka import PARTITIONS as MOCK_PARTITIONS
from bench.mock_kafka import ensure_topics
from bench.pacer import CLICK_CUSTOMERS, Pacer, PhaseRecord, Traffic, click_profiles, parse_event_id
from bench.services import redis_db_url
from connectors.kafka import create_topics
from flows.model import Profile
from gateway.loadtest import cpu_s
from state.redis_store import RedisProfileStore

__all__ = [
    "COMPARE_PHASE",
    "FULL",
    "KAFKA_SETTINGS",
    "LATENESS_TARGET",
    "QUICK",
    "REDIS_DB",
    "Phase",
    "Plan",
    "RunData",
    "broker_pid",
    "compare_kafka_settings",
    "encode_hist",
    "input_only_run",
    "main",
    "plot_cdf",
    "run",
    "run_once",
]

PART = "latency"
REDIS_DB = 11
"""The Redis db this part uses (flushed when the part starts)."""
REPO = Path(__file__).resolve().parent.parent
PROBE_TERMINAL = "P00-T00"
HIST_MAX_US = 3_600_000_000
TOPIC_FIELDS = ("clicks", "location", "calls", "pushes", "alerts", "alerts_dlq",
                "dead_letters", "stats")
READER_CHUNK = 800
"""Most streams one reader process XREADs."""

StreamEntries = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
"""An ``XREAD`` reply of a client without ``decode_responses``: per stream, its
entries as (entry id, fields)."""


def _xread(client: redis.Redis, last: dict[bytes, bytes], block_ms: int) -> StreamEntries:
    """``XREAD BLOCK block_ms`` from the entries after ``last`` (stream -> entry id);
    an empty list when nothing arrived in time."""
    reply = client.xread(last, block=block_ms)  # type: ignore[arg-type]
    return cast(StreamEntries, reply or [])


@dataclass(frozen=True)
class Phase:
    """Paced input: ``rate`` events/s for ``duration_s``; ``stuck`` customers enter a step
    during the first ``stuck_window_s`` seconds and stay there.

    ``measure_s``: push latency is measured for the events of the first ``measure_s``
    seconds only (``None``: the whole phase); the phase goes on at the same rate after
    it, as the traffic the ``help-sprite`` timers fire under.
    """

    name: str
    rate: float
    duration_s: float
    stuck: int = 0
    stuck_window_s: float = 10.0
    measure_s: float | None = None

    @property
    def measured_s(self) -> float:
        """Seconds of the phase whose events' pushes are measured."""
        return self.duration_s if self.measure_s is None else self.measure_s


@dataclass(frozen=True)
class Plan:
    """The phases (one engine process each) and the traffic shape."""

    phases: tuple[Phase, ...]
    warmup_s: float = 3.0
    """Paced at the phase's rate before measuring (after the engine answered)."""
    dwell_s: float = 90.0
    short_dwell_rules: bool = False
    terminals_per_hall: int = 40
    click_customers: int = CLICK_CUSTOMERS
    net_share: float = 0.02
    drain_timeout_s: float = 120.0
    partitions: int = 3
    """Partitions of every topic (``touchstream topics create``'s default)."""

    def net_customers(self, phase: Phase) -> int:
        """Scripted network customers a run may use (6 network events each)."""
        events = phase.rate * (phase.duration_s + self.warmup_s)
        return int(events * 0.8 * self.net_share / 6 * 1.2) + 50


FULL = Plan(
    phases=(
        Phase("1k", 1000, 20),
        # Long enough for help-sprite (90 s) of customers stuck in its first 10 s to fire
        # under the same 5k events/s; push latency over its first 20 s, as at 1k and 10k.
        Phase("5k", 5000, 102, stuck=600, stuck_window_s=10, measure_s=20),
        Phase("10k", 10_000, 20),
    ),
)
QUICK = Plan(
    phases=(Phase("300", 300, 5, stuck=20, stuck_window_s=1, measure_s=2),),
    warmup_s=1.0,
    dwell_s=2.0,
    short_dwell_rules=True,
    terminals_per_hall=4,
    click_customers=2000,
    net_share=0.05,
    drain_timeout_s=60.0,
)
COMPARE_PHASE = Phase("5k", 5000, 20)
"""The phase ``--compare-kafka-settings`` runs once per settings set."""

KAFKA_SETTINGS: dict[str, dict[str, int]] = {
    "librdkafka defaults 500/1000/5": {"fetch.wait.max.ms": 500, "fetch.queue.backoff.ms": 1000,
                                       "linger.ms": 5},
    "100/100/5": {"fetch.wait.max.ms": 100, "fetch.queue.backoff.ms": 100, "linger.ms": 5},
    "5/1/1": {"fetch.wait.max.ms": 5, "fetch.queue.backoff.ms": 1, "linger.ms": 1},
    "1/1/0": {"fetch.wait.max.ms": 1, "fetch.queue.backoff.ms": 1, "linger.ms": 0},
}
"""``fetch.wait.max.ms`` / ``fetch.queue.backoff.ms`` / ``linger.ms`` sets compared."""

PRODUCER_KEYS = frozenset({"linger.ms", "queue.buffering.max.ms", "batch.num.messages",
                           "batch.size", "compression.type", "acks"})
"""The librdkafka properties in a settings set that go to the engine's producers
(``kafka.producer_config``); the rest go to its consumers (``kafka.consumer_config``)."""


def split_client_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``config`` as (consumer properties, producer properties), by :data:`PRODUCER_KEYS`:
    given to every client, a producer key makes each consumer log a CONFWARN."""
    consumer = {k: v for k, v in config.items() if k not in PRODUCER_KEYS}
    producer = {k: v for k, v in config.items() if k in PRODUCER_KEYS}
    return consumer, producer


def kafka_config_env(config: Mapping[str, Any]) -> dict[str, str]:
    """The engine's environment for a settings set: ``TOUCHSTREAM_KAFKA__CONSUMER_CONFIG``
    and ``__PRODUCER_CONFIG``, each only when it has a property."""
    consumer, producer = split_client_config(config)
    env = {}
    if consumer:
        env["TOUCHSTREAM_KAFKA__CONSUMER_CONFIG"] = json.dumps(consumer)
    if producer:
        env["TOUCHSTREAM_KAFKA__PRODUCER_CONFIG"] = json.dumps(producer)
    return env

TARGETS = {
    ("5k", "p50"): "≤ 15 ms",
    ("5k", "p99"): "≤ 50 ms",
    ("10k", "p99"): "≤ 150 ms",
}
LATENESS_TARGET = "≤ 1000 ms"
WINDOW_S = 10.0
"""Width of the time-series windows (latency and CPU over the phase)."""


# --- readers (separate processes, so that the load generator's GIL never delays them) ---


def _redis_reader(url: str, streams: list[str], stop: Any, ready: Any, out: Any) -> None:
    """XREAD BLOCK over ``streams`` until ``stop``; put ``[(event_id, rule, seen_ns,
    entry_ms, stream)]`` on ``out``."""
    client = redis.Redis.from_url(url)
    last: dict[bytes, bytes] = {s.encode(): b"0-0" for s in streams}
    recs: list[tuple[str, str, int, int, str]] = []
    ready.set()
    try:
        while not stop.is_set():
            reply = _xread(client, last, 200)
            seen = time.time_ns()
            if not reply:
                continue
            for key, entries in reply:
                name = key.decode()
                for eid, fields in entries:
                    last[key] = eid
                    try:
                        doc = orjson.loads(fields[b"data"])
                        trigger = str(doc["reason"].get("trigger_event", ""))
                        rule = str(doc["rule_id"])
                    except (KeyError, TypeError, orjson.JSONDecodeError):
                        continue
                    recs.append((trigger, rule, seen, int(eid.split(b"-")[0]), name))
    finally:
        out.put(recs)
        client.close()


def _kafka_reader(brokers: str, topic: str, partitions: int, stop: Any, ready: Any,
                  out: Any) -> None:
    """Read ``topic`` (exp.pushes) from the beginning with an assign()-ed consumer
    polling one message at a time; put ``[(event_id, rule, seen_ns)]`` on ``out``."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition  # noqa: PLC0415

    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "bench-latency",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 5,
                         "fetch.queue.backoff.ms": 1, "fetch.min.bytes": 1})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    recs: list[tuple[str, str, int]] = []
    ready.set()
    try:
        while not stop.is_set():
            msg = consumer.poll(0.1)
            seen = time.time_ns()
            if msg is None or msg.error() is not None:
                continue
            try:
                doc = orjson.loads(msg.value())
                recs.append((str(doc["reason"].get("trigger_event", "")), str(doc["rule_id"]),
                             seen))
            except (KeyError, TypeError, orjson.JSONDecodeError):
                continue
    finally:
        out.put(recs)
        consumer.close()


def _input_reader(brokers: str, topics: dict[str, str], config: dict[str, Any], stop: Any,
                  ready: Any, out: Any) -> None:
    """The engine's Kafka input without the engine: :class:`connectors.kafka.KafkaInput`
    partitions (same defaults, same ``config``) polled round robin as Bytewax does;
    put ``[(event_id, received_ns)]`` on ``out``."""
    from connectors.kafka import KafkaInput  # noqa: PLC0415

    source = KafkaInput(brokers, topics, config)  # type: ignore[arg-type]
    parts = [source.build_part("in", p, None) for p in source.list_parts()]
    recs: list[tuple[str, int]] = []
    ready.set()
    try:
        while not stop.is_set():
            for part in parts:
                batch = part.next_batch()
                if not batch:
                    continue
                now = time.time_ns()
                for rec in batch:
                    with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                        eid = orjson.loads(rec.value).get("event_id")
                        if eid:
                            recs.append((eid, now))
    finally:
        out.put(recs)
        for part in parts:
            part.close()


class _Readers:
    """Reader processes and how to stop them and collect what they saw."""

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._stop = self._ctx.Event()
        self._procs: list[tuple[Any, Any, str]] = []

    def start(self, target: Any, kind: str, *args: Any) -> None:
        ready = self._ctx.Event()
        out = self._ctx.Queue()
        proc = self._ctx.Process(target=target, args=(*args, self._stop, ready, out),
                                 daemon=True)
        proc.start()
        if not ready.wait(30):
            raise RuntimeError(f"{kind} reader did not start")
        self._procs.append((proc, out, kind))

    def collect(self) -> dict[str, list[Any]]:
        self._stop.set()
        got: dict[str, list[Any]] = {}
        for proc, out, kind in self._procs:
            try:
                got.setdefault(kind, []).extend(out.get(timeout=60))
            except Exception:  # queue.Empty: the reader died
                got.setdefault(kind, [])
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        self._procs = []
        return got

    def kill(self) -> None:
        self._stop.set()
        for proc, _, _ in self._procs:
            proc.join(2)
            if proc.is_alive():
                proc.kill()


# --- the engine process ---------------------------------------------------------------


class EngineProcess:
    """``touchstream run`` as a child process (recovery off); its console output goes to a
    log file. ``env`` is added to this process's environment for it (settings such as
    ``TOUCHSTREAM_KAFKA__IDLE_REST_MS``)."""

    def __init__(self, brokers: str, redis_url: str, topics: dict[str, str], log_path: Path,
                 kafka_config: dict[str, Any] | None, rules_file: Path | None,
                 env: Mapping[str, str] | None = None) -> None:
        env = {**os.environ, **(env or {})}
        for fld, name in topics.items():
            env[f"TOUCHSTREAM_KAFKA__{fld.upper()}_TOPIC"] = name
        env.update(kafka_config_env(kafka_config or {}))
        env.setdefault("PYTHONPATH", str(REPO))
        env["TOUCHSTREAM_RECOVERY__ENABLED"] = "false"  # no snapshots in the cwd; see README
        cmd = [sys.executable, "-m", "flows.cli", "run", "--kafka", brokers, "--redis", redis_url]
        if rules_file is not None:
            cmd += ["--rules", str(rules_file)]
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        """The engine's process id (for py-spy)."""
        return self.proc.pid

    def check(self) -> None:
        """Raise if the engine has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"engine exited with {self.proc.returncode}; log "
                               f"{self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of its output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Ctrl-C, then SIGKILL if it does not stop within 10 s."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# --- one run ----------------------------------------------------------------------------


@dataclass
class RunData:
    """What one run measured (histograms in microseconds)."""

    tag: str
    phase: PhaseRecord
    latency: HdrHistogram
    kafka_latency: HdrHistogram
    lateness: HdrHistogram | None
    stuck_expected: int
    info: dict[str, Any] = field(default_factory=dict)


def _hist() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, 3)


def encode_hist(h: HdrHistogram) -> str:
    """An HDR histogram as text (compressed, base64; ``HdrHistogram.decode`` reads it)."""
    raw = h.encode()
    return raw.decode("ascii") if isinstance(raw, bytes) else str(raw)


def short_dwell_rules(path: Path, dwell_s: float) -> Path:
    """The default rules with ``help-sprite``'s dwell set to ``dwell_s`` (quick mode)."""
    from importlib import resources  # noqa: PLC0415

    from flows.rules import DEFAULT_RULES_RESOURCE  # noqa: PLC0415

    text = resources.files("flows").joinpath(DEFAULT_RULES_RESOURCE).read_text("utf-8")
    old = "trigger: {kind: step_dwell, dwell: 90s}"
    if old not in text:
        raise RuntimeError("the default help-sprite rule changed; update bench/latency.py")
    path.write_text(text.replace(old, f"trigger: {{kind: step_dwell, dwell: {dwell_s:g}s}}"))
    return path


class _Probe:
    """Probe pushes on every input partition: is the engine there, has it caught up?

    clicks: a ``session_start`` of a subscriber who never set up care_link
    (``setup-first`` -> the probe terminal); location: a cinema visit three hours ago,
    then one now (``cinema-pay``); calls: three ordinary intervals, then a burst
    (``call-spike``). Each probe is a new customer, sent to one partition explicitly.
    """

    def __init__(self, client: redis.Redis, pacer: Pacer, tag: str, partitions: int) -> None:
        self.client = client
        self.pacer = pacer
        self.tag = tag
        self.partitions = partitions
        self.n = 0
        self.terminal = f"push:terminal:{PROBE_TERMINAL}".encode()
        self.last = b"0-0"
        self.store = RedisProfileStore(client)
        self.sent_ms = 0
        """When :meth:`send` last sent (epoch ms)."""

    def _send(self, p: int, now: int) -> dict[str, bytes]:
        """Send the three probes of partition ``p``; ``{event_id: stream}``."""
        hour = 3_600_000
        out: dict[str, bytes] = {}
        send = self.pacer.send_raw
        for kind in ("clicks", "location", "calls"):
            self.n += 1
            cid = f"probe{self.tag}{self.n}"
            eid = f"{self.tag}probe{self.n}"
            if kind == "clicks":
                self.store.put_many([Profile(cid, subscriptions=frozenset({"care_link"}))])
                send("clicks", cid, {"type": "click", "customer_id": cid, "ts": now,
                                     "terminal_id": PROBE_TERMINAL, "hall_id": "P00",
                                     "action": "session_start", "event_id": eid}, p)
                out[eid] = self.terminal
                continue
            if kind == "location":
                loc = {"type": "location", "customer_id": cid, "cell_id": "cell-cinema-1",
                       "poi": "cinema", "poi_id": "cinema-1"}
                send("location", cid, {**loc, "ts": now - 3 * hour}, p)
                send("location", cid, {**loc, "ts": now, "event_id": eid}, p)
            else:
                for ago, total in ((3, 2), (2, 3), (1, 2), (0, 15)):
                    doc = {"type": "calls", "customer_id": cid, "ts": now - ago * hour,
                           "interval_s": 300, "calls_in": total - total // 3,
                           "calls_out": total // 3, "missed": 0}
                    if not ago:
                        doc["event_id"] = eid
                    send("calls", cid, doc, p)
            out[eid] = f"push:customer:{cid}".encode()
        return out

    def send(self) -> dict[str, bytes]:
        """Probe every partition (not flushed: the pacer's thread may be sending);
        ``{event_id: stream}`` of the pushes to wait for. The send time is
        :attr:`sent_ms`."""
        self.sent_ms = now = time.time_ns() // 1_000_000
        want: dict[str, bytes] = {}
        for p in range(self.partitions):
            want |= self._send(p, now)
        return want

    def answered(self, engine: EngineProcess, want: dict[str, bytes],
                 timeout_s: float) -> int | None:
        """Wait until every probe of ``want`` was pushed: the Redis time (ms, from the
        stream entry id) of the last of those pushes, or None after ``timeout_s``."""
        t0 = time.monotonic()
        want = dict(want)
        streams = {key: b"0-0" for key in want.values()}
        streams[self.terminal] = self.last
        last_ms = 0
        while want:
            engine.check()
            left = timeout_s - (time.monotonic() - t0)
            if left <= 0:
                return None
            reply = _xread(self.client, streams, int(min(left, 0.5) * 1000) or 1)
            for key, entries in reply:
                for eid, fields in entries:
                    streams[key] = eid
                    if key == self.terminal:
                        self.last = eid
                    doc = orjson.loads(fields[b"data"])
                    if want.pop(str(doc["reason"].get("trigger_event")), None) is not None:
                        last_ms = max(last_ms, int(eid.split(b"-")[0]))
        return last_ms

    def wait(self, engine: EngineProcess, timeout_s: float) -> float | None:
        """Probe every partition; seconds until every probe was pushed, or None."""
        t0 = time.monotonic()
        want = self.send()
        self.pacer.flush(10)
        if self.answered(engine, want, timeout_s - (time.monotonic() - t0)) is None:
            return None
        return time.monotonic() - t0


def _await_help(client: redis.Redis, engine: EngineProcess, streams: list[str], expected: set[str],
                timeout_s: float) -> float | None:
    """Wait until a ``help-sprite`` push of every event id in ``expected`` (the stuck
    customers' step entries) is in ``streams``: seconds waited, or None after
    ``timeout_s``. (The readers see the same pushes; this only decides when to stop.)"""
    t0 = time.monotonic()
    last = {name.encode(): b"0-0" for name in streams}
    left = set(expected)
    while left:
        engine.check()
        wait = timeout_s - (time.monotonic() - t0)
        if wait <= 0:
            return None
        reply = _xread(client, last, int(min(wait, 0.5) * 1000) or 1)
        for key, entries in reply:
            for eid, fields in entries:
                last[key] = eid
                doc = orjson.loads(fields[b"data"])
                if doc.get("rule_id") == "help-sprite":
                    left.discard(str(doc["reason"].get("trigger_event")))
    return time.monotonic() - t0


def _reset_outputs(client: redis.Redis) -> None:
    """Delete the push streams and the guard keys of earlier runs (this part's own db):
    the engine starts empty each run, and so must the guards it shares with Redis."""
    for pattern in ("push:*", "guard:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i : i + 1000])


def _create_topics(ctx: BenchContext, names: Sequence[str], partitions: int) -> None:
    """Make a run's topics of ``partitions`` each. librdkafka's mock cluster has no
    CreateTopics: it makes a topic on first use, with :data:`bench.mock_kafka.PARTITIONS`
    (a plan for it must ask for that many)."""
    if ctx.broker != "mock":
        create_topics(ctx.brokers, dict.fromkeys(names, partitions))
        return
    made = ensure_topics(ctx.brokers, names)
    wrong = {n: k for n, k in made.items() if k != partitions}
    if wrong:
        raise RuntimeError(f"the mock cluster made {wrong} partitions, the plan asks for "
                           f"{partitions}")


def _delete_topics(ctx: BenchContext, names: Sequence[str]) -> None:
    if ctx.broker == "mock":  # no DeleteTopics there; its records go with the part's broker
        return
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415

    try:
        futures = AdminClient({"bootstrap.servers": ctx.brokers}).delete_topics(
            list(names), operation_timeout=10)
        for fut in futures.values():
            with contextlib.suppress(Exception):
                fut.result(15)
    except Exception as exc:  # cleanup only
        print(f"latency: could not delete topics: {exc}", file=sys.stderr)


def broker_pid(brokers: str) -> int | None:
    """The pid of the local process listening on the first address of ``brokers``
    (Tansu, or librdkafka's mock cluster of :mod:`bench.mock_kafka`), to read its CPU
    time; None if no process of this host holds that socket (from /proc)."""
    port_s = brokers.split(",", maxsplit=1)[0].rpartition(":")[2]
    if not port_s.isdigit():
        return None
    port = int(port_s)
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rpartition(":")[2], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


def _cpu_s(pid: int | None) -> float | None:
    """:func:`gateway.loadtest.cpu_s`, or None for no process or one that has exited."""
    if pid is None:
        return None
    try:
        return cpu_s(pid)
    except OSError:
        return None


class _CpuSampler:
    """CPU time of the engine and the broker, sampled at the pacer's ticks."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.samples: list[tuple[int, dict[str, float | None]]] = []

    def __call__(self) -> None:
        self.samples.append((time.time_ns(), {k: _cpu_s(p) for k, p in self.pids.items()}))

    def usage(self, lo_ns: int, hi_ns: int) -> dict[str, float | None]:
        """Cores used by each process between the samples nearest ``lo_ns``/``hi_ns``."""
        inside = [s for s in self.samples if lo_ns - 1e9 <= s[0] <= hi_ns + 1e9]
        if len(inside) < 2:
            return {}
        (t0, a), (t1, b) = inside[0], inside[-1]
        out: dict[str, float | None] = {}
        for k in self.pids:
            x, y = a.get(k), b.get(k)
            out[k] = None if x is None or y is None else round((y - x) / ((t1 - t0) / 1e9), 2)
        return out


def run_once(ctx: BenchContext, plan: Plan, phase: Phase, index: int, *,
             kafka_config: dict[str, Any] | None = None, kafka_out: bool = False,
             profile_engine: bool = False) -> RunData:
    """One engine process: probes, warm-up, the phase, probes; see the module doc."""
    tag = f"L{index}x{secrets.token_hex(3)}"
    url = redis_db_url(ctx.redis_url, REDIS_DB)
    work = ctx.work_dir / "latency"
    work.mkdir(parents=True, exist_ok=True)
    client = redis.Redis.from_url(url)
    _reset_outputs(client)
    topics = {f: f"lat.{tag}.{f}" for f in TOPIC_FIELDS}
    _create_topics(ctx, list(topics.values()), plan.partitions)
    rules_file = (short_dwell_rules(work / "rules-short-dwell.yaml", plan.dwell_s)
                  if plan.short_dwell_rules else None)
    traffic = Traffic(seed=1000 + index, net_share=plan.net_share,
                      terminals_per_hall=plan.terminals_per_hall,
                      net_customers=plan.net_customers(phase), net_offset=index * 100_000,
                      stuck_offset=index * 10_000, click_customers=plan.click_customers)
    readers = _Readers()
    engine: EngineProcess | None = None
    pacer: Pacer | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        terminals = [f"push:terminal:{t}" for t in traffic.terminal_ids()]
        customers = [f"push:customer:{c}" for c in traffic.net_customer_ids()]
        readers.start(_redis_reader, "redis", url, terminals)
        for i in range(0, len(customers), READER_CHUNK):
            readers.start(_redis_reader, "redis", url, customers[i : i + READER_CHUNK])
        if kafka_out:
            readers.start(_kafka_reader, "kafka", ctx.brokers, topics["pushes"],
                          plan.partitions)
        log_path = work / f"engine-{tag}.log"
        engine = EngineProcess(ctx.brokers, url, topics, log_path, kafka_config, rules_file)
        pacer = Pacer(ctx.brokers, {k: topics[k] for k in ("clicks", "location", "calls")},
                      traffic, tag)
        probe = _Probe(client, pacer, tag, plan.partitions)
        startup = probe.wait(engine, 120)
        if startup is None:
            raise RuntimeError(f"engine did not answer within 120 s; log {log_path}:\n"
                               f"{engine.log_tail()}")
        info: dict[str, Any] = {"phase": phase.name, "startup_s": round(startup, 2),
                                "engine_log": str(log_path),
                                "kafka_config": kafka_config or {}}
        pacer.run_phase("warmup", phase.rate, plan.warmup_s, measure=False)
        if profile_engine:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "-o",
                 str(work / f"engine-{tag}.svg"), "--pid", str(engine.pid), "--rate", "100",
                 "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu = _CpuSampler({"engine": engine.pid, "broker": broker_pid(ctx.brokers)})
        mid: dict[str, bytes] = {}

        def at_mark() -> None:
            cpu()
            mid.update(probe.send())

        rec = pacer.run_phase(phase.name, phase.rate, phase.duration_s, stuck=phase.stuck,
                              stuck_window_s=phase.stuck_window_s, on_tick=cpu,
                              tick_s=WINDOW_S, mark_s=phase.measure_s, on_mark=at_mark)
        if phase.measure_s is None:
            # Probes after the phase: once answered, every push of the phase is in.
            drained = probe.wait(engine, plan.drain_timeout_s)
            info["drain_s"] = None if drained is None else round(drained, 2)
        else:
            # Probes sent at the end of the measured window: once answered, every push
            # of the measured events is in; how long they took is how far behind the
            # engine was then. The rest of the phase is not waited for, only the
            # help-sprite pushes of the stuck customers.
            if not mid:
                raise RuntimeError(f"the phase ended before its measured {phase.measure_s} s")
            answered_ms = probe.answered(engine, mid, plan.drain_timeout_s)
            info["drain_s"] = (None if answered_ms is None
                               else round(max(0, answered_ms - probe.sent_ms) / 1000, 2))
            if rec.stuck_steps:
                helped = _await_help(client, engine,
                                     [f"push:terminal:{t}" for t in traffic.stuck_terminal_ids()],
                                     {f"{tag}-{seq}" for seq in rec.stuck_steps},
                                     plan.drain_timeout_s)
                info["help_wait_s"] = None if helped is None else round(helped, 2)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(60)
            info["engine_profile"] = str(work / f"engine-{tag}.svg")
        time.sleep(0.3)
        seen = readers.collect()
        info["pushes_in_redis"] = sum(
            int(client.xlen(k)) for k in client.scan_iter(match="push:*", count=1000)
            if b"probe" not in k and not k.endswith(PROBE_TERMINAL.encode()))
        info["net_customers_used"] = traffic.net_used
        return _analyse(tag, pacer, plan, seen, info, cpu)
    finally:
        readers.kill()
        if spy is not None and spy.poll() is None:
            spy.kill()
        if engine is not None:
            engine.stop()
        if pacer is not None:
            pacer.close()
        client.close()
        _delete_topics(ctx, list(topics.values()))


def input_only_run(ctx: BenchContext, plan: Plan, phase: Phase, index: int, *,
                   kafka_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The same traffic read by the engine's Kafka input alone (no engine): the latency
    the broker and the input connector add before the engine sees an event."""
    tag = f"I{index}x{secrets.token_hex(3)}"
    topics = {f: f"lat.{tag}.{f}" for f in ("clicks", "location", "calls")}
    _create_topics(ctx, list(topics.values()), plan.partitions)
    traffic = Traffic(seed=1000 + index, net_share=plan.net_share,
                      terminals_per_hall=plan.terminals_per_hall,
                      net_customers=plan.net_customers(phase), click_customers=plan.click_customers)
    readers = _Readers()
    pacer: Pacer | None = None
    try:
        readers.start(_input_reader, "input", ctx.brokers,
                      {name: "json" for name in topics.values()},
                      split_client_config(kafka_config or {})[0])
        pacer = Pacer(ctx.brokers, topics, traffic, tag)
        pid = broker_pid(ctx.brokers)
        pacer.run_phase("warmup", phase.rate, plan.warmup_s, measure=False)
        cpu = _CpuSampler({"broker": pid})
        ph = pacer.run_phase(phase.name, phase.rate, phase.duration_s, on_tick=cpu,
                             tick_s=WINDOW_S)
        pacer.flush(30)
        time.sleep(2.0)
        got = readers.collect().get("input", [])
    finally:
        readers.kill()
        if pacer is not None:
            pacer.close()
        _delete_topics(ctx, list(topics.values()))
    h = _hist()
    received = 0
    for eid, now in got:
        parsed = parse_event_id(eid)
        if parsed is None or parsed[0] != tag or not ph.first_seq <= parsed[1] < ph.end_seq:
            continue
        received += 1
        h.record_value(max(1, (now - pacer.send_ns[parsed[1]]) // 1000))
    return {"sent": ph.sent, "received": received, "latency": _pct(h),
            "cpu": cpu.usage(ph.start_ns, ph.end_ns), "histogram": h}


def _pct(h: HdrHistogram | None) -> dict[str, float]:
    if h is None or h.get_total_count() == 0:
        return {"count": 0}
    return {
        "count": h.get_total_count(),
        "p50_ms": h.get_value_at_percentile(50) / 1000,
        "p99_ms": h.get_value_at_percentile(99) / 1000,
        "p99.9_ms": h.get_value_at_percentile(99.9) / 1000,
        "max_ms": h.get_max_value() / 1000,
    }


def _q(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 2)


def _analyse(tag: str, pacer: Pacer, plan: Plan, seen: dict[str, list[Any]],
             info: dict[str, Any], cpu: _CpuSampler) -> RunData:
    send_ns = pacer.send_ns
    (ph,) = [p for p in pacer.phases if p.measure]
    end_seq, end_ns = ph.measured_end_seq, ph.measured_end_ns
    stuck = set(ph.stuck_steps)
    dwell_ns = int(plan.dwell_s * 1e9)
    latency = _hist()
    kafka_latency = _hist()
    lateness = _hist() if stuck else None
    counts: Counter[str] = Counter()
    rules: Counter[str] = Counter()
    engine_side: list[float] = []
    reader_side: list[float] = []
    samples: list[tuple[int, int]] = []  # (send_ns, latency_ns)
    negative_lateness = 0
    for trigger, rule, seen_ns, entry_ms, stream in seen.get("redis", []):
        parsed = parse_event_id(trigger)
        if parsed is None or parsed[0] != tag:
            counts["other"] += 1
            continue
        seq = parsed[1]
        if rule == "help-sprite":
            if seq in stuck and lateness is not None:
                v = seen_ns - (send_ns[seq] + dwell_ns)
                if v < 0:
                    negative_lateness += 1
                lateness.record_value(max(1, v // 1000))
                counts["help-sprite (stuck)"] += 1
            else:
                counts["help-sprite (other)"] += 1
            continue
        if seq < ph.first_seq:
            counts["warm-up"] += 1
            continue
        if seq >= end_seq:
            counts["after the measured window"] += 1
            continue
        lat = seen_ns - send_ns[seq]
        latency.record_value(max(1, lat // 1000))
        samples.append((send_ns[seq], lat))
        rules[rule] += 1
        counts["customer" if stream.startswith("push:customer:") else "terminal"] += 1
        engine_side.append(entry_ms - send_ns[seq] / 1e6)
        reader_side.append(seen_ns / 1e6 - entry_ms - 0.5)
    for trigger, rule, seen_ns in seen.get("kafka", []):
        parsed = parse_event_id(trigger)
        if (parsed is not None and parsed[0] == tag and rule != "help-sprite"
                and ph.first_seq <= parsed[1] < end_seq):
            kafka_latency.record_value(max(1, (seen_ns - send_ns[parsed[1]]) // 1000))
    windows = []
    step = int(WINDOW_S * 1e9)
    for lo in range(ph.start_ns, end_ns, step):
        lats = [lat / 1e6 for s, lat in samples if lo <= s < lo + step]
        windows.append({"from_s": round((lo - ph.start_ns) / 1e9), "pushes": len(lats),
                        "p50_ms": _q(lats, 50), "p99_ms": _q(lats, 99),
                        "cpu": cpu.usage(lo, min(lo + step, end_ns))})
    info.update({
        "rate": ph.rate, "sent": ph.sent, "achieved_rate": round(ph.achieved_rate, 1),
        "measured_events": end_seq - ph.first_seq,
        "measured_s": round((end_ns - ph.start_ns) / 1e9, 2),
        "pacer_behind_5ms": ph.late_sends, "stuck": len(stuck),
        "cpu": cpu.usage(ph.start_ns, end_ns),
        "seen": dict(counts), "rules": dict(rules), "negative_lateness": negative_lateness,
        "latency": _pct(latency),
        "send_to_xadd_ms": {"p50": _q(engine_side, 50), "p99": _q(engine_side, 99)},
        "xadd_to_reader_ms": {"p50": _q(reader_side, 50), "p99": _q(reader_side, 99),
                              "p99.9": _q(reader_side, 99.9)},
        "lateness": _pct(lateness),
        "windows": windows,
    })
    if "kafka" in seen:
        info["kafka_latency"] = _pct(kafka_latency)
    return RunData(tag, ph, latency, kafka_latency, lateness, len(stuck), info)


# --- results ----------------------------------------------------------------------------


def _label(name: str) -> str:
    return f"{name} events/s" if name[-1:] == "k" or name.isdigit() else name


def _add_latency_figures(result: PartResult, prefix: str, name: str, h: HdrHistogram,
                         targets: bool = True) -> None:
    st = _pct(h)
    if not st["count"]:
        result.notes.append(f"{prefix} @ {_label(name)}: no push seen in one run")
        return
    for key, pname in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p99.9_ms", "p99.9"),
                       ("max_ms", "max")):
        target = TARGETS.get((name, pname), "") if targets else ""
        result.figure(f"{prefix} {pname} @ {_label(name)}", "ms", target=target,
                      higher_is_better=False).values.append(round(st[key], 3))


def _merge(hs: list[HdrHistogram]) -> HdrHistogram:
    m = _hist()
    for h in hs:
        if h.get_total_count():
            m.add(h)
    return m


def _cdf_points(h: HdrHistogram) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    total = h.get_total_count()
    acc = 0
    for item in h.get_recorded_iterator():
        acc += item.count_added_in_this_iter_step
        xs.append(h.get_highest_equivalent_value(item.value_iterated_to) / 1000)
        ys.append(acc / total)
    return xs, ys


def plot_cdf(path: Path, curves: dict[str, HdrHistogram], title: str,
             marks: Sequence[tuple[float, str]] = (),
             styles: dict[str, dict[str, Any]] | None = None) -> Path | None:
    """A CDF per curve (x: latency in ms, log axis) written to ``path``; ``styles`` maps
    a curve's label to matplotlib line properties."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    curves = {k: h for k, h in curves.items() if h.get_total_count()}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    lo, hi = math.inf, 0.0
    for label, h in curves.items():
        xs, ys = _cdf_points(h)
        lo, hi = min(lo, xs[0]), max(hi, xs[-1])
        ax.step(xs, ys, where="post", label=f"{label} (n={h.get_total_count()})",
                **(styles or {}).get(label, {}))
    hi = max([hi, *(x for x, _ in marks)])
    ax.set_xlim(max(lo / 1.5, 0.01), hi * 1.5)
    for x, text in marks:
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.text(x, 0.5, f" {text}", rotation=90, color="grey", fontsize=8, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("ms (log scale)")
    ax.set_ylabel("fraction of pushes ≤ x")
    ax.set_ylim(0, 1.005)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _prepare_redis(ctx: BenchContext, plan: Plan) -> None:
    client = redis.Redis.from_url(redis_db_url(ctx.redis_url, REDIS_DB))
    try:
        client.flushdb()
        store = RedisProfileStore(client)
        profiles = click_profiles(plan.click_customers)
        for i in range(0, len(profiles), 5000):
            store.put_many(profiles[i : i + 5000])
    finally:
        client.close()


def _run_retrying(ctx: BenchContext, plan: Plan, phase: Phase, index: int,
                  **kw: Any) -> RunData:
    """:func:`run_once`, tried a second time if it failed (the engine is being edited,
    the broker fell over); each run's data is also saved to the work directory."""
    for attempt in range(2):
        try:
            rd = run_once(ctx, plan, phase, index * 2 + attempt, **kw)
        except Exception as exc:
            if attempt or ctx.quick:
                raise
            print(f"latency: {phase.name} run failed ({exc!r}); retrying", file=sys.stderr)
            continue
        path = ctx.work_dir / "latency" / f"run-{rd.tag}.json"
        doc = {**rd.info, "histogram_us": encode_hist(rd.latency),
               "lateness_histogram_us": encode_hist(rd.lateness) if rd.lateness else None}
        path.write_text(json.dumps(doc, indent=1, default=str))
        return rd
    raise AssertionError("unreachable")


def _cpu_figures(result: PartResult, label: str, rd: RunData) -> None:
    for who in ("engine", "broker"):
        v = rd.info["cpu"].get(who)
        if v is not None:
            result.figure(f"{who} CPU @ {label}", "cores",
                          higher_is_better=False).values.append(v)


def plan_for(ctx: BenchContext) -> Plan:
    """:data:`FULL` or, quick, :data:`QUICK`; on librdkafka's mock cluster with the
    partition count it gives every topic (:data:`bench.mock_kafka.PARTITIONS`)."""
    plan = QUICK if ctx.quick else FULL
    if ctx.broker == "mock":
        plan = replace(plan, partitions=MOCK_PARTITIONS)
    return plan


def run(ctx: BenchContext, *, profile_engine: bool = False,
        plan: Plan | None = None) -> PartResult:
    """Latency at 1k, 5k and 10k events/s (quick: one low rate) and help-sprite lateness;
    ``plan`` replaces :func:`plan_for`'s. The result and its files are named ``latency``,
    or ``latency_<broker>`` on another broker than Tansu."""
    plan = plan or plan_for(ctx)
    part = PART if ctx.broker == "tansu" else f"{PART}_{ctx.broker}"
    runs = ctx.run_count
    result = PartResult(part)
    _prepare_redis(ctx, plan)
    data: dict[str, list[RunData]] = {p.name: [] for p in plan.phases}
    for i in range(runs):
        for k, phase in enumerate(plan.phases):
            try:
                rd = _run_retrying(ctx, plan, phase, i * 10 + k,
                                   profile_engine=profile_engine)
            except Exception as exc:
                if ctx.quick:
                    raise
                result.notes.append(f"run {i + 1} at {_label(phase.name)} failed twice: {exc!r}")
                continue
            data[phase.name].append(rd)
            label = _label(phase.name)
            # the targets are judged on Tansu; on the mock cluster the rows carry none
            _add_latency_figures(result, "push latency", phase.name, rd.latency,
                                 targets=ctx.broker == "tansu")
            result.figure(f"pushes measured @ {label}", "pushes").values.append(
                rd.latency.get_total_count())
            result.figure(f"send rate @ {label}", "events/s").values.append(
                round(rd.phase.achieved_rate, 1))
            drained = rd.info["drain_s"]
            result.figure(f"caught up after the measured {phase.measured_s:g} s @ {label}", "s",
                          higher_is_better=False).values.append(
                plan.drain_timeout_s if drained is None else drained)
            if drained is None:
                result.notes.append(
                    f"run {i + 1} at {label}: the engine had not caught up "
                    f"{plan.drain_timeout_s:g} s after the measured window; pushes it never "
                    "made are missing from the latency figures (see 'pushes measured')")
            _cpu_figures(result, label, rd)
            if rd.lateness is None:
                continue
            st = _pct(rd.lateness)
            for key, pname in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
                if st["count"]:
                    result.figure(
                        f"help-sprite lateness {pname} @ {label}", "ms",
                        target=LATENESS_TARGET if pname == "p99" and ctx.broker == "tansu"
                        else "",
                        higher_is_better=False).values.append(round(st[key], 1))
            result.figure("help-sprite pushes seen / expected", "%").values.append(
                round(100 * st["count"] / rd.stuck_expected, 1))
    merged = {_label(n): _merge([rd.latency for rd in rds]) for n, rds in data.items()}
    on = "Tansu" if ctx.broker == "tansu" else "librdkafka's mock cluster"
    plot = plot_cdf(ctx.results_path(part, "-cdf.png"), merged,
                    f"event → push seen in Redis, on {on} ({runs} run(s) merged per rate)",
                    [(15, "15 ms"), (50, "50 ms"), (150, "150 ms")])
    if plot:
        result.plots.append(plot)
    late = _merge([rd.lateness for rds in data.values() for rd in rds
                   if rd.lateness is not None])
    stuck_phase = next((p for p in plan.phases if p.stuck), None)
    if stuck_phase is not None:
        plot = plot_cdf(ctx.results_path(part, "-timers-cdf.png"),
                        {f"help-sprite at {plan.dwell_s:g} s, {_label(stuck_phase.name)}": late},
                        f"help-sprite lateness after the {plan.dwell_s:g} s mark",
                        [(1000, "1 s")])
        if plot:
            result.plots.append(plot)
    result.extra["runs"] = [rd.info for rds in data.values() for rd in rds]
    result.extra["histograms_us"] = {n: [encode_hist(rd.latency) for rd in rds]
                                     for n, rds in data.items()}
    result.extra["lateness_histograms_us"] = [
        encode_hist(rd.lateness) for rds in data.values() for rd in rds
        if rd.lateness is not None]
    result.notes.append(
        "latency = wall clock when a reader's XREAD BLOCK returned the push minus the wall "
        "clock just before the load producer's produce() of the triggering event "
        "(linger.ms=5 included); one engine process per rate and run, "
        f"{plan.warmup_s:g} s warm-up at the rate first; fresh topics of "
        f"{plan.partitions} partitions each")
    if stuck_phase is not None:
        result.notes.append(
            f"help-sprite: {stuck_phase.stuck} customers enter a step during the first "
            f"{stuck_phase.stuck_window_s:g} s of the {_label(stuck_phase.name)} run and send "
            f"nothing more; lateness = seen - (sent + {plan.dwell_s:g} s)")
    return result


def compare_kafka_settings(ctx: BenchContext,
                           settings: dict[str, dict[str, int]] | None = None, *,
                           input_only: bool = True) -> PartResult:
    """The 5k events/s phase once per Kafka settings set (runs interleaved); latency to
    Redis and to ``exp.pushes`` (Kafka)."""
    settings = settings or KAFKA_SETTINGS
    plan = plan_for(ctx)
    phase = plan.phases[0] if ctx.quick else COMPARE_PHASE
    phase = Phase(phase.name, phase.rate, phase.duration_s)  # no stuck customers
    runs = ctx.run_count
    part = f"{PART}-kafka-settings" + ("" if ctx.broker == "tansu" else f"-{ctx.broker}")
    result = PartResult(part)
    _prepare_redis(ctx, plan)
    redis_curves: dict[str, list[HdrHistogram]] = {}
    kafka_curves: dict[str, list[HdrHistogram]] = {}
    input_curves: dict[str, list[HdrHistogram]] = {}
    infos: dict[str, list[dict[str, Any]]] = {}
    for i in range(runs):  # interleaved, so that drift hits every set alike
        for k, (label, conf) in enumerate(settings.items()):
            try:
                rd = _run_retrying(ctx, plan, phase, 100 + i * 10 + k, kafka_config=conf,
                                   kafka_out=True)
            except Exception as exc:
                if ctx.quick:
                    raise
                result.notes.append(f"run {i + 1} of [{label}] failed twice: {exc!r}")
                continue
            _add_latency_figures(result, f"Redis [{label}]", phase.name, rd.latency,
                                 targets=False)
            _add_latency_figures(result, f"exp.pushes [{label}]", phase.name,
                                 rd.kafka_latency, targets=False)
            _cpu_figures(result, f"{_label(phase.name)} [{label}]", rd)
            redis_curves.setdefault(label, []).append(rd.latency)
            kafka_curves.setdefault(label, []).append(rd.kafka_latency)
            infos.setdefault(label, []).append(rd.info)
            if input_only:
                base = input_only_run(ctx, plan, phase, 100 + i * 10 + k, kafka_config=conf)
                h = base.pop("histogram")
                _add_latency_figures(result, f"input only [{label}]", phase.name, h,
                                     targets=False)
                input_curves.setdefault(label, []).append(h)
                rd.info["input_only"] = base
    curves: dict[str, HdrHistogram] = {}
    styles: dict[str, dict[str, Any]] = {}
    for n, label in enumerate(settings):
        for kind, group, ls in (("push in Redis", redis_curves, "-"),
                                ("push in exp.pushes", kafka_curves, "--"),
                                ("event at the input", input_curves, ":")):
            if label in group:
                curves[f"{kind}, {label}"] = _merge(group[label])
                styles[f"{kind}, {label}"] = {"color": f"C{n}", "linestyle": ls}
    plot = plot_cdf(ctx.results_path(part, "-cdf.png"), curves,
                    f"{_label(phase.name)}: fetch.wait.max.ms / fetch.queue.backoff.ms / "
                    "linger.ms", styles=styles)
    if plot:
        result.plots.append(plot)
    result.extra["settings"] = settings
    result.extra["runs"] = infos
    result.notes.append("settings passed to the engine as TOUCHSTREAM_KAFKA__CONSUMER_CONFIG"
                        " and, for producer keys (linger.ms), __PRODUCER_CONFIG (they "
                        "override the connector defaults); exp.pushes is read by an "
                        "assign()-ed consumer with fetch.wait.max.ms=5; 'input only' = the "
                        "same traffic read by the engine's KafkaInput alone (no engine), "
                        "latency to the event's arrival (every event, not only pushes)")
    return result


# --- command line -----------------------------------------------------------------------


def _print(result: PartResult) -> None:
    width = max(len(f.name) for f in result.figures) if result.figures else 10
    print(f"\n{result.part}")
    print(f"{'figure':<{width}}  {'median':>10} {'min':>10} {'max':>10}  unit  target")
    for f in result.figures:
        def fmt(v: float) -> str:
            return "nan" if math.isnan(v) else f"{v:.4g}"
        print(f"{f.name:<{width}}  {fmt(f.median):>10} {fmt(f.min):>10} {fmt(f.max):>10}  "
              f"{f.unit}  {f.target}")
    for n in result.notes:
        print(f"note: {n}")
    for p in result.plots:
        print(f"plot: {p}")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.latency``: this part alone, services started unless given."""
    ap = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few seconds at a low rate")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (full mode)")
    ap.add_argument("--compare-kafka-settings", action="store_true",
                    help="5k events/s with librdkafka's defaults vs small values")
    ap.add_argument("--kafka-settings", type=json.loads, metavar="JSON",
                    help='with --compare-kafka-settings: {"label": {"fetch.wait.max.ms": 5, '
                    '...}, ...} instead of the built-in sets')
    ap.add_argument("--kafka", help="use this broker instead of starting Tansu")
    ap.add_argument("--broker", choices=("tansu", "mock"), default="tansu",
                    help="the broker to start (or, with --kafka, that it is): Tansu, or "
                    "librdkafka's mock cluster (bench/mock_kafka.py)")
    ap.add_argument("--redis", help="use this Redis (db 11 is flushed!) instead of starting one")
    ap.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--work-dir", type=Path, help="logs (default: a temporary directory)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy record the engine during each measured phase (SVG in work dir)")
    args = ap.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-latency-"))
    work.mkdir(parents=True, exist_ok=True)

    def go(brokers: str, redis_url: str) -> PartResult:
        ctx = BenchContext(brokers=brokers, redis_url=redis_url, quick=args.quick,
                           runs=args.runs, results_dir=args.results_dir, work_dir=work,
                           date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
                           broker=args.broker)
        res = (compare_kafka_settings(ctx, args.kafka_settings) if args.compare_kafka_settings
               else run(ctx, profile_engine=args.profile))
        path = ctx.results_path(res.part)
        path.write_text(json.dumps(res.to_json(), indent=2, default=str))
        _print(res)
        print(f"results: {path}\nlogs: {work}")
        return res

    if args.kafka and args.redis:
        go(args.kafka, args.redis)
    else:
        from bench.services import services  # noqa: PLC0415

        with services(work, args.broker) as (brokers, redis_url):
            go(args.kafka or brokers, args.redis or redis_url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
