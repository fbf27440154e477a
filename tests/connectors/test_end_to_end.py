"""Integration: events through Kafka (Tansu) → the engine → Redis push streams, Kafka output
topics and a signed webhook receiver; bad messages on exp.dead_letters."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from standardwebhooks.webhooks import Webhook

from connectors.demo import demo_profiles, demo_script
from connectors.redis_push import read_channel
from flows.cli import main as cli_main
from flows.model import Alert
from flows.runner import KafkaAlertDeadLetters, run_live
from flows.settings import load_settings

pytestmark = pytest.mark.integration

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
EXPECTED_RULES = {"cinema-pay", "call-spike", "music-pref", "setup-first", "help-sprite",
                  "trial-ending"}


class Receiver:
    """A local webhook receiver that verifies every Standard Webhooks signature."""

    def __init__(self) -> None:
        self.accepted: dict[str, dict[str, Any]] = {}
        self.bad_signatures = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                try:
                    Webhook(SECRET).verify(body, dict(self.headers.items()))
                except Exception:
                    with receiver.lock:
                        receiver.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                with receiver.lock:
                    receiver.accepted[self.headers["webhook-id"]] = json.loads(body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/touchstream"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def read_topic(brokers: str, topic: str, partitions: int = 3) -> list[Any]:
    c = Consumer({"bootstrap.servers": brokers, "group.id": "e2e-reader",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out: list[Any] = []
    idle_until = time.monotonic() + 3
    while time.monotonic() < idle_until:
        m = c.poll(0.2)
        if m is None or m.error():
            continue
        out.append(m)
        idle_until = time.monotonic() + 1.5
    c.close()
    return out


def test_events_through_kafka_reach_redis_kafka_and_the_webhook(
    tansu: str, redis_url: str, receiver: Receiver, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert cli_main(["topics", "create", "--kafka", tansu]) == 0
    start = time.time_ns() // 1_000_000 - 130_000
    prof = tmp_path / "profiles.jsonl"
    prof.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in demo_profiles(0, start)))
    assert cli_main(["profiles", "load", str(prof), "--redis", redis_url]) == 0

    producer = Producer({"bootstrap.servers": tansu, "linger.ms": 1})
    topic_of = {"click": "touch.clicks", "location": "net.location", "calls": "net.calls"}
    script = [ev for _, ev in demo_script(0, start)]
    for ev in script:
        producer.produce(topic_of[ev["type"]], json.dumps(ev).encode(),
                         key=ev["customer_id"].encode())
    producer.produce("touch.clicks", b"{not json", key=b"13800000099")
    producer.produce("net.location", json.dumps(
        {"type": "location", "customer_id": "13800000098", "ts": start, "cell_id": "x"}
    ).encode(), key=b"someone-else")
    assert producer.flush(10) == 0

    monkeypatch.setenv("TOUCHSTREAM_WEBHOOK_SECRET", SECRET)
    settings = load_settings(mode="live", kafka={"brokers": tansu, "eof_when_idle_s": 4},
                             redis={"url": redis_url}, webhook_url=receiver.url,
                             engine={"stats_interval_s": 1},
                             recovery={"dir": tmp_path / "recovery"})
    run_live(settings)

    # Redis push streams: every push rule, on the right channels.
    client = redis.Redis.from_url(redis_url)
    streams = sorted(k.decode() for k in client.scan_iter("push:*"))
    redis_pushes = [p for s in streams for _, p in read_channel(client, s[len("push:"):])]
    assert {p["rule_id"] for p in redis_pushes} == EXPECTED_RULES
    assert "push:customer:13800000001" in streams  # cinema-pay outside a session
    assert "push:terminal:H01-T06" in streams  # help-sprite on the stuck customer's kiosk
    assert len({p["push_id"] for p in redis_pushes}) == len(redis_pushes)

    # The same pushes on exp.pushes, keyed by customer, with the idempotency header.
    msgs = read_topic(tansu, "exp.pushes")
    kafka_pushes = {json.loads(m.value())["push_id"]: m for m in msgs}
    assert set(kafka_pushes) == {p["push_id"] for p in redis_pushes}
    for pid, m in kafka_pushes.items():
        headers = dict(m.headers())
        assert headers["idempotency-key"] == pid.encode()
        assert headers["content-type"] == b"application/json"
        assert m.key() == json.loads(m.value())["customer_id"].encode()

    # Alerts on ops.alerts and at the webhook receiver, signed, once per id.
    alerts = [json.loads(m.value()) for m in read_topic(tansu, "ops.alerts")]
    types = {a["type"] for a in alerts}
    assert types == {"touchstream.dwell.customer", "touchstream.dwell.step"}
    assert receiver.bad_signatures == 0
    assert set(receiver.accepted) == {a["id"] for a in alerts}
    assert all(a["specversion"] == "1.0" for a in receiver.accepted.values())

    # Bad messages on exp.dead_letters with their reasons.
    dead = [json.loads(m.value()) for m in read_topic(tansu, "exp.dead_letters")]
    assert sorted(d["reason"] for d in dead) == ["invalid_json", "key_mismatch"]
    stats = [json.loads(m.value()) for m in read_topic(tansu, "exp.stats")]
    assert stats and stats[-1]["dead_letters_total"] == 2


def test_alert_dead_letters_go_to_the_kafka_dlq_topic(tansu: str) -> None:
    cli_main(["topics", "create", "--kafka", tansu])
    dlq = KafkaAlertDeadLetters(tansu, "ops.alerts.dlq", {})
    alert = Alert("a-1", "touchstream.dwell.step", "/touchstream/rules/step-friction",
                  1_700_000_000_000, "remote_cam/door", {"n": 5})
    dlq(alert, "https://oncall.example/hook", "retries_exhausted", 503, attempts=6)
    rows = [json.loads(m.value()) for m in read_topic(tansu, "ops.alerts.dlq")]
    mine = [r for r in rows if r["cloudevent"]["id"] == "a-1"]
    assert mine and mine[0]["reason"] == "retries_exhausted" and mine[0]["last_status"] == 503
