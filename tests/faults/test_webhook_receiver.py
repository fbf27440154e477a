"""Fault: the webhook receiver is down for a while, then slow (5 s per request), then up.

The real experience dataflow (:func:`flows.experience.build_flow`, live mode, under
Bytewax ``run_main``) runs with the durable webhook outbox and a real local HTTP
receiver that verifies every Standard Webhooks signature. The test switches the
receiver through four phases, feeding a wave of customers who get stuck on a step
(each gives one help push and one ``touchstream.dwell.customer`` alert) in each:

1. ``refused``: the port is bound but not listening (connection refused);
2. ``503``: it listens but answers 503 (a proxy in front of a dead backend);
3. ``slow``: every request takes 5 s, then succeeds;
4. ``up``: it answers at once.

The retry policy gives up after 4 attempts / 2 s, so the alerts of phases 1-2 end in
the dead-letter file (with reason, attempts and last status) and the rest arrive.
Asserted: every alert id arrives at most once; every alert the flow emitted was either
received or dead-lettered (none lost, none both); and pushes do not wait for webhooks:
the pushes of the slow phase reach the push sink while the webhook sender is stuck in a
5 s request, before their own alerts are delivered.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import run_main
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook

from connectors.webhook import JsonlDeadLetterFile, RetryPolicy, WebhookOutput
from flows.codec import json_dumps
from flows.experience import Outputs, build_flow
from flows.model import Alert, Push, RawRecord
from flows.rules import RuleSet, parse_rules
from flows.settings import WebhookTarget, load_settings
from state.profiles import InMemoryProfileStore

pytestmark = pytest.mark.integration

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a test secret, as in the e2e test
SLOW_S = 5.0
POLICY = RetryPolicy(max_attempts=4, base_backoff_s=0.1, max_backoff_s=0.4, budget_s=2.0)
WAIT_S = 30.0  # generous bound on each phase's wait (a failure, not a speed check)


# --- the receiver -------------------------------------------------------------------------


class PhasedReceiver:
    """A webhook receiver whose behaviour the test switches: refused, 503, slow, up."""

    def __init__(self) -> None:
        self.phase = "refused"
        self.lock = threading.Lock()
        self.deliveries: Counter[str] = Counter()  # accepted (2xx), per webhook-id
        self.received_at: dict[str, float] = {}  # monotonic time of the first 2xx
        self.requests: Counter[str] = Counter()  # every request that got in, per phase
        self.in_flight = 0
        self.bad_signatures = 0
        verifier = Webhook(SECRET)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.lock:
                    phase = receiver.phase
                    receiver.requests[phase] += 1
                    receiver.in_flight += 1
                try:
                    if phase == "503":
                        self.send_response(503)
                        self.end_headers()
                        return
                    if phase == "slow":
                        time.sleep(SLOW_S)
                    try:
                        verifier.verify(body, dict(self.headers.items()))
                    except Exception:
                        with receiver.lock:
                            receiver.bad_signatures += 1
                        self.send_response(401)
                        self.end_headers()
                        return
                    wid = self.headers["webhook-id"]
                    assert json.loads(body)["id"] == wid
                    with receiver.lock:
                        receiver.deliveries[wid] += 1
                        receiver.received_at.setdefault(wid, time.monotonic())
                    self.send_response(204)
                    self.end_headers()
                finally:
                    with receiver.lock:
                        receiver.in_flight -= 1

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.server_bind()  # the port is ours, but nothing listens: refused
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/touchstream"
        self._serving: threading.Thread | None = None

    def set_phase(self, phase: str) -> None:
        """Switch behaviour; the first phase after ``refused`` starts listening."""
        if phase != "refused" and self._serving is None:
            self.server.server_activate()
            self._serving = threading.Thread(target=self.server.serve_forever, daemon=True)
            self._serving.start()
        with self.lock:
            self.phase = phase

    def state(self) -> tuple[str, int, frozenset[str]]:
        """(phase, requests in flight, ids received so far)."""
        with self.lock:
            return self.phase, self.in_flight, frozenset(self.deliveries)

    def close(self) -> None:
        """Stop serving and free the port."""
        if self._serving is not None:
            self.server.shutdown()
        self.server.server_close()


# --- the flow's input and outputs ---------------------------------------------------------


class _FeedPart(StatefulSourcePartition[RawRecord, None]):
    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.pos = 0

    def next_batch(self) -> list[RawRecord]:
        out: list[RawRecord] = []
        while True:
            try:
                doc = self.feed.q.get_nowait()
            except queue.Empty:
                break
            self.pos += 1
            doc = {**doc, "ts": time.time_ns() // 1_000_000}
            out.append(RawRecord("fault-test", self.pos, json_dumps(doc)))
        if not out and self.feed.closed.is_set():
            raise StopIteration
        return out

    def next_awake(self) -> datetime | None:
        return None if not self.feed.q.empty() else datetime.now(UTC) + timedelta(
            milliseconds=20)

    def snapshot(self) -> None:
        return None


class Feed(FixedPartitionedSource[RawRecord, None]):
    """Live input the test feeds while the flow runs; ends when closed."""

    def __init__(self) -> None:
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        self.closed = threading.Event()

    def list_parts(self) -> list[str]:
        return ["feed"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _FeedPart:
        return _FeedPart(self)


@dataclass(frozen=True)
class Seen:
    """One output item and the world when it reached its sink."""

    at: float  # monotonic
    wall_ms: float
    item: Any
    phase: str
    in_flight: int
    received: frozenset[str]
    webhook_backlog: int


class _Rec(StatelessSinkPartition[Any]):
    def __init__(self, rec: Recording) -> None:
        self.rec = rec

    def write_batch(self, items: list[Any]) -> None:
        now, wall = time.monotonic(), time.time_ns() / 1e6
        phase, in_flight, received = self.rec.receiver.state()
        backlog = self.rec.backlog()
        with self.rec.lock:
            self.rec.got.extend(Seen(now, wall, x, phase, in_flight, received, backlog)
                                for x in items)


class Recording(DynamicSink[Any]):
    """Keeps each item with the receiver's state when it arrived."""

    def __init__(self, receiver: PhasedReceiver, backlog: Callable[[], int]) -> None:
        self.receiver = receiver
        self.backlog = backlog
        self.got: list[Seen] = []
        self.lock = threading.Lock()

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Rec:
        return _Rec(self)

    def items(self) -> list[Seen]:
        with self.lock:
            return list(self.got)


