"""Redis-specific behaviour of the profile and guard stores (cache, layout, atomicity)."""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from bench.services import start_redis, stop
from flows.codec import pack, unpack
from flows.model import Profile
from state.guards import FOREVER_MS, Decision, GuardRequest, InMemoryGuardStore
from state.redis_store import RedisGuardStore, RedisProfileStore
from tests.faults.redis_server import PersistentRedis, fast_client

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
MIN = 60_000


class CountingRedis(redis.Redis):
    """A client that counts round trips (single commands and pipeline executes)."""

    round_trips = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.round_trips += 1
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction=transaction, shard_hint=shard_hint)
        execute = pipe.execute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.round_trips += 1
            return execute(*args, **kwargs)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def client(redis_url: str) -> Iterator[CountingRedis]:
    c = CountingRedis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    """A second client, standing for an operator or another worker."""
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def server_calls(admin: redis.Redis, command: str) -> int:
    stats: dict[str, Any] = admin.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


# --- profiles -------------------------------------------------------------------------


def test_hash_layout_is_human_readable(client: CountingRedis, admin: redis.Redis) -> None:
    store = RedisProfileStore(client)
    store.put_many(
        [
            Profile(
                "C1",
                subscriptions=frozenset({"VOLTE", "5G"}),
                configured=frozenset({"5G"}),
                handset="Pixel",
                prefs={"lang": ("en",)},
                opt_out=True,
                trials={"5G": T0},
            ),
            Profile("C2"),
        ]
    )
    assert admin.hgetall("profile:C1") == {
        "subscriptions": '["5G","VOLTE"]',
        "configured": '["5G"]',
        "prefs": '{"lang":["en"]}',
        "trials": '{"5G":1700000000000}',
        "handset": "Pixel",
        "opt_out": "1",
    }
    assert admin.hgetall("profile:C2") == {
        "subscriptions": "[]",
        "configured": "[]",
        "prefs": "{}",
        "trials": "{}",
        "opt_out": "0",
    }


def test_operator_edits_single_fields(client: CountingRedis, admin: redis.Redis) -> None:
    admin.hset("profile:C3", mapping={"opt_out": "1", "segment": "gold"})
    store = RedisProfileStore(client)
    assert store.get("C3") == Profile("C3", opt_out=True, segment="gold")
    assert store.bad_profiles == 0


def test_cache_hit_costs_no_round_trip(client: CountingRedis, admin: redis.Redis) -> None:
    clock = Clock()
    store = RedisProfileStore(client, cache_ttl_s=5.0, now=clock)
    store.put_many([Profile("C1", segment="gold")])
    admin.config_resetstat()
    client.round_trips = 0
    for _ in range(100):
        assert store.get("C1").segment == "gold"
        assert store.get("nobody") == Profile("nobody")  # "no profile" is cached too
        clock.t += 0.01
    assert client.round_trips == 2
    assert server_calls(admin, "hmget") == 2
    assert store.cache_hits == 198


def test_changed_profile_seen_after_ttl(client: CountingRedis, admin: redis.Redis) -> None:
    clock = Clock()
    store = RedisProfileStore(client, cache_ttl_s=5.0, now=clock)
    writer = RedisProfileStore(admin)  # another process
    writer.put_many([Profile("C1", segment="silver")])
    assert store.get("C1").segment == "silver"
    writer.put_many([Profile("C1", segment="gold")])  # another process changes it
    clock.t += 4.9
    assert store.get("C1").segment == "silver"  # still cached
    clock.t += 0.1
    assert store.get("C1").segment == "gold"  # seen once the ttl has passed
    # and a put through this store is seen at once
    store.put_many([Profile("C1", segment="bronze")])
    assert store.get("C1").segment == "bronze"


def test_cache_ttl_zero_always_reads(client: CountingRedis) -> None:
    store = RedisProfileStore(client, cache_ttl_s=0)
    client.round_trips = 0
    for _ in range(3):
        store.get("C1")
    assert client.round_trips == 3


