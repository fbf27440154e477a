"""Fault: Redis stops for 30 s in the middle of a live run and comes back (issue #5).

The engine runs live (``flows.runner.run_live`` in a thread: Kafka in from the Tansu
fixture; Redis push streams, the ops feed and Kafka out; recovery on, so held pushes
are spooled to disk) against a redis-server this test owns, with append-only
persistence (``--appendonly yes --appendfsync always``).
A fixed stream of click rounds (a session start and the music module for one of a
dozen music lovers: one push per round) is produced before, during and after the
outage at a steady pace. Redis is stopped with SIGTERM for 30 s while rounds keep
arriving, then started again on the same port and directory.

It checks that the flow kept reading during the outage (pushes of rounds produced in
the outage reach ``exp.pushes`` before Redis is back), that the push sink held
pushes meanwhile (its ``held`` gauge above 0) and delivered them after Redis returned
while the flow was still running, and that in the end every push on ``exp.pushes``
(one per round) is in the Redis streams exactly once: none lost, none twice.

The smaller tests at the end check the ops feed alone: it skips (and counts) what it
cannot write while Redis is down, never raises, and writes again once Redis is back.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from connectors.ops_feed import OpsFeedConfig, OpsFeedOutput
from connectors.redis_push import RedisPushOutput, read_channel
from flows import runner
from flows.codec import json_dumps, json_loads
from flows.model import Alert, Profile, Push
from flows.settings import load_settings
from state.redis_store import RedisProfileStore
from tests.faults.redis_server import PersistentRedis, fast_client

pytestmark = pytest.mark.integration

OUTAGE_S = 30.0
BEFORE_S = 4.0
AFTER_S = 5.0
ROUND_EVERY_S = 0.2
CUSTOMERS = [f"1380013{k:04d}" for k in range(12)]
EOF_IDLE_S = 10.0

RULES = """\
version: 1
guards: {max_pushes_per_customer: 0, cap_window: 24h, respect_opt_out: true}
rules:
  - id: music-pref
    description: A music lover opens the music module -> their genres.
    trigger: {kind: module_enter, module: music, pref: music}
    push: {module: music, kind: content}
    once_per: session
