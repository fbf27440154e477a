"""The Redis stores and the push sink against a real three-node Redis Cluster.

The cluster comes from ``redis_cluster_url`` (tests/fixtures/redis_cluster.py). The contract
tests in test_contracts.py also run against it; these cover what only a cluster shows:
keys spread over nodes, no cross-slot operation, script reload on every primary, pub/sub
across nodes, and the clients made from the settings.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pytest
import redis
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, cluster_main, run_main
from pydantic import SecretStr
from redis.cluster import RedisCluster

from connectors.redis_push import RedisPushConfig, RedisPushOutput, read_channel
from flows.cli import main as cli_main
from flows.codec import json_dumps, json_loads
from flows.model import Profile, Push, PushGuard
from flows.runner import run_live
from flows.settings import RedisSettings, load_settings
from state.guards import Decision, GuardRequest, InMemoryGuardStore
from state.redis_store import RedisGuardStore, RedisProfileStore, connect, make_client

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
MIN = 60_000
DAY = 24 * 60 * MIN


@pytest.fixture
def rc(redis_cluster_url: str) -> Iterator[RedisCluster]:
    c = RedisCluster.from_url(redis_cluster_url)
    yield c
    c.close()


def node_of(rc: RedisCluster, key: str) -> str:
    node = rc.get_node_from_key(key)
    assert node is not None
    return str(node.name)


def evalsha_calls(rc: RedisCluster) -> int:
    total = 0
    for node in rc.get_primaries():
        stats: dict[str, Any] = rc.info("commandstats", target_nodes=node)
        total += int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return total


# --- clients from the settings -----------------------------------------------------------


def test_make_client_picks_the_cluster_client(redis_cluster_url: str) -> None:
    c = make_client(RedisSettings(url=SecretStr(redis_cluster_url), cluster=True))
    try:
        assert isinstance(c, RedisCluster)
        assert len(c.get_primaries()) == 3  # the other nodes were discovered
    finally:
        c.close()
    single = make_client(RedisSettings(url=SecretStr("redis://127.0.0.1:1/0")))
    assert type(single) is redis.Redis  # no connection is made before the first command
    single.close()
    with pytest.raises(ValueError, match="url"):
        make_client(RedisSettings())
    cfg = RedisPushConfig.from_settings(
        RedisSettings(url=SecretStr(redis_cluster_url), cluster=True), publish=False
    )
    assert (cfg.cluster, cfg.publish) == (True, False)


# --- guards ------------------------------------------------------------------------------


def test_guard_keys_of_a_customer_share_a_slot_and_customers_spread(rc: RedisCluster) -> None:
    store = RedisGuardStore(rc)
    reqs = [GuardRequest(f"p{i}", f"C{i}", T0, once_key="k", once_ttl_ms=MIN, cap=3)
            for i in range(60)]
    assert store.admit(reqs) == ["ok"] * 60
    nodes: set[str] = set()
    for i in range(60):
        rec, idem = store.record_key(f"C{i}"), store.id_key(f"C{i}", f"p{i}")
        assert rc.keyslot(rec) == rc.keyslot(idem)
        assert rc.exists(rec) == rc.exists(idem) == 1
        nodes.add(node_of(rc, rec))
        assert store.record(f"C{i}") == {"once": {"k": T0 + MIN}, "sent": [T0]}
    assert len(nodes) == 3  # one batch touched all three primaries


def test_guard_matches_reference_on_random_traffic(rc: RedisCluster) -> None:
    rng = random.Random(99)
    ref = InMemoryGuardStore()
    store = RedisGuardStore(rc, chunk=9)
    now = T0
    seen: Counter[str] = Counter()
    customers = [f"C{i}" for i in range(12)]
    for _ in range(40):
        batch = []
        for _ in range(rng.randint(1, 60)):
            now += rng.randint(-MIN, 2 * MIN)
            once = rng.choice([None, None, "k1", "k2", "k3"])
            batch.append(
                GuardRequest(
                    push_id=f"p{rng.randint(0, 60)}",
                    customer_id=rng.choice(customers),
                    now_ms=now,
                    idempotency_ttl_ms=rng.choice([0, 5 * MIN, 60 * MIN]),
                    once_key=once,
                    once_ttl_ms=None if once == "k3" else rng.choice([0, 3 * MIN, 20 * MIN]),
                    cap=rng.choice([0, 1, 3]),
                    cap_window_ms=rng.choice([MIN, 10 * MIN]),
                )
            )
        got = store.admit(batch)
        assert got == ref.admit(batch)
        seen.update(got)
    assert min(seen[d] for d in ("ok", "duplicate", "cap", "once")) >= 20, seen


def test_guard_reloads_the_script_on_every_primary(rc: RedisCluster) -> None:
    store = RedisGuardStore(rc)
    reqs = [GuardRequest(f"p{i}", f"C{i}", T0, cap=1) for i in range(30)]
    assert store.admit(reqs[:15]) == ["ok"] * 15
    rc.script_flush()  # every primary forgets it
    assert store.admit(reqs[15:]) == ["ok"] * 15  # NOSCRIPT -> load everywhere -> retry
    assert store.admit(reqs) == ["duplicate"] * 30


def test_guard_one_call_per_slot_not_per_request(rc: RedisCluster) -> None:
    store = RedisGuardStore(rc, chunk=500)
    rc.config_resetstat(target_nodes=RedisCluster.PRIMARIES)
    # 200 requests of 4 customers: one script call per customer slot
    reqs = [GuardRequest(f"p{i}", f"C{i % 4}", T0 + i, cap=100) for i in range(200)]
    assert store.admit(reqs) == ["ok"] * 200
    slots = {rc.keyslot(store.record_key(f"C{i}")) for i in range(4)}
    assert evalsha_calls(rc) == len(slots)


@pytest.mark.parametrize("what", ["cap", "once"])
def test_guard_is_atomic_across_clients(redis_cluster_url: str, what: str) -> None:
    """Four workers, each with its own cluster client, race for the same customers."""
    clients = [RedisCluster.from_url(redis_cluster_url) for _ in range(4)]
    barrier = threading.Barrier(4)
    out: list[Decision] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(t: int, c: RedisCluster) -> None:
        try:
            store = RedisGuardStore(c)
            barrier.wait()
            for i in range(10):
                if what == "cap":
                    reqs = [GuardRequest(f"t{t}-{i}", f"C{k}", T0 + i, cap=3,
                                         cap_window_ms=DAY) for k in range(10)]
                else:
                    reqs = [GuardRequest(f"t{t}-{i}", f"C{k}", T0 + i, once_key="cinema-pay",
                                         once_ttl_ms=DAY) for k in range(10)]
                d = store.admit(reqs)
                with lock:
                    out.extend(d)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t, c)) for t, c in enumerate(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    for c in clients:
        c.close()
    assert not errors
    admitted = 3 if what == "cap" else 1
    assert out.count("ok") == 10 * admitted  # per customer, whatever the interleaving
    assert out.count(what) == 4 * 10 * 10 - 10 * admitted


# --- profiles ----------------------------------------------------------------------------


def test_profile_store_on_a_cluster(rc: RedisCluster, redis_cluster_url: str) -> None:
    store = RedisProfileStore(rc)
    profiles = [Profile(f"C{i}", segment=str(i), subscriptions=frozenset({"5G"}))
                for i in range(50)]
    assert store.put_many(profiles) == 50  # keys of many slots: no cross-slot MULTI
    assert len({node_of(rc, store.key(p.customer_id)) for p in profiles}) == 3
    assert RedisProfileStore(rc).get_many(p.customer_id for p in profiles) == {
        p.customer_id: p for p in profiles
    }
    # still a plain hash an operator reads and edits
    plain = RedisCluster.from_url(redis_cluster_url, decode_responses=True)
    assert plain.hgetall("profile:C7") == {
        "subscriptions": '["5G"]', "configured": "[]", "prefs": "{}", "trials": "{}",
        "segment": "7", "opt_out": "0",
    }
    plain.hset("profile:C7", "opt_out", "1")
    plain.close()
    # a put replaces the whole hash (the segment goes), and drops the cached copy
    store.put_many([Profile("C7", opt_out=True)])
    assert store.get("C7") == Profile("C7", opt_out=True)
    store.prefetch(["C1", "C2"])
    assert store.get("C1") == profiles[1]


# --- the push sink -------------------------------------------------------------------------


def push(i: int, customer: str = "C1", channel: str | None = None,
         guard: PushGuard | None = None) -> Push:
    return Push(
        push_id=f"{customer}-p{i}",
        customer_id=customer,
        channel=channel or f"customer:{customer}",
        rule_id="r",
        rule_version=1,
        content={"i": i},
        event_ts=T0 + i,
        reason={},
        guard=guard,
    )


def flow_of(pushes: list[Push], sink: RedisPushOutput, spread: bool = False) -> Dataflow:
    flow = Dataflow("redis_cluster_push")
    s = op.input("in", flow, TestingSource(pushes))
    if spread:
        s = op.redistribute("spread", s)
    op.output("out", s, sink)
    return flow


def test_push_sink_writes_and_publishes_on_a_cluster(
    rc: RedisCluster, redis_cluster_url: str
) -> None:
    # a live listener on one node hears pushes whose channel lives on any node
    host, port = redis_cluster_url.removeprefix("redis://").split("/")[0].split(":")
    listener = redis.Redis(host=host, port=int(port))
    ps = listener.pubsub()
    customers = [f"C{i}" for i in range(12)]
    ps.subscribe(*(f"push:customer:{c}" for c in customers))
    for _ in customers:
        assert ps.get_message(timeout=2)["type"] == "subscribe"
    pushes = [push(i, customer=customers[i % 12]) for i in range(120)]
    sink = RedisPushOutput(RedisPushConfig(url=redis_cluster_url, cluster=True),
                           guard=RedisGuardStore)
    run_main(flow_of(pushes, sink))
    assert sink.stats() == {"written": 120}
    assert len({node_of(rc, f"push:customer:{c}") for c in customers}) == 3
    for c in customers:
        got = read_channel(rc, f"customer:{c}")
        assert [d for _, d in got] == [p.to_dict() for p in pushes if p.customer_id == c]
        assert 0 < rc.ttl(f"push:customer:{c}") <= 7 * 24 * 3600
    heard: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(heard) < 120 and time.monotonic() < deadline:
        msg = ps.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if msg is not None and msg["type"] == "message":
            heard.append(msg["data"])
    assert sorted(heard) == sorted(json_dumps(p.to_dict()) for p in pushes)
    ps.close()
    listener.close()
    # a replay on two workers: nothing is written again
    sink2 = RedisPushOutput(RedisPushConfig(url=redis_cluster_url, cluster=True),
                            guard=RedisGuardStore)
    cluster_main(flow_of(pushes, sink2, spread=True), [], 0, worker_count_per_proc=2)
    assert sink2.stats() == {"duplicate": 120}


def test_two_sinks_on_a_cluster_hold_cap_and_once(
    rc: RedisCluster, redis_cluster_url: str
) -> None:
    """Two engines (fresh flow states) push for the same customers through one cluster."""
    cap = PushGuard(cap=3, cap_window_ms=DAY)
    once = PushGuard(once_key="cinema-pay", once_ttl_ms=DAY, cap=3, cap_window_ms=DAY)
    cfg = RedisPushConfig(url=redis_cluster_url, cluster=True)
    customers = [f"C{i}" for i in range(8)]
    first = [push(i, c, guard=cap) for c in customers for i in range(2)]
    second = [push(10 + i, c, guard=cap) for c in customers for i in range(2)]
    a = RedisPushOutput(cfg, guard=RedisGuardStore)
    b = RedisPushOutput(cfg, guard=RedisGuardStore)
    run_main(flow_of(first, a))
    run_main(flow_of(second, b))
    assert a.stats() == {"written": 16}
    assert b.stats() == {"written": 8, "cap": 8}  # one slot per customer was left
    for c in customers:
        ids = [json_loads(f[b"data"])["push_id"] for _, f in rc.xrange(f"push:customer:{c}")]
        assert ids == [f"{c}-p0", f"{c}-p1", f"{c}-p10"]
    # once: customer D1 gets the cinema push from one engine only
    c1 = RedisPushOutput(cfg, guard=RedisGuardStore)
    c2 = RedisPushOutput(cfg, guard=RedisGuardStore)
    run_main(flow_of([push(1, "D1", guard=once)], c1))
    run_main(flow_of([push(2, "D1", guard=once), push(3, "D1", guard=once)], c2))
    assert (c1.stats(), c2.stats()) == ({"written": 1}, {"once": 2})
    assert connect(redis_cluster_url, cluster=True).xlen("push:customer:D1") == 1


# --- the command line and the live runner ------------------------------------------------


def test_cli_and_live_run_on_a_cluster(
    rc: RedisCluster, redis_cluster_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``profiles load`` and ``run`` (demo traffic) with TOUCHSTREAM_REDIS__CLUSTER=true."""
    monkeypatch.setenv("TOUCHSTREAM_REDIS__CLUSTER", "true")
    prof = tmp_path / "profiles.jsonl"
    profiles = [Profile(f"C{i}", segment="gold") for i in range(20)]
    prof.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in profiles))
    assert cli_main(["profiles", "load", str(prof), "--redis", redis_cluster_url]) == 0
    assert RedisProfileStore(rc).get_many(f"C{i}" for i in range(20)) == {
        p.customer_id: p for p in profiles
    }

    settings = load_settings(mode="live", redis={"url": redis_cluster_url},
                             demo_rate=200.0, engine={"stats_interval_s": 1})
    assert settings.redis.cluster
    run_live(settings, duration_s=4.0)
    streams = sorted(k.decode() for k in rc.scan_iter(match="push:*"))
    assert streams, "the demo run wrote no push stream"
    pushes = [d for s in streams for _, d in read_channel(rc, s.removeprefix("push:"))]
    assert pushes and all("guard" not in d for d in pushes)
    assert len({d["push_id"] for d in pushes}) == len(pushes)
    guard_keys = list(rc.scan_iter(match="guard:{*}"))
    assert guard_keys  # the delivery guard ran on the cluster
