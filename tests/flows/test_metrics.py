"""Engine Prometheus metrics (flows/metrics.py): counters from the stats step, push
latency and Redis round trips in the push sink, Redis outage metrics (held pushes,
unavailable calls, back-pressure, lost pushes, degraded profile reads, ops feed drops),
webhook counters, Kafka lag, /metrics.

The default registry is process-global: every test compares values before and after.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from bytewax.testing import TestingSink, TestingSource, run_main
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from bench.services import free_port
from connectors.console import ConsoleView
from connectors.kafka import KafkaInput
from connectors.ops_feed import OpsFeedConfig, OpsFeedOutput
from connectors.redis_push import RedisPushConfig, RedisPushOutput
from connectors.webhook import RetryPolicy, WebhookOutput
from flows.codec import json_dumps
from flows.experience import Outputs, build_flow
from flows.metrics import count_stat_delta, start_metrics_server
from flows.model import Alert, Profile, Push, PushGuard, RawRecord
from flows.rules import load_default_rules
from flows.runner import run_live
from flows.settings import WebhookTarget, load_settings
from state.profiles import InMemoryProfileStore
from state.redis_store import RedisGuardStore, RedisProfileStore
from tests.faults.redis_server import PersistentRedis, fast_client
from tests.flows.helpers import profile


def value(name: str, **labels: str) -> float:
    """A sample of the default registry (0 when it does not exist yet)."""
    v = REGISTRY.get_sample_value(name, labels)
    return 0.0 if v is None else v


class Snapshot:
    """Values of some samples now, to compare with later."""

    def __init__(self, *samples: tuple[str, dict[str, str]]) -> None:
        self.before = {(n, tuple(sorted(lb.items()))): value(n, **lb) for n, lb in samples}

    def delta(self, name: str, **labels: str) -> float:
        return value(name, **labels) - self.before[(name, tuple(sorted(labels.items())))]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- counters from the stats step ---------------------------------------------------


def _rec(pos: int, body: bytes) -> RawRecord:
    return RawRecord("metrics-test", pos, body)


def test_live_flow_moves_event_push_dead_letter_counters() -> None:
    t = now_ms()

    def click(cid: str, action: str, **kw: Any) -> bytes:
        return json_dumps({"type": "click", "customer_id": cid, "ts": t, "terminal_id": "T1",
                           "hall_id": "H1", "action": action, **kw})

    records = [
        click("13800000101", "session_start"),  # subscribed, unconfigured: setup-first
        click("13800000102", "session_start"),  # opted out: blocked by opt_out
        click("13800000103", "module_enter", module="music"),
        json_dumps({"type": "location", "customer_id": "13800000104", "ts": t,
                    "cell_id": "c1"}),
        json_dumps({"type": "calls", "customer_id": "13800000105", "ts": t,
                    "interval_s": 60, "calls_in": 1, "calls_out": 0, "missed": 0}),
        b"{not json",
        json_dumps({"type": "teleport", "customer_id": "x", "ts": t}),
        json_dumps({"type": "click", "customer_id": "13800000106", "ts": t}),  # no action
    ]
    profiles = InMemoryProfileStore([
        profile("13800000101", subscriptions=["care_link"]),
        profile("13800000102", subscriptions=["care_link"], opt_out=True),
    ])
    stats: list[dict[str, Any]] = []
    pushes: list[Push] = []

    snap = Snapshot(
        ("touchstream_events_total", {"type": "click"}),
        ("touchstream_events_total", {"type": "location"}),
        ("touchstream_events_total", {"type": "calls"}),
        ("touchstream_dead_letters_total", {"reason": "invalid_json"}),
        ("touchstream_dead_letters_total", {"reason": "unknown_type"}),
        ("touchstream_dead_letters_total", {"reason": "missing_field"}),
        ("touchstream_pushes_total", {"rule": "setup-first"}),
        ("touchstream_pushes_blocked_total", {"rule": "setup-first", "guard": "opt_out"}),
    )
    settings = load_settings(mode="live", engine={"stats_interval_s": 0.5})
    flow = build_flow(
        settings,
        source=TestingSource([_rec(i, b) for i, b in enumerate(records)]),
        outputs=Outputs(pushes=[TestingSink(pushes)], stats=[TestingSink(stats)]),
        rules=load_default_rules(),
        profiles=profiles,
    )
    run_main(flow)

    assert [p.rule_id for p in pushes] == ["setup-first"]
    assert snap.delta("touchstream_events_total", type="click") == 3
    assert snap.delta("touchstream_events_total", type="location") == 1
    assert snap.delta("touchstream_events_total", type="calls") == 1
    assert snap.delta("touchstream_dead_letters_total", reason="invalid_json") == 1
    assert snap.delta("touchstream_dead_letters_total", reason="unknown_type") == 1
    assert snap.delta("touchstream_dead_letters_total", reason="missing_field") == 1
    assert snap.delta("touchstream_pushes_total", rule="setup-first") == 1
    assert snap.delta("touchstream_pushes_blocked_total", rule="setup-first",
                      guard="opt_out") == 1
    # the same figures as the stats document
    doc = stats[-1]
    assert doc["events"] == {"click": 3, "location": 1, "calls": 1}
    assert doc["dead_letters_total"] == 3
    assert doc["rules"]["setup-first"]["blocked"] == {"opt_out": 1}


def test_blocked_by_a_rule_condition_is_a_guard_label() -> None:
    snap = Snapshot(
        ("touchstream_pushes_blocked_total", {"rule": "metrics-when", "guard": "when"}),
        ("touchstream_pushes_blocked_total", {"rule": "metrics-when", "guard": "when_error"}),
    )
    count_stat_delta({("rule", "metrics-when", "blocked:when"): 2,
                      ("rule", "metrics-when", "blocked:when_error"): 1})
    assert snap.delta("touchstream_pushes_blocked_total", rule="metrics-when",
                      guard="when") == 2
    assert snap.delta("touchstream_pushes_blocked_total", rule="metrics-when",
                      guard="when_error") == 1


# --- Redis push sink and profile store -----------------------------------------------


def _push(i: int, event_ts: int) -> Push:
    return Push(push_id=f"metrics-{i}-{event_ts}", customer_id=f"C{i}",
                channel=f"terminal:T{i}", rule_id="metrics-rule", rule_version=1,
                content={"kind": "offer", "module": "music"}, event_ts=event_ts,
                reason={}, guard=PushGuard(once_key=None, once_ttl_ms=None, cap=0,
                                           cap_window_ms=0))


@pytest.mark.integration
def test_redis_push_sink_observes_latency_and_rtt(redis_url: str) -> None:
    snap = Snapshot(
        ("touchstream_push_latency_seconds_count", {"rule": "metrics-rule"}),
        ("touchstream_push_latency_seconds_sum", {"rule": "metrics-rule"}),
        ("touchstream_push_latency_seconds_bucket", {"rule": "metrics-rule", "le": "0.025"}),
        ("touchstream_push_latency_seconds_bucket", {"rule": "metrics-rule", "le": "10.0"}),
        ("touchstream_redis_rtt_seconds_count", {"op": "push_write"}),
        ("touchstream_redis_rtt_seconds_count", {"op": "push_guard"}),
        ("touchstream_redis_rtt_seconds_count", {"op": "profile_get"}),
        ("touchstream_push_sink_pushes_total", {"outcome": "written"}),
        ("touchstream_push_sink_pushes_total", {"outcome": "duplicate"}),
    )
    sink = RedisPushOutput(RedisPushConfig(url=redis_url), guard=RedisGuardStore)
    part = sink.build("pushes", 0, 1)
    try:
        t = now_ms() - 200  # triggered 200 ms ago
        batch = [_push(i, t) for i in range(3)]
        part.write_batch(batch)
        part.write_batch(batch[:1])  # a repeat: the guard store says duplicate
    finally:
        part.close()
    assert snap.delta("touchstream_push_latency_seconds_count", rule="metrics-rule") == 3
    total = snap.delta("touchstream_push_latency_seconds_sum", rule="metrics-rule")
    assert 3 * 0.2 <= total < 3 * 5.0
    assert snap.delta("touchstream_push_latency_seconds_bucket", rule="metrics-rule",
                      le="0.025") == 0
    assert snap.delta("touchstream_push_latency_seconds_bucket", rule="metrics-rule",
                      le="10.0") == 3
    # the repeat is appended only if its delivery marker is absent: a second append trip
    assert snap.delta("touchstream_redis_rtt_seconds_count", op="push_write") == 2
    assert snap.delta("touchstream_redis_rtt_seconds_count", op="push_guard") == 2
    assert snap.delta("touchstream_push_sink_pushes_total", outcome="written") == 3
    assert snap.delta("touchstream_push_sink_pushes_total", outcome="duplicate") == 1

    client = redis.Redis.from_url(redis_url)
    try:
        store = RedisProfileStore(client)
        store.get_many(["C1", "C2"])
        store.get_many(["C1", "C2"])  # cached: no round trip
    finally:
        client.close()
    assert snap.delta("touchstream_redis_rtt_seconds_count", op="profile_get") == 1


# --- Redis outages: push sink, ops feed, profiles ----------------------------------------


def wait_until(pred: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _held(worker: int) -> float | None:
    return REGISTRY.get_sample_value("touchstream_redis_held_pushes", {"worker": str(worker)})


@pytest.mark.integration
def test_push_sink_outage_moves_held_unavailable_and_backpressure(tmp_path: Path) -> None:
    """Redis not running yet (its port closed): pushes are held (gauge), each failed
    attempt counted, a full hold makes the flow wait (seconds counted while it waits);
    once Redis runs the hold drains to 0 and every push is written."""
    server = PersistentRedis(tmp_path / "redis")  # not started: nothing on its port
    worker = 41  # a label of this test alone
    snap = Snapshot(
        ("touchstream_redis_unavailable_total", {"op": "push"}),
        ("touchstream_push_sink_backpressure_seconds_total", {}),
        ("touchstream_push_sink_pushes_total", {"outcome": "written"}),
    )
    cfg = RedisPushConfig(url=server.url, retry_interval_s=0.05, max_held_effects=3)
    sink = RedisPushOutput(cfg, client_factory=lambda: fast_client(server.url))
    part = sink.build("pushes", worker, worker + 1)
    writer: threading.Thread | None = None
    try:
        assert _held(worker) == 0  # the series exists before anything is held
        t = now_ms()
        part.write_batch([_push(i, t) for i in range(2)])  # returns: held
        assert _held(worker) == 2
        assert snap.delta("touchstream_redis_unavailable_total", op="push") >= 1
        assert snap.delta("touchstream_push_sink_backpressure_seconds_total") == 0

        errors: list[BaseException] = []

        def write_more() -> None:
            try:
                part.write_batch([_push(i, t) for i in range(2, 5)])  # 1 fits, 2 wait
            except BaseException as exc:
                errors.append(exc)

        writer = threading.Thread(target=write_more, name="metrics-backpressure")
        writer.start()
        # the wait is counted while it lasts, not only when it ends
        assert wait_until(lambda: snap.delta(
            "touchstream_push_sink_backpressure_seconds_total") > 0)
        assert writer.is_alive()
        assert _held(worker) == 3  # at the bound
        failed = snap.delta("touchstream_redis_unavailable_total", op="push")
        assert wait_until(lambda: snap.delta("touchstream_redis_unavailable_total",
                                             op="push") > failed)  # retries count too

        server.start()
        writer.join(30)
        assert not writer.is_alive() and not errors
        assert wait_until(lambda: _held(worker) == 0)
        assert snap.delta("touchstream_push_sink_pushes_total", outcome="written") == 5
        assert sink.stats()["backpressure"] == 1
    finally:
        part.close()
        server.stop()
        if writer is not None:
            writer.join(5)


def test_push_sink_counts_pushes_lost_at_close_without_a_spool() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    snap = Snapshot(("touchstream_push_sink_pushes_total", {"outcome": "lost"}),
                    ("touchstream_redis_unavailable_total", {"op": "push"}))
    cfg = RedisPushConfig(url=url, retry_interval_s=0.05, close_timeout_s=0.0)
    sink = RedisPushOutput(cfg, client_factory=lambda: fast_client(url))
    part = sink.build("pushes", 42, 43)
    part.write_batch([_push(i, now_ms()) for i in range(3)])
    part.close()
    assert snap.delta("touchstream_push_sink_pushes_total", outcome="lost") == 3
    assert sink.stats()["lost"] == 3
    assert snap.delta("touchstream_redis_unavailable_total", op="push") >= 1


def test_ops_feed_counts_dropped_items_by_kind() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    snap = Snapshot(
        ("touchstream_ops_feed_dropped_total", {"kind": "push"}),
        ("touchstream_ops_feed_dropped_total", {"kind": "alert"}),
        ("touchstream_ops_feed_dropped_total", {"kind": "stats"}),
        ("touchstream_redis_unavailable_total", {"op": "ops_feed"}),
    )
    feed = OpsFeedOutput(OpsFeedConfig(url=url, retry_interval_s=0.05),
                         client_factory=lambda: fast_client(url))
    part = feed.build("ops", 0, 1)
    alert = Alert(id="a1", type="touchstream.dwell.step", source="/t", time_ms=1,
                  subject="s", data={})
    t = now_ms()
    try:
        part.write_batch([_push(1, t), alert, {"events": {}}])  # meets the error
        assert snap.delta("touchstream_redis_unavailable_total", op="ops_feed") >= 1
        part.write_batch([_push(2, t), _push(3, t)])  # skipped without calling Redis
    finally:
        part.close()
    assert snap.delta("touchstream_ops_feed_dropped_total", kind="push") == 3
    assert snap.delta("touchstream_ops_feed_dropped_total", kind="alert") == 1
    assert snap.delta("touchstream_ops_feed_dropped_total", kind="stats") == 1
    assert feed.stats()["dropped_pushes"] == 3


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.integration
def test_profile_reads_during_an_outage_count_stale_and_wait(tmp_path: Path) -> None:
    server = PersistentRedis(tmp_path / "redis")
    server.start()
    snap = Snapshot(
        ("touchstream_profile_degraded_reads_total", {"outcome": "stale"}),
        ("touchstream_profile_degraded_reads_total", {"outcome": "wait"}),
        ("touchstream_redis_unavailable_total", {"op": "profiles"}),
    )
    clock = _Clock()
    client = fast_client(server.url)
    store = RedisProfileStore(client, cache_ttl_s=5.0, now=clock, retry_interval_s=0.05)
    reader: threading.Thread | None = None
    try:
        store.put_many([Profile("C1", segment="gold"), Profile("C2", segment="new")])
        store.get_many(["C1", "C3"])  # read once: known from now on
        server.stop()
        clock.t += 60  # expired: served stale while Redis is down
        assert store.get_many(["C1", "C3"]) == {"C1": Profile("C1", segment="gold"),
                                                "C3": Profile("C3")}
        assert snap.delta("touchstream_profile_degraded_reads_total", outcome="stale") == 2
        assert snap.delta("touchstream_redis_unavailable_total", op="profiles") >= 1
        assert snap.delta("touchstream_profile_degraded_reads_total", outcome="wait") == 0

        got: dict[str, Profile] = {}
        reader = threading.Thread(target=lambda: got.update(store.get_many(["C1", "C2"])))
        reader.start()  # C2 was never read: this read waits for Redis
        assert wait_until(lambda: snap.delta("touchstream_profile_degraded_reads_total",
                                             outcome="wait") == 1)
        assert reader.is_alive()
        server.start()
        reader.join(30)
        assert got == {"C1": Profile("C1", segment="gold"), "C2": Profile("C2", segment="new")}
        assert snap.delta("touchstream_profile_degraded_reads_total", outcome="wait") == 1
        assert snap.delta("touchstream_profile_degraded_reads_total", outcome="stale") == 3
    finally:
        store.close()
        client.close()
        server.stop()
        if reader is not None:
            reader.join(5)


# --- webhooks -------------------------------------------------------------------------


def test_webhook_sent_retries_failures_counters() -> None:
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def answer(request: httpx.Request) -> httpx.Response:
        mid = request.headers["webhook-id"]
        with lock:
            seen[mid] = seen.get(mid, 0) + 1
            n = seen[mid]
        if mid == "ok-after-2":
            return httpx.Response(503 if n <= 2 else 200)
        if mid == "rejected":
            return httpx.Response(400)
        return httpx.Response(500)  # always failing: retries exhausted

    sink = WebhookOutput(
        [WebhookTarget(url="https://hooks.example/metrics")],
        on_dead_letter=lambda *a, **kw: None,
        retry=RetryPolicy(max_attempts=3, base_backoff_s=0.0),
        client=lambda: httpx.Client(transport=httpx.MockTransport(answer)),
        sleep=lambda _s: None,
    )
    snap = Snapshot(
        ("touchstream_webhook_sent_total", {"target": "0"}),
        ("touchstream_webhook_retries_total", {"target": "0"}),
        ("touchstream_webhook_failures_total", {"target": "0", "reason": "rejected"}),
        ("touchstream_webhook_failures_total", {"target": "0", "reason": "retries_exhausted"}),
    )

    def alert(i: str) -> Alert:
        return Alert(id=i, type="touchstream.dwell.step", source="/t", time_ms=1, subject="s",
                     data={})

    part = sink.build("webhooks", 0, 1)
    part.write_batch([alert("ok-after-2"), alert("rejected"), alert("down")])
    part.close()
    assert snap.delta("touchstream_webhook_sent_total", target="0") == 1
    assert snap.delta("touchstream_webhook_retries_total", target="0") == 2 + 2
    assert snap.delta("touchstream_webhook_failures_total", target="0", reason="rejected") == 1
    assert snap.delta("touchstream_webhook_failures_total", target="0",
                      reason="retries_exhausted") == 1


# --- Kafka consumer lag ---------------------------------------------------------------


@pytest.mark.integration
def test_kafka_lag_for_a_partition_with_unread_messages(
    tansu: str, tansu_topic: Callable[..., str]
) -> None:
    topic = tansu_topic(1)
    producer = Producer({"bootstrap.servers": tansu, "linger.ms": 0})
    total = 30
    for i in range(total):  # one batch per message
        producer.produce(topic, value=b'{"i": %d}' % i, key=b"k")
        producer.flush(10)
    source = KafkaInput(tansu, {topic: "json"}, batch_size=5, poll_timeout_s=0.2,
                        lag_interval_s=0.0)
    part = source.build_part("in", f"{topic}/0", None)
    read = 0
    lag: float | None = None
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            read += len(part.next_batch())
            lag = REGISTRY.get_sample_value("touchstream_kafka_consumer_lag",
                                            {"topic": topic, "partition": "0"})
            if read and lag is not None:
                break
        assert read and lag is not None, "no lag reported"
        assert 0 < lag <= total - read
        assert read < total
    finally:
        part.close()
    # a closed partition's gauge is gone
    assert REGISTRY.get_sample_value("touchstream_kafka_consumer_lag",
                                     {"topic": topic, "partition": "0"}) is None


# --- /metrics over HTTP ---------------------------------------------------------------


def test_metrics_server_on_a_free_port() -> None:
    server = start_metrics_server(0, addr="127.0.0.1")
    try:
        assert server.port > 0
        r = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
        assert r.status_code == 200
        assert "touchstream_events_total" in r.text or "# HELP touchstream_events" in r.text
    finally:
        server.close()


@pytest.fixture
def live_engine_port() -> Iterator[int]:
    port = free_port()
    settings = load_settings(mode="live", engine={"metrics_port": port,
                                                  "stats_interval_s": 0.5})
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_live(settings, duration_s=4.0, console=ConsoleView(io.StringIO()))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="live-engine", daemon=True)
    thread.start()
    yield port
    thread.join(60)
    assert not thread.is_alive(), "the live engine did not stop"
    assert not errors, errors


def test_run_live_serves_metrics_when_metrics_port_is_set(live_engine_port: int) -> None:
    url = f"http://127.0.0.1:{live_engine_port}/metrics"
    deadline = time.monotonic() + 15
    body = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        body = r.text
        if r.status_code == 200 and "touchstream_events_total{" in body:
            break
        time.sleep(0.2)
    assert "# TYPE touchstream_events_total counter" in body
    assert "touchstream_events_total{" in body  # demo traffic counted
    assert "# TYPE touchstream_push_latency_seconds histogram" in body
