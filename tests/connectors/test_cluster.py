"""Integration: the same live flow as one process and as a two-process Bytewax cluster.

A fixed set of events (every default rule fires, a step-friction cohort included) goes
into Tansu topics of 3 partitions each. ``touchstream run`` reads them once as one
process and once as two processes (``-i 0``/``-i 1`` with the same ``-a`` list), each
run writing to its own output topics and its own Redis database; the pushes and alerts
(ids and bodies) must be identical, and both processes must exit 0.

The events are designed so that the outcome cannot depend on how partitions, topics,
batches and processes interleave: every rule's trigger lives on one topic (so each
customer's triggering events are on one partition, in order); the customer stuck on a
step sends nothing after entering it, so help fires whenever its (long due) timer is
looked at; the friction cohort leaves the step well before help's dwell (the test
rules make help wait 10 min and friction judge a 30 s mean), so no help timer races a
step exit; and the five friction visits share their enter and leave times, so
whichever arrives fifth, the step alert is the same. Forty background customers each
get a cinema-pay push, so both processes of the cluster have pushes to write.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition

from connectors.redis_push import read_channel
from flows.model import Profile

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
S = 1000
MIN = 60 * S
H = 60 * MIN
RUN_TIMEOUT_S = 120
EXPECTED_RULES = {"cinema-pay", "call-spike", "music-pref", "setup-first", "help-sprite",
                  "trial-ending"}
COHORT = [f"1390000{k:04d}" for k in range(11, 16)]
BACKGROUND = range(100, 140)


def write_rules(path: Path) -> Path:
    """The default rules with help after 10 min and step friction at a 30 s mean."""
    doc = yaml.safe_load((ROOT / "flows" / "default_rules.yaml").read_text())
    for r in doc["rules"]:
        if r["id"] == "help-sprite":
            r["trigger"]["dwell"] = "10m"
        if r["id"] == "step-friction":
            r["trigger"]["mean_dwell"] = "30s"
    path.write_text(yaml.safe_dump(doc))
    return path


def cid(k: int) -> str:
    return f"1390000{k:04d}"


def profiles(t: int) -> list[Profile]:
    return [
        Profile(cid(3), subscriptions=frozenset({"music"}), prefs={"music": ("jazz",)}),
        Profile(cid(4), subscriptions=frozenset({"care_link"})),
        Profile(cid(5), trials={"mobile_paper": t + 24 * H}),
        Profile(cid(6), subscriptions=frozenset({"remote_cam"}),
                configured=frozenset({"remote_cam"})),
        *(Profile(c, subscriptions=frozenset({"remote_cam"}),
                  configured=frozenset({"remote_cam"})) for c in COHORT[:2]),
    ]


def events(t: int) -> list[tuple[str, dict[str, Any]]]:
    """``(kind, event)``: kind is ``clicks``, ``location`` or ``calls``."""
    out: list[tuple[str, dict[str, Any]]] = []

    def click(k: str, ts: int, action: str, module: str | None = None,
              step: str | None = None, terminal: str = "H01-T01") -> None:
        ev: dict[str, Any] = {"type": "click", "customer_id": k, "ts": ts,
                              "terminal_id": terminal, "hall_id": terminal[:3],
                              "action": action}
        if module:
            ev["module"] = module
        if step:
            ev["step"] = step
        out.append(("clicks", ev))

    def loc(k: str, ts: int, poi: str | None) -> None:
        ev: dict[str, Any] = {"type": "location", "customer_id": k, "ts": ts,
                              "cell_id": f"cell-{poi or 'x'}"}
        if poi:
            ev["poi"] = poi
            ev["poi_id"] = f"{poi}-1"
        out.append(("location", ev))

    def calls(k: str, ts: int, total: int) -> None:
        out.append(("calls", {"type": "calls", "customer_id": k, "ts": ts, "interval_s": 300,
                              "calls_in": total - total // 3, "calls_out": total // 3,
                              "missed": 0}))

    # cinema-pay: a past visit (history only: older than the allowed lateness) + a fresh one
    loc(cid(1), t - 3 * H, "cinema")
    loc(cid(1), t - 60 * S, "cinema")
    # call-spike: three quiet intervals of history, then a burst
    for back, n in ((20, 2), (15, 3), (10, 2)):
        calls(cid(2), t - back * MIN, n)
    calls(cid(2), t - 60 * S, 15)
    # music-pref, setup-first, trial-ending: sessions of customers with those profiles
    click(cid(3), t - 100 * S, "session_start", terminal="H01-T03")
    click(cid(3), t - 95 * S, "module_enter", "music", terminal="H01-T03")
    click(cid(3), t - 40 * S, "session_end", terminal="H01-T03")
    click(cid(4), t - 100 * S, "session_start", terminal="H02-T04")
    click(cid(5), t - 100 * S, "session_start", terminal="H02-T05")
    click(cid(5), t - 90 * S, "module_enter", "mobile_paper", terminal="H02-T05")
    # help-sprite: stuck on a step for 12 min, with nothing more
    click(cid(6), t - 13 * MIN, "session_start", terminal="H01-T06")
    click(cid(6), t - 12 * MIN - 30 * S, "module_enter", "remote_cam", terminal="H01-T06")
    click(cid(6), t - 12 * MIN, "step_enter", "remote_cam", "pair", terminal="H01-T06")
    # step-friction: five customers 40 s on the same step, same enter and leave times
    for i, k in enumerate(COHORT):
        term = f"H03-T{i:02d}"
        click(k, t - 70 * S, "session_start", terminal=term)
        click(k, t - 65 * S, "module_enter", "remote_cam", terminal=term)
        click(k, t - 60 * S, "step_enter", "remote_cam", "door_sensor_setup", terminal=term)
        click(k, t - 20 * S, "step_exit", "remote_cam", "door_sensor_setup", terminal=term)
        click(k, t - 15 * S, "session_end", terminal=term)
    # background: 40 cinema-goers (one push each) with quiet call records
    for k in BACKGROUND:
        loc(cid(k), t - 3 * H - k * S, "cinema")
        loc(cid(k), t - (k % 7) * 10 * S - 30 * S, ("mall", "office", None)[k % 3])
        loc(cid(k), t - 25 * S, "cinema")
        calls(cid(k), t - (k % 5) * 10 * S - 30 * S, k % 4)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def read_all(brokers: str, topic: str) -> list[Any]:
    """Every message of a topic: past each partition's high watermark, then 1 s idle.

    (Tansu reports the last batch's base offset + 1 as the high watermark, so the
    watermark alone may stop short of that batch's other records.)
    """
    c = Consumer({"bootstrap.servers": brokers, "group.id": "cluster-test-reader",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        want: dict[int, int] = {}
        for p in md.partitions:
            _low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > 0:
                want[p] = high
        c.assign([TopicPartition(topic, p, 0) for p in md.partitions])
        out: list[Any] = []
        deadline = time.monotonic() + 20
        idle_until = time.monotonic() + 1
        while time.monotonic() < deadline and (want or time.monotonic() < idle_until):
            m = c.poll(0.1)
            if m is None or m.error():
                continue
            out.append(m)
            idle_until = time.monotonic() + 1
            if m.offset() + 1 >= want.get(m.partition(), 0):
                want.pop(m.partition(), None)
        assert not want, f"{topic}: partitions not read to their high watermark: {want}"
        return out
    finally:
        c.close()


def run_processes(n: int, tansu: str, redis_url: str, topics: dict[str, str],
                  rules: Path, tmp_path: Path, tag: str,
                  extra_env: Callable[[int], dict[str, str]] = lambda _i: {},
                  ) -> list[tuple[int, str, str]]:
    """``touchstream run`` as ``n`` processes (one cluster); ``(rc, stdout, stderr)`` each.
    ``extra_env(i)`` adds to process ``i``'s environment."""
    env = {**os.environ,
           "TOUCHSTREAM_KAFKA__EOF_WHEN_IDLE_S": "3",
           "TOUCHSTREAM_ENGINE__STATS_INTERVAL_S": "1",
           "TOUCHSTREAM_RECOVERY__DIR": str(tmp_path / f"recovery-{tag}"),
           **{f"TOUCHSTREAM_KAFKA__{k.upper()}_TOPIC": v for k, v in topics.items()}}
    env.pop("TOUCHSTREAM_CONFIG", None)
    base = [sys.executable, "-m", "flows.cli", "run", "--kafka", tansu, "--redis", redis_url,
            "--rules", str(rules), "--workers", "1"]
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(n))
    procs = []
    for i in range(n):
        cmd = base + (["-i", str(i), "-a", addresses] if n > 1 else [])
        out = (tmp_path / f"{tag}-{i}.out").open("w")
        err = (tmp_path / f"{tag}-{i}.err").open("w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env={**env, **extra_env(i)},
                                       stdout=out, stderr=err,
                                       stdin=subprocess.DEVNULL), out, err))
    results = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for i, (p, out, err) in enumerate(procs):
        try:
            rc = p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q, _, _ in procs:
                q.kill()
            rc = -9
        out.close()
        err.close()
        results.append((rc, (tmp_path / f"{tag}-{i}.out").read_text(),
                        (tmp_path / f"{tag}-{i}.err").read_text()))
    return results