def test_cache_is_bounded_lru(client: CountingRedis) -> None:
    clock = Clock()
    store = RedisProfileStore(client, now=clock, max_cached=3)
    for cid in ("A", "B", "C"):
        store.get(cid)
    store.get("A")  # A is now the most recent
    store.get("D")  # evicts B
    client.round_trips = 0
    store.get("A")
    store.get("C")
    store.get("D")
    assert client.round_trips == 0
    store.get("B")
    assert client.round_trips == 1


def test_get_many_fetches_misses_in_one_pipeline(
    client: CountingRedis, admin: redis.Redis
) -> None:
    clock = Clock()
    store = RedisProfileStore(client, now=clock)
    profiles = [Profile(f"C{i}", segment=str(i)) for i in range(20)]
    store.put_many(profiles)
    store.get("C0")
    store.get("C1")
    store.get_many(["x", "y"])  # Redis loads the read script on the first batch
    admin.config_resetstat()
    client.round_trips = 0
    ids = [f"C{i}" for i in range(20)] + ["C5", "nobody"]
    got = store.get_many(ids)
    assert client.round_trips == 1
    assert server_calls(admin, "evalsha_ro") == 1  # the whole batch in one call
    assert server_calls(admin, "hmget") == 19  # 18 misses + nobody; C0/C1 cached
    assert got == {p.customer_id: p for p in profiles} | {"nobody": Profile("nobody")}
    client.round_trips = 0
    assert store.get_many(ids) == got
    assert client.round_trips == 0


def test_prefetch_returns_cached_and_fetched_profiles_and_counts_each_id_once(
    client: CountingRedis,
) -> None:
    clock = Clock()
    store = RedisProfileStore(client, now=clock)
    profiles = [Profile(f"C{i}", segment=str(i)) for i in range(4)]
    store.put_many(profiles)
    store.get("C0")  # a miss, then cached
    before = store.stats()
    client.round_trips = 0
    held = store.prefetch(["C0", "C1", "C0", "C2", "C3", "C1", "nobody"])
    assert held == {p.customer_id: p for p in profiles} | {"nobody": Profile("nobody")}
    assert client.round_trips == 1
    after = store.stats()
    assert after["cache_hits"] - before["cache_hits"] == 1  # C0
    assert after["cache_misses"] - before["cache_misses"] == 4  # C1, C2, C3, nobody
    clock.t += 10  # past the TTL: every id is read again
    client.round_trips = 0
    assert store.prefetch(["C0", "C3"]) == {"C0": profiles[0], "C3": profiles[3]}
    assert client.round_trips == 1


def test_get_many_takes_ids_from_an_iterator_that_reads_the_store(client: CountingRedis) -> None:
    store = RedisProfileStore(client)
    store.put_many([Profile("A", segment="a"), Profile("B", segment="b")])
    # the cache's lock is not held while the ids are drawn (a non-reentrant lock would
    # deadlock here if it were)
    got = store.get_many(store.get(c).customer_id for c in ("A", "B"))
    assert got == {"A": Profile("A", segment="a"), "B": Profile("B", segment="b")}


def test_a_large_batch_is_read_in_bounded_script_calls_of_one_round_trip(
    client: CountingRedis, admin: redis.Redis
) -> None:
    store = RedisProfileStore(client, cache_ttl_s=0)
    profiles = [Profile(f"C{i}", segment=str(i % 7)) for i in range(2500)]
    store.put_many(profiles)
    store.get_many(["x", "y"])  # Redis loads the read script on the first batch
    admin.config_resetstat()
    client.round_trips = 0
    assert store.get_many(p.customer_id for p in profiles) == {
        p.customer_id: p for p in profiles}
    assert client.round_trips == 1
    assert server_calls(admin, "evalsha_ro") == 3  # 1000 + 1000 + 500 keys
    assert server_calls(admin, "hmget") == 2500