"""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def wait_until(pred: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


class Seen:
    """What the test watches while the engine runs (the sinks and stores it builds)."""

    def __init__(self) -> None:
        self.push_sinks: list[RedisPushOutput] = []
        self.feeds: list[OpsFeedOutput] = []
        self.profiles: list[RedisProfileStore] = []

    def held(self) -> int:
        return sum(s.stats().get("held", 0) for s in self.push_sinks)


def watch(monkeypatch: pytest.MonkeyPatch) -> Seen:
    """Let the runner build the real sinks and store, and keep a handle on them."""
    seen = Seen()

    class PushOutput(RedisPushOutput):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.push_sinks.append(self)

    class Feed(OpsFeedOutput):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.feeds.append(self)

    class Profiles(RedisProfileStore):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.profiles.append(self)

    monkeypatch.setattr(runner, "RedisPushOutput", PushOutput)
    monkeypatch.setattr(runner, "OpsFeedOutput", Feed)
    monkeypatch.setattr(runner, "RedisProfileStore", Profiles)
    return seen


class PushTopicReader:
    """Reads the pushes topic in a thread, noting when each push arrived."""

    def __init__(self, brokers: str, topic: str) -> None:
        self.arrivals: list[tuple[float, str, int]] = []  # (monotonic, push id, event ts)
        self._stop = threading.Event()
        self._consumer = Consumer({"bootstrap.servers": brokers, "group.id": f"r-{topic}",
                                   "enable.auto.commit": False, "fetch.wait.max.ms": 50})
        self._consumer.assign([TopicPartition(topic, 0, 0)])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            m = self._consumer.poll(0.1)
            if m is None or m.error():
                continue
            doc = json_loads(m.value())
            self.arrivals.append((time.monotonic(), doc["push_id"], doc["event_ts"]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


def redis_push_ids(url: str) -> Counter[str]:
    c = redis.Redis.from_url(url)
    try:
        ids: Counter[str] = Counter()
        for key in c.scan_iter("push:*"):
            channel = key.decode().removeprefix("push:")
            last = "0-0"
            while batch := read_channel(c, channel, last, count=500):
                ids.update(doc["push_id"] for _, doc in batch)
                last = batch[-1][0]
        return ids
    finally:
        c.close()


def test_redis_outage_mid_run_loses_and_repeats_nothing(
    tansu: str, tansu_topic: Callable[..., str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = PersistentRedis(tmp_path / "redis")
    server.start()
    try:
        _run_outage(server, tansu, tansu_topic, tmp_path, monkeypatch)
    finally:
        server.stop()


def _run_outage(server: PersistentRedis, tansu: str, tansu_topic: Callable[..., str],
                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    topics = {name: tansu_topic(partitions=1) for name in (
        "clicks_topic", "location_topic", "calls_topic", "pushes_topic", "alerts_topic",
        "alerts_dlq_topic", "dead_letters_topic", "stats_topic")}
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    admin = fast_client(server.url)
    RedisProfileStore(admin).put_many(
        Profile(c, subscriptions=frozenset({"music"}), prefs={"music": ("jazz",)})
        for c in CUSTOMERS)
    admin.close()
    settings = load_settings(
        mode="live", rules_file=rules,
        kafka={"brokers": tansu, "eof_when_idle_s": EOF_IDLE_S, **topics},
        redis={"url": server.url, "retry_interval_s": 0.5, "max_held_effects": 10_000},
        engine={"stats_interval_s": 1.0},
        recovery={"enabled": True, "dir": tmp_path / "recovery"},
    )
    seen = watch(monkeypatch)
    errors: list[BaseException] = []
    finished = threading.Event()

    def engine() -> None:
        try:
            runner.run_live(settings)
        except BaseException as exc:
            errors.append(exc)
        finally:
            finished.set()

    producer = Producer({"bootstrap.servers": tansu, "linger.ms": 1})
    rounds: list[tuple[float, int]] = []  # (monotonic when produced, its push's event ts)

    def produce_round(i: int) -> None:
        cid = CUSTOMERS[i % len(CUSTOMERS)]
        ts = now_ms()
        base = {"type": "click", "customer_id": cid, "terminal_id": f"H01-T{i % 12:02d}",
                "hall_id": "H01"}
        for doc in ({**base, "ts": ts, "action": "session_start"},
                    {**base, "ts": ts + 1, "action": "module_enter", "module": "music"}):
            producer.produce(topics["clicks_topic"], json_dumps(doc), key=cid.encode())
        producer.flush(10)
        rounds.append((time.monotonic(), ts + 1))  # the push carries module_enter's ts

    def produce_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            produce_round(len(rounds))
            time.sleep(ROUND_EVERY_S)

    held_samples: list[tuple[float, int]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            held_samples.append((time.monotonic(), seen.held()))
            time.sleep(0.1)

    reader = PushTopicReader(tansu, topics["pushes_topic"])
    thread = threading.Thread(target=engine, daemon=True)
    sampler = threading.Thread(target=sample, daemon=True)
    t_start = time.monotonic()
    thread.start()
    sampler.start()
    try:
        # warm up: every customer once, until their pushes are in Redis (profiles cached)
        for _ in CUSTOMERS:
            produce_round(len(rounds))
        assert wait_until(lambda: sum(redis_push_ids(server.url).values()) == len(CUSTOMERS),
                          60), f"the engine did not start: {errors}"
        produce_for(BEFORE_S)
        t_down = time.monotonic()
        server.stop()
        produce_for(OUTAGE_S)
        t_up = time.monotonic()
        server.start()
        produce_for(AFTER_S)
        t_last = time.monotonic()
        drained_while_running = wait_until(lambda: seen.held() == 0, 30) and (
            not finished.is_set())
        assert finished.wait(EOF_IDLE_S + 60), "the engine did not stop after its input"
    finally:
        sampling.set()
        reader.close()
    thread.join(5)
    assert not errors, errors

    # every round made one push on exp.pushes, each once (Kafka does not need Redis)
    kafka_ids = Counter(pid for _, pid, _ in reader.arrivals)
    assert len(kafka_ids) == len(rounds) and set(kafka_ids.values()) == {1}

    # the flow kept reading during the outage: rounds produced in it reached Kafka
    # before Redis came back
    outage_rounds = {ts for t, ts in rounds if t_down <= t < t_up - 3.0}
    on_kafka_in_outage = {ts for t, _, ts in reader.arrivals if t < t_up} & outage_rounds
    assert len(outage_rounds) > 100
    assert len(on_kafka_in_outage) >= 0.8 * len(outage_rounds)

    # held during the outage, delivered after it while the flow was still running
    in_outage = [n for t, n in held_samples if t_down <= t < t_up]
    held_max = max(in_outage)
    assert held_max > 0
    assert drained_while_running
    t_drained = min(t for t, n in held_samples if t > t_up and n == 0)
    stats = seen.push_sinks[0].stats()
    assert stats["held_max"] >= held_max and stats["redis_errors"] >= 1
    assert "lost" not in stats and "backpressure" not in stats
    # with recovery on, the runner spools the hold to disk; delivered, the file is empty
    spools = list((tmp_path / "recovery").rglob("push-held-*.jsonl"))
    assert spools and all(f.stat().st_size == 0 for f in spools)

    # in Redis, every push of exp.pushes exactly once: nothing lost, nothing twice
    in_redis = redis_push_ids(server.url)
    lost = set(kafka_ids) - set(in_redis)
    repeated = {pid: n for pid, n in in_redis.items() if n > 1}
    extra = set(in_redis) - set(kafka_ids)
    assert (lost, repeated, extra) == (set(), {}, set())

    # profiles: the cached customers were served their last known profile, none waited
    prof = seen.profiles[0].stats()
    assert prof["stale_served"] > 0 and prof["unreachable_waits"] == 0
    # the ops feed skipped the outage's pushes (dashboards miss them) and went on
    feed = seen.feeds[0].stats()
    assert feed.get("dropped_pushes", 0) > 0

    print(f"\nredis outage: {OUTAGE_S:.0f} s (stopped {t_down - t_start:.1f} s into the run, "
          f"back at {t_up - t_start:.1f} s); events sent {2 * len(rounds)} "
          f"({len(rounds)} rounds, {len(outage_rounds)} of them in the outage); "
          f"pushes expected {len(kafka_ids)}; read during the outage "
          f"{len(on_kafka_in_outage)}/{len(outage_rounds)}; held max {stats['held_max']}; "
          f"held total {stats.get('held_total', 0)}; hold empty {t_drained - t_up:.1f} s "
          f"after Redis returned (the last event {t_last - t_up:.1f} s after); "
          f"delivered {sum(in_redis.values())}; lost {len(lost)}; repeated {len(repeated)}; "
          f"redis errors {stats['redis_errors']}; profiles served stale "
          f"{prof['stale_served']}; ops feed dropped {feed.get('dropped_pushes', 0)} "
          f"push summaries")


# --- the ops feed alone ------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    server = PersistentRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def a_push(i: int) -> Push:
    return Push(f"p{i}", "C1", "terminal:T1", "music-pref", 1, {"module": "music"},
                1_700_000_000_000 + i, {"hall_id": "H01"})


def test_ops_feed_skips_while_redis_is_down_and_resumes(own_redis: PersistentRedis) -> None:
    url = own_redis.url
    feed = OpsFeedOutput(OpsFeedConfig(url=url, retry_interval_s=0.05),
                         client_factory=lambda: fast_client(url))
    part = feed.build("ops", 0, 1)
    alert = Alert("a1", "touchstream.dwell.customer", "touchstream", 1_700_000_000_000,
                  "C1", {})
    part.write_batch([a_push(1), {"events": 1}])
    own_redis.stop()
    part.write_batch([a_push(2), a_push(3), alert])  # fails once: dropped, not raised
    part.write_batch([{"events": 2}])  # Redis known down: skipped without a round trip
    assert feed.stats() == {"written": 2, "redis_errors": 1, "dropped_pushes": 2,
                            "dropped_alerts": 1, "dropped_stats": 1}
    own_redis.start()
    c = fast_client(url)
    assert wait_until(lambda: part._health.up, 10)  # the background PING saw it back
    part.write_batch([a_push(4), {"events": 4}])
    assert [json_loads(f[b"data"])["event_ts"] % 1000 for _, f in c.xrange("ops:pushes")] == [
        1, 4]
    assert json_loads(c.get("ops:stats")) == {"events": 4}
    assert feed.stats()["written"] == 4
    part.close()
    c.close()