def outputs(tansu: str, topics: dict[str, str]) -> dict[str, dict[str, Any]]:
    pushes = {}
    for m in read_all(tansu, topics["pushes"]):
        doc = json.loads(m.value())
        assert doc["push_id"] not in pushes, f"duplicate push {doc['push_id']}"
        pushes[doc["push_id"]] = doc
    alerts = {}
    for m in read_all(tansu, topics["alerts"]):
        doc = json.loads(m.value())
        assert doc["id"] not in alerts, f"duplicate alert {doc['id']}"
        alerts[doc["id"]] = doc
    dead = [json.loads(m.value())["reason"] for m in read_all(tansu, topics["dead_letters"])]
    return {"pushes": pushes, "alerts": alerts, "dead": {"reasons": sorted(dead)}}


def redis_push_ids(url: str) -> set[str]:
    client = redis.Redis.from_url(url)
    try:
        streams = [k.decode() for k in client.scan_iter("push:*")]
        return {p["push_id"] for s in streams for _, p in read_channel(client, s[len("push:"):])}
    finally:
        client.close()


def done_counts(stdout: str) -> tuple[int, int]:
    """``(pushes, alerts)`` from the ``touchstream: done: ...`` line."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith("touchstream: done:"))
    words = line.replace(",", "").split()
    return int(words[2]), int(words[4])


def test_two_processes_push_and_alert_exactly_like_one(
    tansu: str, tansu_topic: Callable[..., str], redis_url: str, tmp_path: Path
) -> None:
    inputs = {kind: tansu_topic(3) for kind in ("clicks", "location", "calls")}
    rules = write_rules(tmp_path / "rules.yaml")
    t = time.time_ns() // 1_000_000
    producer = Producer({"bootstrap.servers": tansu, "linger.ms": 1})
    for kind, ev in events(t):
        producer.produce(inputs[kind], json.dumps(ev).encode(), key=ev["customer_id"].encode())
    producer.produce(inputs["clicks"], b"{not json", key=cid(99).encode())
    assert producer.flush(10) == 0

    # One Redis database per run (profiles, guards, push streams), same profiles in each.
    prof = tmp_path / "profiles.jsonl"
    prof.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in profiles(t)))
    base_url = redis_url.rsplit("/", 1)[0]
    urls = {"one": f"{base_url}/1", "two": f"{base_url}/2"}
    for url in urls.values():
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()
        load = subprocess.run([sys.executable, "-m", "flows.cli", "profiles", "load", str(prof),
                               "--redis", url], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        assert load.returncode == 0, load.stderr

    results: dict[str, dict[str, dict[str, Any]]] = {}
    for tag, n in (("one", 1), ("two", 2)):
        topics = {
            "clicks": inputs["clicks"], "location": inputs["location"],
            "calls": inputs["calls"],
            "pushes": tansu_topic(3), "alerts": tansu_topic(3), "dead_letters": tansu_topic(1),
            "stats": tansu_topic(1), "alerts_dlq": tansu_topic(1),
        }
        procs = run_processes(n, tansu, urls[tag], topics, rules, tmp_path, tag)
        for i, (rc, out, err) in enumerate(procs):
            assert rc == 0, f"{tag} process {i} exited {rc}:\n{out[-3000:]}\n{err[-3000:]}"
        results[tag] = outputs(tansu, topics)
        counts = [done_counts(out) for _, out, _ in procs]
        assert sum(c[0] for c in counts) == len(results[tag]["pushes"])
        assert sum(c[1] for c in counts) == len(results[tag]["alerts"])
        if n > 1:
            # Both processes did part of the work (their shards hold some of the customers).
            assert all(c[0] > 0 for c in counts), counts
        assert redis_push_ids(urls[tag]) == set(results[tag]["pushes"])

    one, two = results["one"], results["two"]
    assert {p["rule_id"] for p in one["pushes"].values()} == EXPECTED_RULES
    assert len(one["pushes"]) == 6 + len(BACKGROUND)  # one per rule + background cinema-pay
    assert sorted(a["type"] for a in one["alerts"].values()) == [
        "touchstream.dwell.customer", "touchstream.dwell.step"]
    step = next(a for a in one["alerts"].values() if a["type"] == "touchstream.dwell.step")
    assert step["data"]["n"] == 5 and step["data"]["mean_s"] == 40.0
    assert one["dead"] == {"reasons": ["invalid_json"]}
    # The point: identical ids and bodies, however the work was spread.
    assert two["pushes"] == one["pushes"]
    assert two["alerts"] == one["alerts"]
    assert two["dead"] == one["dead"]


@pytest.mark.parametrize(("env", "said_here"), [
    ({"TOUCHSTREAM_ENGINE__SHARDS": "32"},
     "every process of a cluster needs the same engine.shards"),
    ({"TOUCHSTREAM_ENGINE__ALLOWED_LATENESS_S": "60"},
     "a shard got records routed by a process with other cluster terms"),
], ids=["shards", "lateness"])
def test_a_cluster_whose_processes_disagree_stops_and_says_why(
    tansu: str, tansu_topic: Callable[..., str], redis_url: str, tmp_path: Path,
    env: dict[str, str], said_here: str,
) -> None:
    """Process 1 started with ``engine.shards = 32`` (or another lateness), process 0
    with the default: one customer's events would be applied by two shards (or decided
    by other settings depending on where their shard runs). The cluster stops at the
    first batch routed across, with a message saying what to fix, instead of running
    on."""
    inputs = {kind: tansu_topic(3) for kind in ("clicks", "location", "calls")}
    t = time.time_ns() // 1_000_000
    producer = Producer({"bootstrap.servers": tansu, "linger.ms": 1})
    for kind, ev in events(t):
        producer.produce(inputs[kind], json.dumps(ev).encode(), key=ev["customer_id"].encode())
    assert producer.flush(10) == 0
    topics = {**inputs, "pushes": tansu_topic(3), "alerts": tansu_topic(3),
              "dead_letters": tansu_topic(1), "stats": tansu_topic(1),
              "alerts_dlq": tansu_topic(1)}
    base_url = redis_url.rsplit("/", 1)[0]
    procs = run_processes(2, tansu, f"{base_url}/3", topics, write_rules(tmp_path / "r.yaml"),
                          tmp_path, "mixed",
                          extra_env=lambda i: env if i else {})
    assert all(rc not in (0, -9) for rc, _, _ in procs), [rc for rc, _, _ in procs]
    said = "".join(err for _, _, err in procs)
    assert said_here in said