def test_put_many_is_one_round_trip(client: CountingRedis) -> None:
    store = RedisProfileStore(client)
    client.round_trips = 0
    assert store.put_many(Profile(f"C{i}") for i in range(50)) == 50
    assert client.round_trips == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"subscriptions": "not json"},
        {"subscriptions": '"5G"'},
        {"prefs": '{"lang": "en"}'},
        {"trials": '{"5G": "yesterday"}'},
        {"opt_out": "maybe"},
        {"configured": "[1, 2]"},
        {"handset": b"\xff\xfe"},
    ],
)
def test_malformed_hash_is_empty_profile_and_counted(
    client: CountingRedis, redis_url: str, fields: dict[str, Any]
) -> None:
    raw = redis.Redis.from_url(redis_url)
    raw.hset("profile:C1", mapping={"segment": "gold", **fields})
    raw.close()
    store = RedisProfileStore(client)
    assert store.get("C1") == Profile("C1")
    assert store.bad_profiles == 1
    assert store.get_many(["C1", "C2"]) == {"C1": Profile("C1"), "C2": Profile("C2")}
    assert store.bad_profiles == 1  # the empty profile was cached, not re-read


def test_a_key_that_is_not_a_hash_is_a_bad_profile_not_a_crash(
    client: CountingRedis, admin: redis.Redis
) -> None:
    store = RedisProfileStore(client)
    store.put_many([Profile("C1", segment="gold"), Profile("C3", segment="silver")])
    admin.set("profile:C2", "a string an operator wrote by mistake")
    admin.rpush("profile:C4", "a list")
    assert store.get_many(["C1", "C2", "C3", "C4"]) == {
        "C1": Profile("C1", segment="gold"), "C2": Profile("C2"),
        "C3": Profile("C3", segment="silver"), "C4": Profile("C4")}
    assert store.bad_profiles == 2
    store.invalidate()
    assert store.get("C2") == Profile("C2")  # one id: HMGET, not the script
    assert store.bad_profiles == 3


def test_batch_read_reloads_a_flushed_script(client: CountingRedis, admin: redis.Redis) -> None:
    store = RedisProfileStore(client, cache_ttl_s=0)
    profiles = [Profile(f"C{i}", segment=str(i)) for i in range(5)]
    store.put_many(profiles)
    ids = [p.customer_id for p in profiles]
    assert store.get_many(ids) == {p.customer_id: p for p in profiles}
    admin.script_flush()  # as after a restart or a failover
    assert store.get_many(ids) == {p.customer_id: p for p in profiles}
    assert store.health.errors == 0


