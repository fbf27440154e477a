"""Tests for the durable webhook outbox (connectors/webhook.py, ``outbox_dir``).

Restart re-sends undelivered entries with the same webhook-id; replays of alerts the
outbox already holds are not sent again; a torn journal tail is tolerated; compaction
keeps pending entries and dedup; a SIGKILLed process loses nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from connectors import webhook as wh
from connectors.webhook import RetryPolicy, WebhookCounts, WebhookOutput
from flows import metrics
from flows.model import Alert
from tests.connectors.test_webhook import (
    SECRET,
    URL,
    DeadLetters,
    MaxRandom,
    Recorder,
    make_alert,
    target,
)

ROOT = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(max_attempts=2, base_backoff_s=0.0, max_backoff_s=0.0, budget_s=5.0)
# retries far apart: close() interrupts the backoff and leaves the entry pending
STUCK = RetryPolicy(max_attempts=6, base_backoff_s=30.0, max_backoff_s=30.0, budget_s=600.0)


def ok(req: httpx.Request, n: int) -> httpx.Response:
    return httpx.Response(200)


def unavailable(req: httpx.Request, n: int) -> httpx.Response:
    return httpx.Response(503)


def outbox_sink(
    box: Path, rec: Recorder, dl: DeadLetters | None = None, **kw: Any
) -> tuple[WebhookOutput, DeadLetters]:
    dl = dl if dl is not None else DeadLetters()
    kw.setdefault("retry", FAST)
    kw.setdefault("targets", [target(secret=SECRET)])
    sink = WebhookOutput(on_dead_letter=dl, client=rec.factory, outbox_dir=box, **kw)
    return sink, dl


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def ids(rec: Recorder) -> list[str]:
    return [r.headers["webhook-id"] for r in rec.requests]


def records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_bytes().splitlines():
        doc = wh._unframe(line)
        assert doc is not None, "every line the outbox writes is intact"
        out.append(doc)
    return out


def leave_pending(box: Path, alerts: list[Alert]) -> Recorder:
    """A run whose receiver answers 503: close() leaves every alert in the journal."""
    rec = Recorder(unavailable)
    sink, dl = outbox_sink(box, rec, retry=STUCK, rng=MaxRandom(), drain_timeout_s=0.2)
    part = sink.build("webhooks", 0, 1)
    part.write_batch(alerts)
    wait_for(lambda: len(rec.requests) >= 1)  # the sender is now in its 30 s backoff
    assert sink.outbox_pending() == len(alerts)
    part.close()
    assert dl.items == []  # not dead-lettered as "shutdown": kept for the next start
    assert sink.total().failed == 0
    assert sink.outbox_pending() == 0  # closed partitions are not counted
    return rec


# --- durability ---------------------------------------------------------------------


def test_write_batch_journals_and_fsyncs_once_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def held(req: httpx.Request, n: int) -> httpx.Response:
        release.wait(10)
        return httpx.Response(200)

    rec = Recorder(held)
    sink, _ = outbox_sink(tmp_path / "box", rec)
    part = sink.build("webhooks", 0, 1)
    fsyncs: list[int] = []
    real_fsync = os.fsync
    me = threading.get_ident()

    def counting_fsync(fd: int) -> None:
        if threading.get_ident() == me:
            fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    try:
        part.write_batch([make_alert(i) for i in range(10)])
        # when write_batch returns, all 10 entries are in the file, fsynced once
        entries = [r for r in records(tmp_path / "box" / "worker-0.log") if r["k"] == "e"]
        assert [e["a"]["id"] for e in entries] == [f"a{i}" for i in range(10)]
        assert len(fsyncs) == 1
        part.write_batch([make_alert(i) for i in range(10, 13)])
        assert len(fsyncs) == 2
    finally:
        release.set()
        part.close()
    assert ids(rec) == [f"a{i}" for i in range(13)]
    assert sink.total() == WebhookCounts(sent=13)


def test_restart_resends_undelivered_entries_with_the_same_webhook_id(tmp_path: Path) -> None:
    box = tmp_path / "box"
    alerts = [make_alert(1), make_alert(2)]
    first = leave_pending(box, alerts)
    assert ids(first) == ["a1"]  # a1 was tried once; a2 never left the journal

    gauge = metrics.WEBHOOK_OUTBOX_PENDING.labels("0")
    gate = threading.Event()
    rec = Recorder(lambda req, n: httpx.Response(200) if gate.wait(10) else httpx.Response(500))
    sink, dl = outbox_sink(box, rec)
    part = sink.build("webhooks", 0, 1)  # reads the journal: both are queued again
    assert gauge._value.get() == 2  # both pending until the receiver answers
    gate.set()
    wait_for(lambda: len(rec.requests) == 2)
    part.close()
    assert gauge._value.get() == 0
    assert ids(rec) == ["a1", "a2"]
    assert rec.requests[0].headers["webhook-id"] == first.requests[0].headers["webhook-id"]
    for req, alert in zip(rec.requests, alerts, strict=True):
        assert Webhook(SECRET).verify(req.content, dict(req.headers)) == alert.to_cloudevent()
    assert dl.items == []
    assert sink.total() == WebhookCounts(sent=2)
    # a third start has nothing to send
    rec3 = Recorder(ok)
    sink3, _ = outbox_sink(box, rec3)
    sink3.build("webhooks", 0, 1).close()
    assert rec3.requests == []


def test_replayed_alerts_already_done_or_pending_are_not_sent_again(tmp_path: Path) -> None:
    box = tmp_path / "box"
    rec = Recorder(lambda req, n: httpx.Response(400 if req.headers["webhook-id"] == "a3"
                                                 else 200))
    sink, dl = outbox_sink(box, rec)
    part = sink.build("webhooks", 0, 1)
    part.write_batch([make_alert(1), make_alert(2), make_alert(3)])
    wait_for(lambda: len(rec.requests) == 3)
    part.close()
    assert [d["id"] for d in dl.items] == ["a3"]  # rejected: dead-lettered, also "done"
    leave_pending(box, [make_alert(4)])  # a4 is pending in the journal

    # Restart, then Bytewax replays the epochs after the last snapshot: a1..a4 again.
    rec2 = Recorder(ok)
    sink2, dl2 = outbox_sink(box, rec2)
    part2 = sink2.build("webhooks", 0, 1)
    part2.write_batch([make_alert(i) for i in range(1, 6)])
    wait_for(lambda: len(rec2.requests) == 2)
    part2.close()
    assert ids(rec2) == ["a4", "a5"]  # a4 once (from the journal), a5 is new
    assert dl2.items == []  # a3 is not dead-lettered a second time
    assert sink2.total() == WebhookCounts(sent=2, duplicates=4)


def test_two_partitions_cannot_share_one_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wh, "_LOCK_WAIT_S", 0.1)
    sink, _ = outbox_sink(tmp_path / "box", Recorder(ok))
    part = sink.build("webhooks", 0, 1)
    try:
        with pytest.raises(RuntimeError, match="locked"):
            sink.build("webhooks", 0, 1)
        sink.build("webhooks", 1, 2).close()  # another worker index is fine
    finally:
        part.close()
    sink.build("webhooks", 0, 1).close()  # released by close()


# --- no spill, bounded memory -----------------------------------------------------------


def test_full_window_does_not_spill_to_dead_letters(tmp_path: Path) -> None:
    entered, release = threading.Event(), threading.Event()

    def gate(req: httpx.Request, n: int) -> httpx.Response:
        entered.set()
        release.wait(10)
        return httpx.Response(200)

    rec = Recorder(gate)
    sink, dl = outbox_sink(tmp_path / "box", rec, queue_size=2)
    part = sink.build("webhooks", 0, 1)
    try:
        part.write_batch([make_alert(0)])
        assert entered.wait(5)  # a0 in flight, the sender blocked
        part.write_batch([make_alert(i) for i in range(1, 12)])
        assert dl.items == []  # no queue_full: the journal holds them
        assert sink.outbox_pending() == 12
        outbox = sink._outboxes[0]
        cached = sum(1 for p in outbox.pending.values() if p.alert is not None)
        assert cached == 2  # only queue_size alerts decoded in memory
    finally:
        release.set()
        part.close()
    assert ids(rec) == [f"a{i}" for i in range(12)]  # journal order, from disk past 2
    assert sink.total() == WebhookCounts(sent=12)


# --- a damaged journal ------------------------------------------------------------------


def test_torn_tail_and_damaged_line_are_tolerated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = tmp_path / "box"
    leave_pending(box, [make_alert(i) for i in range(1, 5)])
    journal = box / "worker-0.log"
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == 4
    # a2's line is damaged in place (a bit flip), and a crash mid-write left half a line
    damaged = bytearray(lines[1])
    damaged[20] ^= 0x01
    torn = wh._frame({"k": "e", "t": "x", "a": wh._alert_doc(make_alert(9))})[:37]
    journal.write_bytes(lines[0] + bytes(damaged) + lines[2] + lines[3] + torn)

    caplog.set_level(logging.INFO, logger="connectors.webhook")
    rec = Recorder(ok)
    sink, dl = outbox_sink(box, rec)
    part = sink.build("webhooks", 0, 1)
    outbox = sink._outboxes[0]
    assert (outbox.torn, outbox.corrupt) == (1, 1)
    wait_for(lambda: len(rec.requests) == 3)
    part.write_batch([make_alert(5)])  # appended after the cut: a clean line
    wait_for(lambda: len(rec.requests) == 4)
    part.close()
    assert ids(rec) == ["a1", "a3", "a4", "a5"]
    assert dl.items == []
    # the torn bytes were cut off, so every line is intact again but the damaged one
    after = journal.read_bytes().splitlines()
    assert sum(1 for ln in after if wh._unframe(ln) is None) == 1
    assert journal.read_bytes().endswith(b"\n")
    text = caplog.text
    assert "torn" in text and "damaged" in text
    for secret in (SECRET, "T0SECRETPATH", "remote_cam/door_sensor"):
        assert secret not in text


# --- compaction ---------------------------------------------------------------------------


def test_compaction_in_the_sender_keeps_pending_entries_and_dedup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connectors.webhook")
    box = tmp_path / "box"
    entered, release = threading.Event(), threading.Event()

    def gate(req: httpx.Request, n: int) -> httpx.Response:
        if req.headers["webhook-id"] == "a0":
            entered.set()
            release.wait(10)
        return httpx.Response(200)

    rec = Recorder(gate)
    sink, dl = outbox_sink(box, rec, queue_size=2, outbox_max_bytes=2048)
    part = sink.build("webhooks", 0, 1)
    try:
        part.write_batch([make_alert(0)])
        assert entered.wait(5)
        for b in range(4):  # while a0 hangs, the journal outgrows 2 KiB
            part.write_batch([make_alert(i) for i in range(1 + 5 * b, 6 + 5 * b)])
        assert (box / "worker-0.log").stat().st_size > 2048
        outbox = sink._outboxes[0]
        assert outbox.compactions == 0  # never in write_batch
    finally:
        release.set()
    wait_for(lambda: len(rec.requests) == 21)
    part.close()
    assert outbox.compactions >= 2
    compacted = [r.getMessage() for r in caplog.records if "compacted" in r.getMessage()]
    # one of them while entries were pending: those were then read back at new offsets
    assert any(" 0 pending" not in m for m in compacted), compacted
    assert ids(rec) == [f"a{i}" for i in range(21)]
    assert dl.items == []
    assert (box / "worker-0.log").stat().st_size <= 2048
    done = [r for r in records(box / "worker-0.log") if r["k"] == "d"]
    assert len(done) == 21
    assert any("id" not in r for r in done)  # compacted: hash and time only

    rec2 = Recorder(ok)
    sink2, _ = outbox_sink(box, rec2)
    part2 = sink2.build("webhooks", 0, 1)
    part2.write_batch([make_alert(i) for i in range(21)])  # a full replay
    part2.close()
    assert rec2.requests == []
    assert sink2.total() == WebhookCounts(duplicates=21)


def test_compaction_copies_what_was_appended_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink, _ = outbox_sink(tmp_path / "box", Recorder(ok))
    tg = sink.targets[0]

    def open_outbox() -> wh._Outbox:
        return wh._Outbox(tmp_path / "box", 0, 1, sink.targets, max_bytes=1024, window=1,
                          done_keep=1000, done_ttl_s=3600.0)

    ob = open_outbox()
    ob.append([(tg, make_alert(i)) for i in range(10)])
    for _ in range(6):  # a0..a5 done
        item = ob.next_pending()
        assert item is not None
        ob.mark_done(item[0], "sent")
    real_pread = os.pread
    appended: list[int] = []

    def pread_then_append(fd: int, n: int, off: int) -> bytes:
        if not appended:  # between the snapshot and the final lock: a batch arrives
            appended.append(1)
            ob.append([(tg, make_alert(i)) for i in (10, 11)])
            item = ob.next_pending()
            assert item is not None and item[1].alert_id == "a6"
            ob.mark_done(item[0], "sent")
        return real_pread(fd, n, off)

    monkeypatch.setattr(os, "pread", pread_then_append)
    assert ob.size > 1024
    assert ob.maybe_compact()
    monkeypatch.setattr(os, "pread", real_pread)

    def drain(o: wh._Outbox) -> list[str]:
        out = []
        while (item := o.next_pending()) is not None:
            assert item[2] is not None
            out.append(item[2].id)
            o.mark_done(item[0], "sent")
        return out

    got_pending = [p.alert_id for p in ob.pending.values()]
    assert got_pending == ["a7", "a8", "a9", "a10", "a11"]
    ob.close()
    ob2 = open_outbox()  # what the compacted file says after a restart
    assert [p.alert_id for p in ob2.pending.values()] == got_pending
    assert drain(ob2) == got_pending  # every entry decodes at its new offset
    bad, dups = ob2.append([(tg, make_alert(i)) for i in range(12)])
    assert bad == [] and len(dups) == 12  # dedup held through the compaction
    ob2.close()


def test_done_ids_are_bounded_by_count_and_age(tmp_path: Path) -> None:
    box = tmp_path / "box"
    rec = Recorder(ok)
    sink, _ = outbox_sink(box, rec, outbox_done_keep=3)
    part = sink.build("webhooks", 0, 1)
    part.write_batch([make_alert(i) for i in range(6)])
    wait_for(lambda: len(rec.requests) == 6)
    part.close()
    # a done record for a9 from two days ago, first in the journal (records are in time
    # order), written as the outbox writes them
    two_days_ago = time.time_ns() // 1_000_000 - 2 * 86_400_000
    key = wh._pair_key(sink.targets[0].key, "a9")
    journal = box / "worker-0.log"
    old = wh._frame({"k": "d", "h": f"{key:016x}", "w": two_days_ago})
    journal.write_bytes(old + journal.read_bytes())

    rec2 = Recorder(ok)
    sink2, _ = outbox_sink(box, rec2, outbox_done_keep=3)
    part2 = sink2.build("webhooks", 0, 1)
    part2.write_batch([make_alert(i) for i in (0, 4, 5, 9)])
    wait_for(lambda: len(rec2.requests) == 2)
    part2.close()
    # a4, a5 are among the 3 most recent ids; a0 fell out of the count bound, a9 aged out
    assert ids(rec2) == ["a0", "a9"]


# --- configuration changes ---------------------------------------------------------------


def test_entry_for_a_removed_target_is_dead_lettered(tmp_path: Path) -> None:
    box = tmp_path / "box"
    leave_pending(box, [make_alert(1)])
    other = "https://other.example/hook"
    rec = Recorder(ok)
    sink, dl = outbox_sink(box, rec, targets=[target(other, secret=SECRET)])
    part = sink.build("webhooks", 0, 1)
    wait_for(lambda: len(dl.items) == 1)
    part.close()
    assert rec.requests == []
    (d,) = dl.items
    assert d["id"] == "a1" and d["reason"] == "target_removed"
    assert URL not in d["target"]  # the journal never held the URL


def test_journal_of_a_worker_that_no_longer_exists_is_adopted(tmp_path: Path) -> None:
    box = tmp_path / "box"
    rec = Recorder(unavailable)
    sink, _ = outbox_sink(box, rec, retry=STUCK, rng=MaxRandom(), drain_timeout_s=0.1)
    part1 = sink.build("webhooks", 1, 2)
    part1.write_batch([make_alert(7), make_alert(8)])
    wait_for(lambda: len(rec.requests) >= 1)
    part1.close()
    assert (box / "worker-1.log").exists()

    rec2 = Recorder(ok)
    sink2, _ = outbox_sink(box, rec2)
    part = sink2.build("webhooks", 0, 1)  # the cluster shrank to one worker
    wait_for(lambda: len(rec2.requests) == 2)
    part.close()
    assert ids(rec2) == ["a7", "a8"]
    assert not (box / "worker-1.log").exists()


# --- a real crash -----------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    import httpx
    from pydantic import SecretStr
    from connectors.webhook import JsonlDeadLetterFile, RetryPolicy, WebhookOutput
    from flows.model import Alert
    from flows.settings import WebhookTarget

    box, delivered_path, dlq, n_ok = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    delivered = open(delivered_path, "ab", buffering=0)
    lock = threading.Lock()
    served = [0]

    def say(msg):  # one write per line: two threads print
        with lock:
            sys.stdout.write(msg + "\\n")
            sys.stdout.flush()

    def handler(req):
        with lock:
            served[0] += 1
            n = served[0]
        if n > n_ok:
            say("hanging")
            time.sleep(3600)  # in flight when the process is killed
        delivered.write(req.headers["webhook-id"].encode() + b"\\n")  # accepted
        return httpx.Response(200)

    sink = WebhookOutput(
        [WebhookTarget(url=sys.argv[5], secret=SecretStr(sys.argv[6]))],
        on_dead_letter=JsonlDeadLetterFile(dlq), retry=RetryPolicy(max_attempts=1),
        client=lambda: httpx.Client(transport=httpx.MockTransport(handler)),
        outbox_dir=box,
    )
    part = sink.build("webhooks", 0, 1)
    for b in range(5):
        part.write_batch([Alert(id=f"a{i}", type="t", source="/s", time_ms=i, subject="x",
                                data={"i": i}) for i in range(4 * b, 4 * b + 4)])
        say(f"acked {4 * b + 4}")
    time.sleep(3600)
    """
)


