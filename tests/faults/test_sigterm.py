"""Fault: SIGTERM (and Ctrl-C) stop the engine cleanly; a restart goes on exactly.

The Kafka test runs a *reference* engine (never stopped) and a *victim* with two
worker threads on the same input topics, each with its own outputs. The victim gets
SIGTERM while traffic flows and while customers are stuck on a step (their help is due
after the restart). It must exit 0 having flushed everything it emitted: its Kafka
output topics hold exactly the pushes in its Redis streams and the alerts its webhook
receiver got, and no help was sent early. More traffic arrives while it is down; after
a restart, its outputs equal the reference's with no loss and no repeat anywhere, not
even on Kafka (a clean stop leaves nothing to read again), and the stuck customers get
their help on time.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from tests.faults.harness import (
    ROOT,
    Engine,
    RunTopics,
    Scenario,
    StreamProducer,
    compare,
    dead_letter_ids,
    engine_args,
    engine_env,
    load_profiles,
    now_ms,
    push_counts,
    read_push_streams,
    receiving,
    redis_db_url,
    topic_docs,
    touchstream_argv,
    wait_until,
    write_rules,
)

pytestmark = pytest.mark.integration

DWELL_S = 8.0  # the restarted 2-worker engine has ~8 s to be up before help is due
SNAPSHOT_S = 1.0
REF_DB, VICTIM_DB = 13, 14
STOP_TIMEOUT_S = 20.0


def _flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def test_sigterm_flushes_exits_0_and_a_restart_repeats_and_loses_nothing(
    tansu: str, redis_server: str, tmp_path: Path
) -> None:
    seed = 20260
    ref_url, victim_url = redis_db_url(redis_server, REF_DB), redis_db_url(redis_server, VICTIM_DB)
    for url in (ref_url, victim_url):
        _flush(url)
    ref_topics = RunTopics.make(tansu, "term-ref")
    victim_topics = RunTopics.make(tansu, "term-victim", inputs=ref_topics)
    rules = write_rules(tmp_path / "rules.yaml", DWELL_S)
    scenario = Scenario(seed, "t")
    before = scenario.plan(60)
    stuck = scenario.plan(3, kinds=["stuck"] * 3)
    during = scenario.plan(40)  # produced while the victim is down
    after = scenario.plan(30)
    for url in (ref_url, victim_url):
        load_profiles(url, scenario.profiles)

    with receiving() as ref_rcv, receiving() as victim_rcv:
        ref = Engine("reference", engine_args(tansu, ref_url, ref_rcv.url, rules,
                                              tmp_path / "rec-ref", SNAPSHOT_S),
                     engine_env(ref_topics), tmp_path)
        victim = Engine("victim", engine_args(tansu, victim_url, victim_rcv.url, rules,
                                              tmp_path / "rec-victim", SNAPSHOT_S,
                                              ["--workers", "2"]),
                        engine_env(victim_topics), tmp_path)
        producer = StreamProducer(tansu, ref_topics, scenario)
        try:
            ref.start()
            victim.start()
            producer.run(before, 0.03)
            time.sleep(1.5)
            producer.run(stuck, 0.0)
            time.sleep(0.5)

            # --- SIGTERM: exit 0, quickly, with every output flushed ----------------------
            t0 = time.monotonic()
            rc = victim.stop(signal.SIGTERM, STOP_TIMEOUT_S)
            stop_s = time.monotonic() - t0
            first_log = victim.log_tail(400)
            assert rc == 0, first_log
            assert "stopped by SIGTERM" in first_log, first_log
            assert "panicked" not in first_log and "Traceback" not in first_log, first_log
            at_stop = read_push_streams(victim_url)
            at_stop_ids = {e.push["push_id"] for e in at_stop}
            kafka_at_stop = Counter(d["push_id"]
                                    for d in topic_docs(tansu, victim_topics["pushes"]))
            assert set(kafka_at_stop) == at_stop_ids, "Kafka pushes not flushed at the stop"
            alerts_at_stop = Counter(d["id"] for d in topic_docs(tansu, victim_topics["alerts"]))
            assert set(victim_rcv.ids()) == set(alerts_at_stop), (
                "the webhook queue was not drained at the stop")
            stuck_ids = {u.customers[0] for u in stuck}
            assert not [e for e in at_stop if e.push["customer_id"] in stuck_ids], (
                "help was sent at the stop, before its time")
            assert at_stop and alerts_at_stop, "nothing happened before the stop"

            producer.run(during, 0.02)  # the victim is down: this waits in Kafka
            victim.start()
            producer.run(after, 0.03)
            last_deadline = max(scenario.stuck_times.values()) + int(DWELL_S * 1000)
            while now_ms() < last_deadline + 1000:
                time.sleep(0.1)

            def caught_up() -> bool:
                return (len(read_push_streams(victim_url)) >= len(read_push_streams(ref_url))
                        and set(victim_rcv.ids()) >= set(ref_rcv.ids()))

            wait_until(caught_up, 30, 0.2)
            assert ref.stop(signal.SIGTERM, STOP_TIMEOUT_S) == 0, ref.log_tail()
            assert victim.stop(signal.SIGTERM, STOP_TIMEOUT_S) == 0, victim.log_tail()
        finally:
            ref.ensure_dead()
            victim.ensure_dead()

        ref_pushes, victim_pushes = read_push_streams(ref_url), read_push_streams(victim_url)
        results = [
            compare("pushes (Redis)", push_counts(ref_pushes), push_counts(victim_pushes)),
            compare("alerts (webhook)", ref_rcv.ids(), victim_rcv.ids()),
        ]
    for kind, key in (("pushes", "push_id"), ("alerts", "id")):
        results.append(compare(
            f"{kind} (Kafka)",
            Counter(d[key] for d in topic_docs(tansu, ref_topics[kind])),
            Counter(d[key] for d in topic_docs(tansu, victim_topics[kind]))))
    results.append(compare(
        "dead letters (Kafka)",
        dead_letter_ids(topic_docs(tansu, ref_topics["dead_letters"])),
        dead_letter_ids(topic_docs(tansu, victim_topics["dead_letters"]))))

    print(f"\nmessages sent {producer.sent}; SIGTERM stop took {stop_s:.2f} s "
          f"(2 workers), {len(at_stop)} pushes and {len(alerts_at_stop)} alerts flushed by then")
    for c in results:
        print(c.line())
    kinds = Counter(u.kind for u in before + during + after)
    assert results[0].expected == (kinds["cinema"] + kinds["calls"] + kinds["setup"]
                                   + len(scenario.stuck_times))
    for c in results:
        assert (c.lost, c.extra, c.repeated, c.reference_repeated) == (0, 0, 0, 0), c.line()

    dwell_ms = int(DWELL_S * 1000)
    for e in victim_pushes:
        cid = e.push["customer_id"]
        if cid in stuck_ids:
            delay = e.entry_ms - scenario.stuck_times[cid]
            assert dwell_ms - 50 <= delay <= dwell_ms + 2000, (cid, delay)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_the_demo_cleanly(sig: signal.Signals, tmp_path: Path) -> None:
    """Demo traffic (no Kafka): the signal ends the run with exit 0 and its summary line,
    not a Rust panic or a traceback."""
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*touchstream_argv(), "run", "--duration", "60",
                                 "--rate", "200", "--seed", str(random.randrange(100))],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                env={**os.environ, "TOUCHSTREAM_ENGINE__STATS_INTERVAL_S": "0.5"})
    try:
        assert wait_until(lambda: "STATS" in log.read_text(errors="replace")
                          or proc.poll() is not None, 30)
        proc.send_signal(sig)
        rc = proc.wait(STOP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text(errors="replace")
    assert rc == 0, text
    assert f"touchstream: stopped by {sig.name}:" in text, text
    assert "panicked" not in text and "Traceback" not in text and "KeyboardInterrupt" not in text