def test_a_redis_without_evalsha_ro_is_read_with_evalsha(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis before 7.0 has no EVALSHA_RO; here a 7.x server with it renamed away answers
    # the same "unknown command" (a 6.2 server was checked by hand: see README).
    service = start_redis(tmp_path, extra=("--rename-command", "EVALSHA_RO", '""'))
    c = CountingRedis.from_url(service.address)
    try:
        with pytest.raises(redis.ResponseError, match="unknown command"):
            c.execute_command("EVALSHA_RO", "0" * 40, 0)
        store = RedisProfileStore(c, cache_ttl_s=0)
        profiles = [Profile(f"C{i}", segment=str(i)) for i in range(5)]
        store.put_many(profiles)
        ids = [p.customer_id for p in profiles]
        with caplog.at_level(logging.WARNING, logger="state.redis_store"):
            assert store.get_many(ids) == {p.customer_id: p for p in profiles}
            c.round_trips = 0
            assert store.get_many(ids) == {p.customer_id: p for p in profiles}
        assert c.round_trips == 1  # the second batch went straight to EVALSHA
        assert [r.getMessage() for r in caplog.records].count(
            "Redis has no EVALSHA_RO (it is older than 7.0): read-only scripts run with "
            "EVALSHA on this client") == 1
        assert store.health.errors == 0 and store.bad_profiles == 0
    finally:
        c.close()
        stop(service)


def test_fields_touchstream_does_not_know_are_left_alone(
    client: CountingRedis, admin: redis.Redis
) -> None:
    admin.hset("profile:C1", mapping={"segment": "gold", "crm_note": "{not json",
                                      "subscriptions": '["5G"]'})
    admin.hset("profile:C2", mapping={"crm_note": "only this"})
    store = RedisProfileStore(client)
    assert store.get_many(["C1", "C2"]) == {
        "C1": Profile("C1", segment="gold", subscriptions=frozenset({"5G"})),
        "C2": Profile("C2")}
    assert store.bad_profiles == 0


def test_profile_store_works_with_decoded_responses(admin: redis.Redis) -> None:
    store = RedisProfileStore(admin)
    p = Profile("C1", subscriptions=frozenset({"5G"}), handset="h\u00e9", trials={"5G": T0})
    store.put_many([p])
    store.invalidate()
    assert store.get("C1") == p


# --- guards ---------------------------------------------------------------------------


def test_guard_key_layout(client: CountingRedis, admin: redis.Redis) -> None:
    store = RedisGuardStore(client)
    r = GuardRequest("p1", "C1", T0, idempotency_ttl_ms=MIN, once_key="welcome",
                     once_ttl_ms=MIN, cap=3, cap_window_ms=MIN)
    assert store.admit([r]) == ["ok"]
    assert sorted(admin.keys("*")) == ["guard:{C1}", "guard:{C1}:id:p1"]
    # the push id marker: one number, in Redis' own decimal form
    assert admin.get("guard:{C1}:id:p1") == str(T0 + MIN)
    # the customer's record: MessagePack
    raw = client.get("guard:{C1}")
    assert unpack(raw) == {"once": {"welcome": T0 + MIN}, "sent": [T0]}
    assert store.record("C1") == {"once": {"welcome": T0 + MIN}, "sent": [T0]}
    assert store.record("nobody") == {}
    for key in ("guard:{C1}", "guard:{C1}:id:p1"):
        assert 0 < admin.pttl(key) <= MIN + 3_600_000
    # every key of one customer is in one cluster slot
    assert key_slot(b"guard:{C1}") == key_slot(b"guard:{C1}:id:p1")
    assert store.record_key("C1") == "guard:{C1}"
    assert store.id_key("C1", "p1") == "guard:{C1}:id:p1"


def test_guard_record_parts_only_when_used(client: CountingRedis, admin: redis.Redis) -> None:
    store = RedisGuardStore(client)
    assert store.admit([GuardRequest("p1", "C1", T0)]) == ["ok"]
    assert admin.keys("*") == ["guard:{C1}:id:p1"]  # no cap, no once key: no record
    assert store.admit([GuardRequest("p2", "C1", T0, cap=2)]) == ["ok"]
    assert store.record("C1") == {"sent": [T0]}
    assert store.admit([GuardRequest("p3", "C2", T0, once_key="k", once_ttl_ms=MIN)]) == ["ok"]
    assert store.record("C2") == {"once": {"k": T0 + MIN}}


def test_guard_once_for_good_record_never_expires(
    client: CountingRedis, admin: redis.Redis
) -> None:
    store = RedisGuardStore(client)
    r = GuardRequest("p1", "C1", T0, once_key="trial-ending:5G", cap=3, cap_window_ms=MIN)
    assert store.admit([r]) == ["ok"]
    assert store.record("C1") == {"once": {"trial-ending:5G": FOREVER_MS}, "sent": [T0]}
    assert admin.pttl("guard:{C1}") == -1  # no expiry while it holds a for-good key
    assert 0 < admin.pttl("guard:{C1}:id:p1")


def test_guard_record_gc_in_event_time(client: CountingRedis, admin: redis.Redis) -> None:
    store = RedisGuardStore(client, gc_slack_ms=10 * MIN)
    once: dict[str, Any] = {"once_key": "k", "once_ttl_ms": MIN}
    assert store.admit([GuardRequest("p1", "C1", T0, cap=5, cap_window_ms=MIN, **once)]) == [
        "ok"
    ]
    # later: the cap window has slid past p1; the once key ended more than the slack ago
    later = T0 + MIN + 10 * MIN
    assert store.admit([GuardRequest("p2", "C1", later, once_key="k2", once_ttl_ms=MIN)]) == [
        "ok"
    ]
    assert store.record("C1") == {"once": {"k2": later + MIN}, "sent": [T0]}  # k dropped
    assert store.admit([GuardRequest("p3", "C1", later, cap=5, cap_window_ms=MIN)]) == ["ok"]
    assert store.record("C1") == {"once": {"k2": later + MIN}, "sent": [later]}
    # the record's expiry covers its longest part plus the slack
    assert MIN + 10 * MIN - 1000 < admin.pttl("guard:{C1}") <= MIN + 10 * MIN


def test_guard_unreadable_record_is_empty_and_rewritten(
    client: CountingRedis, admin: redis.Redis
) -> None:
    admin.set("guard:{C1}", "this is not msgpack \xc1")
    store = RedisGuardStore(client)
    cap: dict[str, Any] = {"cap": 1, "cap_window_ms": MIN}
    assert store.admit([GuardRequest("p1", "C1", T0, **cap)]) == ["ok"]
    assert store.record("C1") == {"sent": [T0]}
    assert store.admit([GuardRequest("p2", "C1", T0 + 1, **cap)]) == ["cap"]
    # a record of the wrong shape: parts that are not what they should be are ignored
    client.set("guard:{C2}", pack({"once": [1, 2], "sent": {"x": 1}}))
    assert store.admit([GuardRequest("q1", "C2", T0, once_key="k", once_ttl_ms=MIN,
                                     **cap)]) == ["ok"]
    assert store.record("C2") == {"once": {"k": T0 + MIN}, "sent": [T0]}


def test_guard_groups_customers_into_few_script_calls(
    client: CountingRedis, admin: redis.Redis
) -> None:
    store = RedisGuardStore(client, chunk=100)
    reqs = [GuardRequest(f"p{i}", f"C{i % 30}", T0 + i, cap=3) for i in range(150)]
    store.admit([GuardRequest("warm", "C999", T0)])  # Redis loads the script (run alone too)
    admin.config_resetstat()
    client.round_trips = 0
    got = store.admit(reqs)
    assert got == InMemoryGuardStore().admit(reqs)
    assert client.round_trips == 1
    assert server_calls(admin, "evalsha") == 2  # 150 requests of 30 customers, chunks of 100


def test_guard_one_round_trip_per_call_and_script_reload(
    client: CountingRedis, admin: redis.Redis
) -> None:
    store = RedisGuardStore(client, chunk=7)
    admin.script_flush()
    reqs = [GuardRequest(f"p{i}", "C1", T0 + i, cap=30) for i in range(50)]
    assert store.admit(reqs[:25]) == ["ok"] * 25  # NOSCRIPT -> load -> retry
    client.round_trips = 0
    admin.config_resetstat()
    assert store.admit(reqs[25:]) == ["ok"] * 5 + ["cap"] * 20
    assert client.round_trips == 1
    assert server_calls(admin, "evalsha") == 4  # 25 requests in chunks of 7


def test_guard_matches_reference_on_random_traffic(client: CountingRedis) -> None:
    rng = random.Random(1234)
    ref = InMemoryGuardStore()
    store = RedisGuardStore(client, chunk=13)
    now = T0
    seen: Counter[str] = Counter()
    for _ in range(60):
        batch = []
        for _ in range(rng.randint(1, 40)):
            now += rng.randint(-2 * MIN, 3 * MIN)  # out of order at times
            once = rng.choice([None, None, "k1", "k2", "k3"])
            batch.append(
                GuardRequest(
                    push_id=f"p{rng.randint(0, 150)}",
                    customer_id=rng.choice(["C1", "C2", "C3"]),
                    now_ms=now,
                    idempotency_ttl_ms=rng.choice([0, 5 * MIN, 60 * MIN]),
                    once_key=once,
                    once_ttl_ms=None if once == "k3" else rng.choice([0, 3 * MIN, 20 * MIN]),
                    cap=rng.choice([0, 1, 3, 5]),
                    cap_window_ms=rng.choice([MIN, 10 * MIN, 30 * MIN]),
                )
            )
        got = store.admit(batch)
        assert got == ref.admit(batch)
        seen.update(got)
    assert min(seen[d] for d in ("ok", "duplicate", "cap", "once")) >= 20, seen


@pytest.mark.parametrize("shared", [True, False], ids=["shared-store", "store-per-thread"])
def test_guard_cap_is_atomic_under_concurrency(redis_url: str, shared: bool) -> None:
    threads_n, per_thread, cap = 4, 50, 3
    clients = [redis.Redis.from_url(redis_url) for _ in range(threads_n)]
    common = RedisGuardStore(clients[0])
    stores = [common if shared else RedisGuardStore(c) for c in clients]
    barrier = threading.Barrier(threads_n)
    results: list[list[Decision]] = [[] for _ in range(threads_n)]
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                req = GuardRequest(f"t{t}-p{i}", "C1", T0 + i, cap=cap, cap_window_ms=60 * MIN)
                results[t] += stores[t].admit([req])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    for c in clients:
        c.close()
    assert not errors
    flat = [d for r in results for d in r]
    assert len(flat) == threads_n * per_thread
    assert flat.count("ok") == cap
    assert flat.count("cap") == threads_n * per_thread - cap


def test_guard_duplicate_is_atomic_under_concurrency(redis_url: str) -> None:
    """The same push from 8 workers at once: exactly one is admitted."""
    clients = [redis.Redis.from_url(redis_url) for _ in range(8)]
    barrier = threading.Barrier(8)
    out: list[Decision] = []
    lock = threading.Lock()

    def work(c: redis.Redis) -> None:
        store = RedisGuardStore(c)
        barrier.wait()
        d = store.admit([GuardRequest(f"p{i}", "C1", T0) for i in range(20)])
        with lock:
            out.extend(d)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    for c in clients:
        c.close()
    assert out.count("ok") == 20
    assert out.count("duplicate") == 7 * 20


def test_guard_once_key_is_atomic_under_concurrency(redis_url: str) -> None:
    """Eight workers want to send the same once-per push (each its own push id)."""
    clients = [redis.Redis.from_url(redis_url) for _ in range(8)]
    barrier = threading.Barrier(8)
    out: list[Decision] = []
    lock = threading.Lock()

    def work(t: int, c: redis.Redis) -> None:
        store = RedisGuardStore(c)
        barrier.wait()
        d = store.admit(
            [GuardRequest(f"w{t}-c{i}", f"C{i}", T0 + t, once_key="cinema-pay",
                          once_ttl_ms=24 * 60 * MIN, cap=3) for i in range(20)]
        )
        with lock:
            out.extend(d)

    threads = [threading.Thread(target=work, args=(t, c)) for t, c in enumerate(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    for c in clients:
        c.close()
    assert out.count("ok") == 20  # one per customer
    assert out.count("once") == 7 * 20


# --- profiles while Redis is unreachable -------------------------------------------------


def test_profiles_read_elsewhere_are_last_known_here_but_never_fresh(
    own_redis: PersistentRedis,
) -> None:
    """What another process's router read (``remember``) is served while Redis is down,
    not while it is up: a read still goes to Redis, and a fresh entry is kept."""
    clock = Clock()
    c = fast_client(own_redis.url)
    writer = RedisProfileStore(c, cache_ttl_s=0)
    writer.put_many([Profile("C1", segment="gold"), Profile("C2", segment="gold"),
                     Profile("C3", segment="gold")])
    store = RedisProfileStore(c, cache_ttl_s=5.0, now=clock, retry_interval_s=0.05)
    assert store.get("C3") == Profile("C3", segment="gold")  # fresh in the cache now

    store.remember({"C1": Profile("C1", segment="router's copy")})
    # not fresh: the store reads Redis (a different profile there proves it)
    assert store.get("C1") == Profile("C1", segment="gold")
    store.remember({"C3": Profile("C3", segment="router's copy")})
    hits = store.cache_hits
    assert store.get("C3") == Profile("C3", segment="gold")  # the fresh entry stayed
    assert store.cache_hits == hits + 1

    store.remember({"C2": Profile("C2", segment="router's copy")})
    own_redis.stop()
    # C2 was never read here, but the router's copy is known: served, no wait
    assert store.get("C2") == Profile("C2", segment="router's copy")
    assert store.stale_served == 1 and store.unreachable_waits == 0
    store.close()
    c.close()


def test_remember_respects_a_disabled_cache_and_its_bound(client: CountingRedis) -> None:
    off = RedisProfileStore(client, cache_ttl_s=0)
    off.remember({"A": Profile("A")})
    assert off.stats()["cache_hits"] == 0 and not off._cache
    small = RedisProfileStore(client, cache_ttl_s=5.0, max_cached=2)
    small.remember({c: Profile(c) for c in ("A", "B", "C")})
    assert list(small._cache) == ["B", "C"]  # the oldest went


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    """A persistent redis-server of this test alone, to stop and start again."""
    server = PersistentRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_outage_serves_last_known_profiles_and_waits_for_unknown_ones(
    own_redis: PersistentRedis,
) -> None:
    clock = Clock()
    c = fast_client(own_redis.url)
    store = RedisProfileStore(c, cache_ttl_s=5.0, now=clock, retry_interval_s=0.05)
    store.put_many([Profile("C1", segment="gold"), Profile("C2", opt_out=True)])
    assert store.get_many(["C1"]) == {"C1": Profile("C1", segment="gold")}
    own_redis.stop()

    clock.t += 60  # the cached copy has expired: it is still what we know
    assert store.get("C1") == Profile("C1", segment="gold")
    assert store.get_many(["C1", "C1"]) == {"C1": Profile("C1", segment="gold")}
    assert store.stale_served == 2
    assert not store.health.up and store.health.outages == 1

    # C2 was never read here: no guess (an empty profile would clear the opt-out), wait
    got: list[Profile] = []
    reader = threading.Thread(target=lambda: got.append(store.get("C2")))
    reader.start()
    reader.join(0.5)
    assert reader.is_alive() and not got
    assert store.unreachable_waits == 1
    own_redis.start()  # same data (append-only file)
    reader.join(15)
    assert got == [Profile("C2", opt_out=True)]
    assert store.health.up
    clock.t += 60
    store.prefetch(["C1", "C3"])  # reads from Redis again
    assert store.stats() | {"redis_errors": 0} == {
        "cache_hits": 0, "cache_misses": 6, "bad_profiles": 0, "stale_served": 2,
        "unreachable_waits": 1, "redis_errors": 0}
    assert store.stats()["redis_errors"] >= 1
    store.close()
    c.close()


def test_a_batch_that_served_stale_profiles_caches_only_what_it_read(
    own_redis: PersistentRedis,
) -> None:
    """A batch waits for its unknown customers while it serves the known ones stale;
    when Redis is back, only what it read there becomes fresh in the cache."""
    clock = Clock()
    c = fast_client(own_redis.url)
    store = RedisProfileStore(c, cache_ttl_s=5.0, now=clock, retry_interval_s=0.05)
    store.put_many([Profile("C1", segment="gold"), Profile("C2", opt_out=True)])
    assert store.get("C1") == Profile("C1", segment="gold")
    clock.t += 60  # C1's copy has expired
    own_redis.stop()
    got: list[dict[str, Profile]] = []
    reader = threading.Thread(target=lambda: got.append(store.get_many(["C1", "C2"])))
    reader.start()
    reader.join(0.5)
    assert reader.is_alive()  # C1 is known (stale), C2 is not: the batch waits
    own_redis.start()
    reader.join(15)
    assert got == [{"C1": Profile("C1", segment="gold"), "C2": Profile("C2", opt_out=True)}]
    assert store.stale_served == 1
    writer = RedisProfileStore(c, cache_ttl_s=0)
    writer.put_many([Profile("C1", segment="silver"), Profile("C2", segment="silver")])
    # C1 was served stale, not read: not fresh, so the next read goes to Redis; C2 is
    assert store.get("C1") == Profile("C1", segment="silver")
    assert store.get("C2") == Profile("C2", opt_out=True)
    store.close()
    c.close()
