"""Tests for connectors/webhook.py: signing, retries, dead letters, queueing, Bytewax."""

from __future__ import annotations

import base64
import logging
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import bytewax.operators as op
import httpx
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource, cluster_main, run_main
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from connectors.webhook import (
    JsonlDeadLetterFile,
    RetryPolicy,
    WebhookCounts,
    WebhookOutput,
    sign_webhook,
)
from flows.codec import json_dumps, json_loads
from flows.model import Alert
from flows.settings import WebhookTarget

SECRET = "whsec_" + base64.b64encode(b"touchstream-test-signing-key-32b").decode()
URL = "https://oncall.example/hooks/T0SECRETPATH"
STEP = "touchstream.dwell.step"


def make_alert(i: int = 1, typ: str = STEP) -> Alert:
    return Alert(
        id=f"a{i}",
        type=typ,
        source="/touchstream/rules/step-friction",
        time_ms=1_700_000_000_000 + i,
        subject="remote_cam/door_sensor",
        data={"n": 5, "i": i},
    )


def target(url: str = URL, **kw: Any) -> WebhookTarget:
    if "secret" in kw and isinstance(kw["secret"], str):
        kw["secret"] = SecretStr(kw["secret"])
    return WebhookTarget(url=url, **kw)


class DeadLetters:
    """A thread-safe in-memory DeadLetterHandler."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(
        self,
        alert: Alert,
        target_url: str,
        reason: str,
        last_status: int | None,
        *,
        attempts: int = 0,
        error: str | None = None,
    ) -> None:
        with self._lock:
            self.items.append(
                {
                    "id": alert.id,
                    "target": target_url,
                    "reason": reason,
                    "last_status": last_status,
                    "attempts": attempts,
                    "error": error,
                }
            )


class FakeTime:
    """Injected sleep + monotonic clock: sleeping only advances the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def sleep(self, s: float) -> None:
        with self._lock:
            self.sleeps.append(s)
            self.now += s

    def clock(self) -> float:
        return self.now