def test_sigkill_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    box, delivered, dlq = tmp_path / "box", tmp_path / "delivered.txt", tmp_path / "dlq.jsonl"
    n_ok = 7
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(box), str(delivered), str(dlq), str(n_ok), URL,
         SECRET],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    watchdog = threading.Timer(60, proc.kill)  # readline() must not hang the suite
    watchdog.start()
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while not ("acked 20" in seen and "hanging" in seen):
            assert time.monotonic() < deadline, f"child stalled: {seen}"
            line = proc.stdout.readline()
            assert line, f"child exited early: {seen}"
            seen.append(line.strip())
        proc.send_signal(signal.SIGKILL)  # no close(), no atexit, nothing
        proc.wait(10)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    before = delivered.read_text().split()
    assert before == [f"a{i}" for i in range(n_ok)]

    rec = Recorder(ok)
    sink, dl = outbox_sink(box, rec)
    part = sink.build("webhooks", 0, 1)
    wait_for(lambda: len(rec.requests) == 20 - n_ok)
    # Bytewax replays the epochs after the last snapshot: the same alerts again
    part.write_batch([Alert(id=f"a{i}", type="t", source="/s", time_ms=i, subject="x",
                            data={"i": i}) for i in range(20)])
    part.close()
    after = ids(rec)
    assert after == [f"a{i}" for i in range(n_ok, 20)]  # a7 (in flight) included, once
    everything = Counter(before + after)
    assert set(everything) == {f"a{i}" for i in range(20)}  # nothing lost
    assert max(everything.values()) == 1  # nothing repeated
    assert not dlq.exists() and dl.items == []
    assert sink.total() == WebhookCounts(sent=20 - n_ok, duplicates=20)