def stuck_rules() -> RuleSet:
    """The default rules, with help-sprite firing after 1 s on a step."""
    doc = yaml.safe_load(resources.files("flows").joinpath("default_rules.yaml").read_text())
    for r in doc["rules"]:
        if r["id"] == "help-sprite":
            r["trigger"]["dwell"] = "1s"
    return parse_rules(doc, "fault-test")


def stuck(cid: str) -> dict[str, Any]:
    """A customer entering the door-sensor step (and staying there)."""
    return {"type": "click", "customer_id": cid, "terminal_id": f"T{cid[-4:]}",
            "hall_id": "H1", "action": "step_enter", "module": "remote_cam",
            "step": "door_sensor"}


def wait(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- the test ---------------------------------------------------------------------------


def test_receiver_down_then_slow_then_up(tmp_path: Path) -> None:
    receiver = PhasedReceiver()
    dlq = JsonlDeadLetterFile(tmp_path / "alerts-dlq.jsonl")
    outbox = tmp_path / "outbox"
    sink = WebhookOutput(
        [WebhookTarget(url=receiver.url, secret=SecretStr(SECRET))],
        on_dead_letter=dlq, retry=POLICY, timeout_s=2 * SLOW_S, queue_size=2,
        outbox_dir=outbox,
    )
    pushes = Recording(receiver, sink.outbox_pending)
    alerts = Recording(receiver, sink.outbox_pending)
    bad_input = Recording(receiver, sink.outbox_pending)
    feed = Feed()
    settings = load_settings(mode="live", engine={"stats_interval_s": 0.5})
    flow = build_flow(settings, source=feed,
                      outputs=Outputs(pushes=[pushes], alerts=[sink, alerts],
                                      dead_letters=[bad_input]),
                      rules=stuck_rules(), profiles=InMemoryProfileStore())

    waves: dict[str, list[str]] = {}
    n = iter(range(1, 1000))

    def send_wave(name: str, size: int) -> list[str]:
        cids = [f"1380000{next(n):04d}" for _ in range(size)]
        waves[name] = cids
        for cid in cids:
            feed.q.put(stuck(cid))
        return cids

    def pushed(cids: list[str]) -> bool:
        have = {s.item.customer_id for s in pushes.items()}
        return all(c in have for c in cids)

    def dead_lettered(cids: list[str]) -> bool:
        have = {d["cloudevent"]["subject"] for d in dlq.read()}
        return all(c in have for c in cids)

    def received(cids: list[str]) -> bool:
        by_subject = {s.item.subject: s.item.id for s in alerts.items()}
        got = receiver.state()[2]
        return all(c in by_subject and by_subject[c] in got for c in cids)

    failure: list[BaseException] = []
    t0 = time.monotonic()
    phase_started: dict[str, float] = {}

    def phase(name: str) -> None:
        receiver.set_phase(name)
        phase_started[name] = time.monotonic() - t0

    def control() -> None:
        try:
            phase("refused")
            a = send_wave("refused", 3)
            wait(lambda: pushed(a) and dead_lettered(a), "wave 'refused'")
            phase("503")
            b = send_wave("503", 3)
            wait(lambda: pushed(b) and dead_lettered(b), "wave '503'")
            phase("slow")
            send_wave("slow-first", 1)
            wait(lambda: receiver.state()[1] >= 1, "the first slow request")
            # the webhook sender is now stuck for 5 s: customers keep getting stuck
            c = send_wave("slow", 4)
            wait(lambda: pushed(c), "the slow phase's pushes")
            wait(lambda: receiver.requests["slow"] >= 2, "a second slow request")
            phase("up")
            d = send_wave("up", 2)
            every = [cid for w in waves.values() for cid in w]
            wait(lambda: pushed(d) and received(waves["slow-first"] + c + d)
                 and len(alerts.items()) == len(every), "all alerts")
        except BaseException as exc:
            failure.append(exc)
        finally:
            feed.closed.set()

    controller = threading.Thread(target=control, name="fault-controller", daemon=True)
    controller.start()
    try:
        run_main(flow)  # type: ignore[no-untyped-call]
    finally:
        feed.closed.set()
        controller.join(WAIT_S)
        receiver.close()
    elapsed = time.monotonic() - t0
    if failure:
        raise failure[0]

    # --- every alert once at most; none lost ---------------------------------------
    emitted = [s.item for s in alerts.items()]
    assert all(isinstance(a, Alert) for a in emitted)
    everyone = [cid for w in waves.values() for cid in w]
    assert sorted(a.subject for a in emitted) == sorted(everyone)  # one alert each
    emitted_ids = {a.id for a in emitted}
    assert len(emitted_ids) == len(emitted)
    deliveries = dict(receiver.deliveries)
    dead = dlq.read()
    dead_ids = Counter(d["cloudevent"]["id"] for d in dead)
    repeated = {i: k for i, k in deliveries.items() if k > 1}
    assert repeated == {}
    assert max(dead_ids.values()) == 1
    assert set(deliveries).isdisjoint(dead_ids)
    assert set(deliveries) | set(dead_ids) == emitted_ids  # none lost
    assert receiver.bad_signatures == 0

    # --- the dead-letter path holds exactly what exceeded the retry budget ---------
    subject_of = {a.id: a.subject for a in emitted}
    by_phase = {name: {d["cloudevent"]["subject"] for d in dead
                       if subject_of[d["cloudevent"]["id"]] in cids}
                for name, cids in waves.items()}
    assert by_phase["refused"] == set(waves["refused"])
    assert by_phase["503"] == set(waves["503"])
    assert all(not by_phase[w] for w in ("slow-first", "slow", "up"))
    for d in dead:
        assert d["reason"] in {"retries_exhausted", "retry_budget_exhausted"}
        assert d["target"] == receiver.url
        assert 1 <= d["attempts"] <= POLICY.max_attempts
        if d["cloudevent"]["subject"] in waves["refused"]:
            assert (d["last_status"], d["error"]) == (None, "ConnectError")
        else:
            assert (d["last_status"], d["error"]) == (503, "HTTP 503")

    # --- pushes do not wait for webhooks -------------------------------------------
    assert bad_input.items() == []
    push_seen = {s.item.customer_id: s for s in pushes.items()}
    assert all(isinstance(s.item, Push) for s in push_seen.values())
    assert sorted(push_seen) == sorted(everyone)  # one help push per stuck customer
    alert_of = {a.subject: a.id for a in emitted}
    for cid in waves["slow"]:
        s = push_seen[cid]
        # out while the sender sat in a 5 s request, its own alert still undelivered
        assert s.phase == "slow" and s.in_flight >= 1, s
        assert s.webhook_backlog >= 1  # the outbox held undelivered alerts meanwhile
        assert alert_of[cid] not in s.received
        assert s.at < receiver.received_at[alert_of[cid]]
    for name in ("refused", "503"):
        assert {push_seen[c].phase for c in waves[name]} == {name}

    # --- nothing left in the outbox for the next start ----------------------------
    again = WebhookOutput([WebhookTarget(url=receiver.url, secret=SecretStr(SECRET))],
                          on_dead_letter=dlq, outbox_dir=outbox)
    part = again.build("check", 0, 1)
    assert again.outbox_pending() == 0
    part.close()

    total = sink.total()
    assert total.sent == len(deliveries) and total.failed == len(dead_ids)
    assert total.spilled == 0
    # how long after its dwell deadline (event_ts) each push reached the sink: a figure
    max_delay_ms = {name: round(max(push_seen[c].wall_ms - push_seen[c].item.event_ts
                                    for c in cids), 1) for name, cids in waves.items()}
    print(
        f"\nwebhook receiver fault: {len(emitted)} alerts sent by the flow, "
        f"{len(deliveries)} received, {len(dead_ids)} dead-lettered, "
        f"{sum(k - 1 for k in deliveries.values())} repeated, "
        f"{len(emitted_ids - set(deliveries) - set(dead_ids))} lost; "
        f"{len(push_seen)} pushes; requests per phase {dict(receiver.requests)}; "
        f"retries {total.retried}; phases started at "
        f"{ {k: round(v, 1) for k, v in phase_started.items()} } s; "
        f"push delay after the dwell deadline, max per wave (ms) {max_delay_ms}; "
        f"{elapsed:.1f} s"
    )