class MaxRandom(random.Random):
    """Full jitter always picks the cap (deterministic delays)."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Recorder:
    """A MockTransport handler that records requests and answers from a script."""

    def __init__(self, answer: Callable[[httpx.Request, int], httpx.Response] | None = None):
        self.requests: list[httpx.Request] = []
        self._lock = threading.Lock()
        self._answer = answer or (lambda req, n: httpx.Response(200))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests.append(request)
            n = sum(1 for r in self.requests if r.headers.get("webhook-id")
                    == request.headers.get("webhook-id") and r.url == request.url)
        return self._answer(request, n)

    def factory(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self))


def make_sink(
    handler: Recorder,
    targets: list[WebhookTarget] | None = None,
    dlq: Any = None,
    ft: FakeTime | None = None,
    **kw: Any,
) -> tuple[WebhookOutput, DeadLetters, FakeTime]:
    ft = ft or FakeTime()
    dl = dlq if dlq is not None else DeadLetters()
    kw.setdefault("sleep", ft.sleep)
    kw.setdefault("clock", ft.clock)
    sink = WebhookOutput(
        targets if targets is not None else [target(secret=SECRET)],
        on_dead_letter=dl,
        client=handler.factory,
        **kw,
    )
    return sink, dl, ft


def deliver(sink: WebhookOutput, alerts: list[Alert]) -> None:
    part = sink.build("webhooks", 0, 1)
    part.write_batch(alerts)
    part.close()


# --- signing ----------------------------------------------------------------------


def test_signature_verifies_with_standardwebhooks() -> None:
    rec = Recorder()
    sink, dl, _ = make_sink(rec)
    alert = make_alert()
    deliver(sink, [alert])

    assert len(rec.requests) == 1
    req = rec.requests[0]
    assert req.method == "POST"
    assert req.headers["content-type"] == "application/cloudevents+json"
    assert req.content == json_dumps(alert.to_cloudevent())
    assert req.headers["webhook-id"] == "a1"
    assert abs(int(req.headers["webhook-timestamp"]) - time.time()) < 60
    payload = Webhook(SECRET).verify(req.content, dict(req.headers))
    assert payload == alert.to_cloudevent()
    # a different secret does not verify
    other = "whsec_" + base64.b64encode(b"another-key-another-key-another!").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(req.content, dict(req.headers))
    assert dl.items == []
    assert sink.total() == WebhookCounts(sent=1)


def test_sign_webhook_matches_reference() -> None:
    ts = 1_700_000_123
    ours = sign_webhook(SECRET, "msg_1", ts, b'{"a":1}')
    ref = Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(ts, tz=UTC), '{"a":1}')
    assert ours == ref
    # the prefix is optional, as in the spec
    assert sign_webhook(SECRET.removeprefix("whsec_"), "msg_1", ts, b'{"a":1}') == ref


def test_bad_secret_is_rejected_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="target 0") as exc:
        WebhookOutput([target(secret="whsec_!!not-base64!!")], on_dead_letter=DeadLetters())
    assert "not-base64" not in str(exc.value)


# --- retries ----------------------------------------------------------------------


def test_same_webhook_id_and_valid_signature_on_every_retry() -> None:
    rec = Recorder(lambda req, n: httpx.Response(503 if n <= 2 else 200))
    sink, dl, ft = make_sink(rec, rng=MaxRandom())
    deliver(sink, [make_alert(7)])

    assert len(rec.requests) == 3
    assert {r.headers["webhook-id"] for r in rec.requests} == {"a7"}
    assert len({r.content for r in rec.requests}) == 1
    for r in rec.requests:
        Webhook(SECRET).verify(r.content, dict(r.headers))
    assert ft.sleeps == [0.5, 1.0]  # full jitter at its cap: base * 2**(n-1)
    assert dl.items == []
    assert sink.total() == WebhookCounts(sent=1, retried=2)


def test_full_jitter_stays_within_exponential_cap() -> None:
    rec = Recorder(lambda req, n: httpx.Response(500))
    policy = RetryPolicy(max_attempts=8, base_backoff_s=0.5, max_backoff_s=4.0, budget_s=1e9)
    sink, dl, ft = make_sink(rec, retry=policy, rng=random.Random(42))
    deliver(sink, [make_alert()])

    assert len(ft.sleeps) == 7
    caps = [min(4.0, 0.5 * 2**i) for i in range(7)]
    assert all(0.0 <= s <= c for s, c in zip(ft.sleeps, caps, strict=True))
    assert ft.sleeps != caps  # really jittered
    assert dl.items == [
        {"id": "a1", "target": URL, "reason": "retries_exhausted", "last_status": 500,
         "attempts": 8, "error": "HTTP 500"}
    ]


@pytest.mark.parametrize(
    ("retry_after", "low", "high"),
    [
        ("7", 7.0, 7.0),
        ("3600", 60.0, 60.0),  # capped at max_retry_after_s
        ("http-date+30s", 27.0, 30.0),
    ],
)
def test_429_retry_after_is_honoured(retry_after: str, low: float, high: float) -> None:
    if retry_after == "http-date+30s":
        # Made when the test runs, not at collection (which may be long before).
        retry_after = format_datetime(datetime.now(tz=UTC) + timedelta(seconds=30), usegmt=True)

    def answer(req: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            return httpx.Response(429, headers={"Retry-After": retry_after})
        return httpx.Response(202)

    rec = Recorder(answer)
    sink, dl, ft = make_sink(rec, retry=RetryPolicy(max_retry_after_s=60.0))
    deliver(sink, [make_alert()])
    assert len(ft.sleeps) == 1
    assert low <= ft.sleeps[0] <= high
    assert len(rec.requests) == 2
    assert dl.items == []
    assert sink.total() == WebhookCounts(sent=1, retried=1)


def test_400_is_not_retried_and_is_dead_lettered() -> None:
    rec = Recorder(lambda req, n: httpx.Response(400))
    sink, dl, ft = make_sink(rec)
    deliver(sink, [make_alert()])
    assert len(rec.requests) == 1
    assert ft.sleeps == []
    assert dl.items == [
        {"id": "a1", "target": URL, "reason": "rejected", "last_status": 400,
         "attempts": 1, "error": "HTTP 400"}
    ]
    assert sink.stats() == {URL: WebhookCounts(failed=1)}


def test_retry_budget_dead_letters_with_last_status() -> None:
    rec = Recorder(lambda req, n: httpx.Response(503))
    policy = RetryPolicy(max_attempts=100, base_backoff_s=1.0, max_backoff_s=1.0, budget_s=3.5)
    sink, dl, ft = make_sink(rec, retry=policy, rng=MaxRandom())
    deliver(sink, [make_alert()])
    assert ft.sleeps == [1.0, 1.0, 1.0]
    assert dl.items[0]["reason"] == "retry_budget_exhausted"
    assert dl.items[0]["last_status"] == 503
    assert dl.items[0]["attempts"] == 4


def test_timeouts_are_retried() -> None:
    def answer(req: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            raise httpx.ReadTimeout("slow", request=req)
        return httpx.Response(200)

    rec = Recorder(answer)
    sink, dl, _ = make_sink(rec)
    deliver(sink, [make_alert()])
    assert len(rec.requests) == 2
    assert dl.items == []
    assert sink.total() == WebhookCounts(sent=1, retried=1)


# --- real HTTP --------------------------------------------------------------------


class _FlakyReceiver(BaseHTTPRequestHandler):
    """Verifies signatures; fails each webhook-id 3 times with 500, then accepts it."""

    lock = threading.Lock()
    attempts: Counter[str] = Counter()
    accepted: Counter[str] = Counter()
    bad_signatures = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        headers = {k: v for k, v in self.headers.items()}
        cls = type(self)
        try:
            Webhook(SECRET).verify(body, headers)
        except WebhookVerificationError:
            with cls.lock:
                cls.bad_signatures += 1
            self.send_response(401)
            self.end_headers()
            return
        msg_id = headers["webhook-id"]
        with cls.lock:
            cls.attempts[msg_id] += 1
            ok = cls.attempts[msg_id] > 3
            if ok:
                cls.accepted[msg_id] += 1  # > 1 would be a duplicate delivery
        self.send_response(200 if ok else 500)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def flaky_receiver() -> Iterator[str]:
    _FlakyReceiver.attempts = Counter()
    _FlakyReceiver.accepted = Counter()
    _FlakyReceiver.bad_signatures = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def test_real_receiver_failing_three_times_gets_each_alert_exactly_once(
    flaky_receiver: str,
) -> None:
    ft = FakeTime()
    dl = DeadLetters()
    sink = WebhookOutput(  # default client factory: a real httpx.Client per partition
        [target(flaky_receiver, secret=SECRET)],
        on_dead_letter=dl,
        timeout_s=5.0,
        sleep=ft.sleep,
        clock=ft.clock,
    )
    alerts = [make_alert(i) for i in range(5)]
    deliver(sink, alerts)

    assert _FlakyReceiver.bad_signatures == 0
    assert set(_FlakyReceiver.accepted) == {a.id for a in alerts}
    assert all(n == 1 for n in _FlakyReceiver.accepted.values())
    assert all(n == 4 for n in _FlakyReceiver.attempts.values())
    assert dl.items == []
    assert sink.total() == WebhookCounts(sent=5, retried=15)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_receiver_down_all_run_leaves_every_alert_in_dead_letter_file(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/hook"
    dlq = JsonlDeadLetterFile(tmp_path / "dlq" / "alerts.jsonl")
    ft = FakeTime()
    sink = WebhookOutput(
        [target(url, secret=SECRET)],
        on_dead_letter=dlq,
        retry=RetryPolicy(max_attempts=3),
        timeout_s=2.0,
        sleep=ft.sleep,
        clock=ft.clock,
    )
    alerts = [make_alert(i) for i in range(4)]
    deliver(sink, alerts)

    rows = dlq.read()
    assert sorted(r["cloudevent"]["id"] for r in rows) == [a.id for a in alerts]
    for r in rows:
        assert r["target"] == url
        assert r["reason"] == "retries_exhausted"
        assert r["last_status"] is None
        assert r["attempts"] == 3
        assert r["error"] == "ConnectError"
        assert r["cloudevent"]["specversion"] == "1.0"
    # raw file is JSON Lines
    lines = (tmp_path / "dlq" / "alerts.jsonl").read_bytes().splitlines()
    assert len(lines) == 4
    assert json_loads(lines[0])["cloudevent"]["data"]["n"] == 5
    assert sink.total() == WebhookCounts(retried=8, failed=4)


# --- queueing ---------------------------------------------------------------------


def test_queue_full_spills_to_dead_letters_and_never_blocks() -> None:
    entered = threading.Event()
    release = threading.Event()

    def answer(req: httpx.Request, n: int) -> httpx.Response:
        entered.set()
        release.wait(10)
        return httpx.Response(200)

    rec = Recorder(answer)
    sink, dl, _ = make_sink(rec, queue_size=2)
    part = sink.build("webhooks", 0, 1)
    try:
        part.write_batch([make_alert(0)])
        assert entered.wait(5)  # the sender thread holds a0 in flight
        t0 = time.monotonic()
        part.write_batch([make_alert(i) for i in range(1, 6)])
        assert time.monotonic() - t0 < 0.5  # did not block
        assert [d["id"] for d in dl.items] == ["a3", "a4", "a5"]
        assert {d["reason"] for d in dl.items} == {"queue_full"}
        assert {d["attempts"] for d in dl.items} == {0}
    finally:
        release.set()
        part.close()
    assert sorted(r.headers["webhook-id"] for r in rec.requests) == ["a0", "a1", "a2"]
    assert sink.total() == WebhookCounts(sent=3, spilled=3)


def test_close_drain_timeout_dead_letters_the_rest() -> None:
    rec = Recorder(lambda req, n: httpx.Response(500))
    policy = RetryPolicy(base_backoff_s=10.0, max_backoff_s=10.0)
    # default (interruptible) sleep: close() must not wait out the 10 s backoff
    sink = WebhookOutput(
        [target(secret=SECRET)],
        on_dead_letter=(dl := DeadLetters()),
        retry=policy,
        rng=MaxRandom(),
        client=rec.factory,
        drain_timeout_s=0.2,
    )
    part = sink.build("webhooks", 0, 1)
    part.write_batch([make_alert(i) for i in range(3)])
    t0 = time.monotonic()
    part.close()
    assert time.monotonic() - t0 < 3.0
    by_id = {d["id"]: d for d in dl.items}
    assert set(by_id) == {"a0", "a1", "a2"}
    assert {d["reason"] for d in dl.items} == {"shutdown"}
    assert by_id["a0"]["last_status"] == 500
    assert by_id["a0"]["attempts"] == 1
    assert sink.total() == WebhookCounts(retried=1, failed=3)


# --- routing and bodies -----------------------------------------------------------


def test_per_target_type_filters() -> None:
    rec = Recorder()
    only_step = "https://a.example/step"
    everything = "https://b.example/all"
    sink, dl, _ = make_sink(
        rec,
        targets=[
            target(only_step, secret=SECRET, types=[STEP]),
            target(everything, secret=SECRET),
            target("https://c.example/none", secret=SECRET, types=["touchstream.nothing"]),
        ],
    )
    deliver(sink, [make_alert(1), make_alert(2, "touchstream.calls.missed")])
    got: dict[str, list[str]] = {}
    for r in rec.requests:
        got.setdefault(str(r.url), []).append(r.headers["webhook-id"])
    assert got == {only_step: ["a1"], everything: ["a1", "a2"]}
    assert set(sink.stats()) == {only_step, everything}
    assert dl.items == []


def test_pagerduty_body() -> None:
    rec = Recorder(lambda req, n: httpx.Response(202))
    routing_key = "R0123456789abcdef0123456789abcd"
    sink, dl, _ = make_sink(
        rec,
        targets=[target("https://events.pagerduty.com/v2/enqueue", secret=routing_key,
                        body="pagerduty")],
    )
    alert = Alert(
        id="a1", type=STEP, source="/touchstream/rules/step-friction",
        time_ms=1_700_000_000_000, subject="remote_cam/door_sensor",
        data={"n": 5, "severity": "critical", "summary": "door sensor step friction"},
    )
    deliver(sink, [alert])
    req = rec.requests[0]
    assert req.headers["content-type"] == "application/json"
    assert req.headers["webhook-id"] == "a1"
    assert "webhook-signature" not in req.headers  # the secret is the routing key here
    body = json_loads(req.content)
    assert body == {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": "a1",
        "payload": {
            "summary": "door sensor step friction",
            "source": "/touchstream/rules/step-friction",
            "severity": "critical",
            "timestamp": "2023-11-14T22:13:20.000Z",
            "component": "remote_cam/door_sensor",
            "class": STEP,
            "custom_details": alert.data,
        },
    }
    assert dl.items == []


def test_pagerduty_default_severity_and_needs_routing_key() -> None:
    rec = Recorder(lambda req, n: httpx.Response(202))
    sink, _, _ = make_sink(
        rec, targets=[target("https://pd.example/v2/enqueue", secret="RK1", body="pagerduty")]
    )
    deliver(sink, [make_alert()])
    payload = json_loads(rec.requests[0].content)["payload"]
    assert payload["severity"] == "warning"
    assert payload["summary"] == f"{STEP} on remote_cam/door_sensor"
    with pytest.raises(ValueError, match="routing key"):
        WebhookOutput([target(body="pagerduty")], on_dead_letter=DeadLetters())
    with pytest.raises(ValueError, match="routing key"):
        WebhookOutput([target(body="pagerduty", secret=SECRET)], on_dead_letter=DeadLetters())


def test_slack_body_is_signed_text() -> None:
    rec = Recorder()
    sink, dl, _ = make_sink(rec, targets=[target(secret=SECRET, body="slack")])
    deliver(sink, [make_alert()])
    req = rec.requests[0]
    assert req.headers["content-type"] == "application/json"
    body = Webhook(SECRET).verify(req.content, dict(req.headers))
    assert set(body) == {"text"}
    assert STEP in body["text"]
    assert "remote_cam/door_sensor" in body["text"]
    assert "a1" in body["text"]
    assert dl.items == []


def test_unsigned_target_has_no_signature_headers() -> None:
    rec = Recorder()
    sink, _, _ = make_sink(rec, targets=[target()])
    deliver(sink, [make_alert()])
    req = rec.requests[0]
    assert req.headers["webhook-id"] == "a1"
    assert "webhook-signature" not in req.headers


# --- hygiene ----------------------------------------------------------------------


def test_logs_hold_no_secret_signature_or_url_path(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="connectors.webhook")
    rec = Recorder(lambda req, n: httpx.Response(500 if n <= 2 else 400))
    sink, dl, _ = make_sink(rec, queue_size=1)
    part = sink.build("webhooks", 0, 1)
    part.write_batch([make_alert(i) for i in range(3)])
    part.close()
    assert dl.items  # something was logged as dead-lettered / retried
    text = caplog.text
    assert "retry" in text
    assert "dead-lettered" in text
    assert SECRET not in text
    assert SECRET.removeprefix("whsec_") not in text
    assert "T0SECRETPATH" not in text
    for r in rec.requests:
        sig = r.headers["webhook-signature"].split(",", 1)[1]
        assert sig not in text
    assert "https://oncall.example/…" in text


def test_dead_letter_handler_failure_does_not_kill_the_sender() -> None:
    calls: list[str] = []

    def broken(alert: Alert, target_url: str, reason: str, last_status: int | None,
               *, attempts: int = 0, error: str | None = None) -> None:
        calls.append(alert.id)
        raise OSError("disk full")

    rec = Recorder(lambda req, n: httpx.Response(400 if req.headers["webhook-id"] == "a1"
                                                 else 200))
    sink, _, _ = make_sink(rec, dlq=broken)
    deliver(sink, [make_alert(1), make_alert(2)])
    assert calls == ["a1"]
    assert sink.total() == WebhookCounts(sent=1, failed=1)


# --- Bytewax ----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_bytewax_dataflow_delivers_every_alert(workers: int) -> None:
    senders: set[str] = set()
    lock = threading.Lock()

    def answer(req: httpx.Request, n: int) -> httpx.Response:
        with lock:
            senders.add(threading.current_thread().name)
        return httpx.Response(200)

    rec = Recorder(answer)
    builds: list[int] = []

    def factory() -> httpx.Client:
        with lock:
            builds.append(1)
        return rec.factory()

    dl = DeadLetters()
    sink = WebhookOutput([target(secret=SECRET)], on_dead_letter=dl, client=factory)
    alerts = [make_alert(i) for i in range(40)]
    flow = Dataflow("webhook_test")
    s = op.input("in", flow, TestingSource(alerts))
    s = op.redistribute("spread", s)
    op.output("out", s, sink)
    if workers == 1:
        run_main(flow)  # type: ignore[no-untyped-call]
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=2)  # type: ignore[no-untyped-call]

    ids = [r.headers["webhook-id"] for r in rec.requests]
    assert sorted(ids) == sorted(a.id for a in alerts)
    assert len(builds) == workers
    assert len(senders) == workers  # each worker's partition sent some of them
    for r in rec.requests:
        Webhook(SECRET).verify(r.content, dict(r.headers))
    assert dl.items == []
    assert sink.total() == WebhookCounts(sent=40)


@pytest.mark.parametrize("outbox", [False, True])
def test_bytewax_recovery_replay_is_sent_once_only_with_an_outbox(
    outbox: bool, tmp_path: Path
) -> None:
    """Bytewax resumes from the last snapshot and replays what came after it.

    A 10 s epoch never closes before the abort, so the resumed run emits a0..a4 again.
    Without an outbox they are POSTed a second time (receivers must dedup by
    webhook-id); with one, the journal knows them and each id is sent once.
    """
    rec = Recorder()
    (tmp_path / "rec").mkdir()
    init_db_dir(tmp_path / "rec", 1)  # type: ignore[no-untyped-call]
    items: list[Any] = [make_alert(i) for i in range(5)]
    items += [TestingSource.ABORT(), *(make_alert(i) for i in range(5, 10))]
    source = TestingSource(items)
    dl = DeadLetters()
    for _run in range(2):
        sink = WebhookOutput([target(secret=SECRET)], on_dead_letter=dl, client=rec.factory,
                             outbox_dir=tmp_path / "outbox" if outbox else None)
        flow = Dataflow("webhook_recovery")
        op.output("out", op.input("in", flow, source), sink)
        run_main(flow, epoch_interval=timedelta(seconds=10),  # type: ignore[no-untyped-call]
                 recovery_config=RecoveryConfig(tmp_path / "rec"))  # type: ignore[no-untyped-call]
        if _run == 0:
            assert sorted(r.headers["webhook-id"] for r in rec.requests) == [
                f"a{i}" for i in range(5)]
    sent = Counter(r.headers["webhook-id"] for r in rec.requests)
    assert set(sent) == {f"a{i}" for i in range(10)}
    repeated = {i for i, n in sent.items() if n > 1}
    assert repeated == (set() if outbox else {f"a{i}" for i in range(5)})
    if outbox:
        assert sink.total() == WebhookCounts(sent=5, duplicates=5)
    assert dl.items == []
