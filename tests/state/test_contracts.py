"""One set of contract tests for every ProfileStore and GuardStore implementation.

Each runs in memory, against a single redis-server and against a three-node Redis
Cluster (where one batch spans customers of several slots and nodes).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from flows.model import Profile, Push, PushGuard
from state.guards import (
    FOREVER_MS,
    GuardRequest,
    GuardStore,
    InMemoryGuardStore,
    InMemoryQuotaStore,
    QuotaStore,
)
from state.profiles import InMemoryProfileStore, ProfileStore
from state.redis_store import RedisClient, RedisGuardStore, RedisProfileStore, RedisQuotaStore

T0 = 1_700_000_000_000
MIN = 60_000

Profiles = InMemoryProfileStore | RedisProfileStore

IMPLS = [
    "memory",
    pytest.param("redis", marks=pytest.mark.integration),
    pytest.param("redis-cluster", marks=pytest.mark.integration),
]


class Clients:
    """Makes clients of one server (or cluster) for a test and closes them after it."""

    def __init__(self, url: str, cluster: bool) -> None:
        self.url = url
        self.cluster = cluster
        self.made: list[RedisClient] = []

    def new(self) -> RedisClient:
        c: RedisClient = (
            RedisCluster.from_url(self.url) if self.cluster else redis.Redis.from_url(self.url)
        )
        self.made.append(c)
        return c


@pytest.fixture(params=IMPLS)
def clients(request: pytest.FixtureRequest) -> Iterator[Clients | None]:
    """None for the in-memory stores, else a maker of clients of a fresh Redis."""
    if request.param == "memory":
        yield None
        return
    cluster = request.param == "redis-cluster"
    url: str = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
    made = Clients(url, cluster)
    yield made
    for c in made.made:
        c.close()


@pytest.fixture
def profiles(clients: Clients | None) -> Profiles:
    if clients is None:
        return InMemoryProfileStore()
    return RedisProfileStore(clients.new())


@pytest.fixture
def guards(clients: Clients | None) -> GuardStore:
    if clients is None:
        return InMemoryGuardStore()
    return RedisGuardStore(clients.new())


@pytest.fixture
def guard_pair(clients: Clients | None) -> tuple[GuardStore, GuardStore]:
    """Two stores over the same state: two workers or processes sharing one Redis."""
    if clients is None:
        shared = InMemoryGuardStore()
        return shared, shared
    return RedisGuardStore(clients.new()), RedisGuardStore(clients.new())


FULL = Profile(
    customer_id="C1",
    subscriptions=frozenset({"5G", "VOLTE"}),
    configured=frozenset({"VOLTE"}),
    handset="Pixel 8 \u00e9",
    segment="gold",
    prefs={"lang": ("en", "fr"), "topics": ()},
    opt_out=True,
    trials={"5G": T0, "CLOUD": T0 + 1},
)


# --- ProfileStore ---------------------------------------------------------------------


def test_profile_store_protocol(profiles: Profiles) -> None:
    assert isinstance(profiles, ProfileStore)


def test_missing_profile_is_empty(profiles: Profiles) -> None:
    assert profiles.get("nobody") == Profile("nobody")


def test_profile_round_trip_every_field(profiles: Profiles) -> None:
    assert profiles.put_many([FULL]) == 1
    got = profiles.get("C1")
    assert got == FULL
    assert got.to_dict() == FULL.to_dict()


def test_profile_round_trip_empty_and_none_fields(profiles: Profiles) -> None:
    p = Profile("C2", subscriptions=frozenset({"X"}))
    profiles.put_many([p])
    assert profiles.get("C2") == p
    assert profiles.get("C2").handset is None


def test_profile_put_replaces_whole_profile(profiles: Profiles) -> None:
    profiles.put_many([FULL])
    assert profiles.get("C1") == FULL
    newer = Profile("C1", subscriptions=frozenset({"CLOUD"}))
    assert profiles.put_many([newer]) == 1
    assert profiles.get("C1") == newer  # handset/segment/prefs/opt_out gone


def test_profile_put_many_counts_and_get_many(profiles: Profiles) -> None:
    ps = [Profile(f"C{i}", segment=str(i)) for i in range(5)]
    assert profiles.put_many(iter(ps)) == 5
    assert profiles.put_many([]) == 0
    got = profiles.get_many(["C0", "C4", "zz", "C0"])
    assert got == {"C0": ps[0], "C4": ps[4], "zz": Profile("zz")}


# --- GuardStore ------------------------------------------------------------------------


def req(push_id: str, now: int, *, customer: str = "C1", **kw: Any) -> GuardRequest:
    return GuardRequest(push_id, customer, now, **kw)


def test_guard_store_protocol(guards: GuardStore) -> None:
    assert isinstance(guards, GuardStore)
    assert guards.admit([]) == []


def test_same_push_id_is_duplicate(guards: GuardStore) -> None:
    assert guards.admit([req("p1", T0)]) == ["ok"]
    assert guards.admit([req("p1", T0 + 1)]) == ["duplicate"]
    assert guards.admit([req("p1", T0 + 5 * MIN)]) == ["duplicate"]
    assert guards.admit([req("p2", T0 + 1)]) == ["ok"]


def test_duplicate_expires_after_idempotency_ttl(guards: GuardStore) -> None:
    assert guards.admit([req("p1", T0, idempotency_ttl_ms=MIN)]) == ["ok"]
    assert guards.admit([req("p1", T0 + MIN - 1, idempotency_ttl_ms=MIN)]) == ["duplicate"]
    assert guards.admit([req("p1", T0 + MIN, idempotency_ttl_ms=MIN)]) == ["ok"]


def test_once_key_blocks_within_ttl_then_admits(guards: GuardStore) -> None:
    once: dict[str, Any] = {"once_key": "C1:welcome", "once_ttl_ms": 10 * MIN}
    assert guards.admit([req("p1", T0, **once)]) == ["ok"]
    assert guards.admit([req("p2", T0 + 10 * MIN - 1, **once)]) == ["once"]
    assert guards.admit([req("p3", T0 + 10 * MIN, **once)]) == ["ok"]
    assert guards.admit([req("p4", T0 + 15 * MIN, **once)]) == ["once"]
    # another key is independent
    assert guards.admit([req("p5", T0 + 15 * MIN, once_key="C1:other", once_ttl_ms=MIN)]) == [
        "ok"
    ]


def test_cap_within_window_then_admits_when_window_slides(guards: GuardStore) -> None:
    cap: dict[str, Any] = {"cap": 2, "cap_window_ms": 10 * MIN}
    assert guards.admit([req("p1", T0, **cap)]) == ["ok"]
    assert guards.admit([req("p2", T0 + MIN, **cap)]) == ["ok"]
    assert guards.admit([req("p3", T0 + 2 * MIN, **cap)]) == ["cap"]
    # other customers have their own cap
    assert guards.admit([req("q1", T0 + 2 * MIN, customer="C2", **cap)]) == ["ok"]
    # p1 leaves the window at T0 + 10 min: one slot again
    assert guards.admit([req("p4", T0 + 10 * MIN - 1, **cap)]) == ["cap"]
    assert guards.admit([req("p5", T0 + 10 * MIN, **cap)]) == ["ok"]
    assert guards.admit([req("p6", T0 + 10 * MIN + 1, **cap)]) == ["cap"]
    assert guards.admit([req("p7", T0 + 11 * MIN, **cap)]) == ["ok"]


def test_blocked_request_does_not_consume_cap(guards: GuardStore) -> None:
    cap: dict[str, Any] = {"cap": 2, "cap_window_ms": 60 * MIN}
    once: dict[str, Any] = {"once_key": "k", "once_ttl_ms": 60 * MIN}
    assert guards.admit([req("p1", T0, **cap, **once)]) == ["ok"]
    assert guards.admit([req("p1", T0 + 1, **cap)]) == ["duplicate"]
    assert guards.admit([req("p2", T0 + 2, **cap, **once)]) == ["once"]
    assert guards.admit([req("p3", T0 + 3, **cap)]) == ["ok"]  # slot 2 was still free
    assert guards.admit([req("p4", T0 + 4, **cap)]) == ["cap"]
    assert guards.admit([req("p5", T0 + 5, **cap)]) == ["cap"]  # a capped one takes none
    # a capped request records nothing: not its push id, not its once key
    assert guards.admit([req("p4", T0 + 61 * MIN, **cap)]) == ["ok"]
    assert guards.admit(
        [req("p6", T0 + 61 * MIN, cap=2, cap_window_ms=60 * MIN, once_key="k2",
             once_ttl_ms=MIN)]
    ) == ["ok"]


def test_order_within_one_batch(guards: GuardStore) -> None:
    cap: dict[str, Any] = {"cap": 2, "cap_window_ms": 60 * MIN}
    got = guards.admit(
        [
            req("p1", T0, **cap),
            req("p1", T0, **cap),  # recorded by the one before
            req("p2", T0 + 1, once_key="k", once_ttl_ms=MIN, **cap),
            req("p3", T0 + 2, once_key="k", once_ttl_ms=MIN, **cap),
            req("p4", T0 + 3, **cap),
            req("q1", T0 + 3, customer="C2", **cap),
        ]
    )
    assert got == ["ok", "duplicate", "ok", "once", "cap", "ok"]


def test_idempotency_beats_cap_and_once(guards: GuardStore) -> None:
    cap: dict[str, Any] = {"cap": 1, "cap_window_ms": 60 * MIN}
    assert guards.admit([req("p1", T0, once_key="k", once_ttl_ms=MIN, **cap)]) == ["ok"]
    # p1 again: both cap and once would block it, but it is reported as a duplicate
    assert guards.admit([req("p1", T0 + 1, once_key="k", once_ttl_ms=MIN, **cap)]) == [
        "duplicate"
    ]
    # once is checked before cap
    assert guards.admit([req("p2", T0 + 2, once_key="k", once_ttl_ms=MIN, **cap)]) == [
        "once"
    ]
    assert guards.admit([req("p3", T0 + 3, **cap)]) == ["cap"]


def test_no_cap_means_unlimited(guards: GuardStore) -> None:
    got = guards.admit([req(f"p{i}", T0 + i) for i in range(50)])
    assert got == ["ok"] * 50


def test_replay_decides_the_same(guards: GuardStore) -> None:
    """Decisions depend on the requests' times only, so a fresh store replays them."""
    cap: dict[str, Any] = {"cap": 2, "cap_window_ms": 5 * MIN}
    batch = [req(f"p{i}", T0 + i * MIN, **cap) for i in range(12)]
    first = guards.admit(batch)
    assert first == ["ok", "ok", "cap", "cap", "cap", "ok", "ok", "cap", "cap", "cap",
                     "ok", "ok"]
    again = guards.admit(batch)
    assert "ok" not in again  # a replay admits nothing new
    assert [d for d, f in zip(again, first, strict=True) if f == "ok"] == ["duplicate"] * 6
    assert InMemoryGuardStore().admit(batch) == first


def test_zero_idempotency_ttl_readmits_and_counts_cap(guards: GuardStore) -> None:
    r = req("p1", T0, idempotency_ttl_ms=0, cap=2, cap_window_ms=MIN)
    assert guards.admit([r, r, r]) == ["ok", "ok", "cap"]
    # a zero ttl still records "until now": an earlier time is a duplicate
    assert guards.admit([req("p1", T0 - 1, idempotency_ttl_ms=0)]) == ["duplicate"]


# --- customer scope, once for good, shared stores -------------------------------------


def test_push_id_and_once_key_are_per_customer(guards: GuardStore) -> None:
    once: dict[str, Any] = {"once_key": "welcome", "once_ttl_ms": 10 * MIN}
    assert guards.admit([req("p1", T0, **once)]) == ["ok"]
    # the same push id and once key for another customer are that customer's own
    assert guards.admit([req("p1", T0 + 1, customer="C2", **once)]) == ["ok"]
    assert guards.admit([req("p1", T0 + 2, customer="C2")]) == ["duplicate"]
    assert guards.admit([req("p2", T0 + 2, customer="C2", **once)]) == ["once"]
    assert guards.admit([req("p3", T0 + 2, **once)]) == ["once"]


def test_once_key_without_ttl_blocks_for_good(guards: GuardStore) -> None:
    assert GuardRequest("p", "C1", T0, once_key="k").once_until() == FOREVER_MS
    assert guards.admit([req("p1", T0, once_key="trial:5G")]) == ["ok"]
    assert guards.admit([req("p2", T0 + 400 * 24 * 60 * MIN, once_key="trial:5G")]) == ["once"]
    assert guards.admit([req("p3", T0 + 1, once_key="trial:CLOUD")]) == ["ok"]
    # a timed key of the same name as a for-good one of another customer is independent
    assert guards.admit([req("p4", T0, customer="C2", once_key="trial:5G",
                             once_ttl_ms=MIN)]) == ["ok"]
    assert guards.admit([req("p5", T0 + MIN, customer="C2", once_key="trial:5G",
                             once_ttl_ms=MIN)]) == ["ok"]


def test_many_customers_in_one_batch_keep_their_own_order(guards: GuardStore) -> None:
    """Requests of 40 customers interleaved in one batch (several cluster slots)."""
    cap: dict[str, Any] = {"cap": 2, "cap_window_ms": 60 * MIN}
    batch = []
    for i in range(4):
        for c in range(40):
            once = {"once_key": "k", "once_ttl_ms": MIN} if i == 3 else {}
            batch.append(req(f"p{i}", T0 + i, customer=f"cust-{c}", **cap, **once))
    got = guards.admit(batch)
    assert got == InMemoryGuardStore().admit(batch)
    assert got == ["ok"] * 80 + ["cap"] * 80
    # replaying the first two of every customer: duplicates, in the caller's order
    assert guards.admit(batch[:80]) == ["duplicate"] * 80


def test_request_for_push_carries_its_guard() -> None:
    g = PushGuard(once_key="cinema-pay", once_ttl_ms=24 * 60 * MIN, cap=3, cap_window_ms=MIN)
    p = Push("p1", "C1", "customer:C1", "cinema-pay", 1, {}, T0, {}, guard=g)
    assert GuardRequest.for_push(p) == GuardRequest(
        "p1", "C1", T0, once_key="cinema-pay", once_ttl_ms=24 * 60 * MIN, cap=3,
        cap_window_ms=MIN,
    )
    bare = Push("p2", "C1", "customer:C1", "r", 1, {}, T0, {})
    assert GuardRequest.for_push(bare) == GuardRequest("p2", "C1", T0)
    assert "guard" not in p.to_dict()  # never on the wire


def test_two_stores_share_cap_once_and_push_ids(
    guard_pair: tuple[GuardStore, GuardStore],
) -> None:
    """Two workers (or a restart with fresh flow state) sharing one store."""
    a, b = guard_pair
    cap: dict[str, Any] = {"cap": 3, "cap_window_ms": 24 * 60 * MIN}
    assert a.admit([req("p1", T0, **cap), req("p2", T0 + 1, **cap)]) == ["ok", "ok"]
    assert b.admit([req("q1", T0 + 2, **cap), req("q2", T0 + 3, **cap)]) == ["ok", "cap"]
    assert a.admit([req("p3", T0 + 4, **cap)]) == ["cap"]
    # once keys: what one admitted the other does not admit again
    once: dict[str, Any] = {"once_key": "cinema-pay", "once_ttl_ms": 24 * 60 * MIN}
    assert a.admit([req("x1", T0, customer="C2", **once)]) == ["ok"]
    assert b.admit([req("x2", T0 + 60 * MIN, customer="C2", **once)]) == ["once"]
    # a push id one admitted is a duplicate for the other
    assert b.admit([req("x1", T0 + 1, customer="C2")]) == ["duplicate"]
    assert a.admit([req("q1", T0 + 5, **cap)]) == ["duplicate"]


@pytest.mark.parametrize(
    "bad",
    [{"idempotency_ttl_ms": -1}, {"once_ttl_ms": -1}, {"cap": -1}, {"cap_window_ms": -1}],
)
def test_negative_guard_values_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="negative"):
        GuardRequest("p1", "C1", T0, once_key="k", **bad)


# --- QuotaStore (campaign-wide quota) -------------------------------------------------


@pytest.fixture
def quota_pair(clients: Clients | None) -> tuple[QuotaStore, QuotaStore]:
    """Two quota stores over the same state: two workers or processes."""
    if clients is None:
        shared = InMemoryQuotaStore()
        return shared, shared
    return RedisQuotaStore(clients.new()), RedisQuotaStore(clients.new())


def test_quota_store_protocol(quota_pair: tuple[QuotaStore, QuotaStore]) -> None:
    assert isinstance(quota_pair[0], QuotaStore)


def test_quota_admits_exactly_limit_and_is_idempotent_per_token(
    quota_pair: tuple[QuotaStore, QuotaStore],
) -> None:
    a, b = quota_pair
    assert [a.take("concert", 3, f"p{i}") for i in range(2)] == [True, True]
    assert b.take("concert", 3, "q0") is True
    assert b.take("concert", 3, "q1") is False  # full: the fourth is refused
    assert a.take("concert", 3, "p0") is True  # a replay of a winner keeps its place
    assert b.take("concert", 3, "q1") is False
    assert a.taken("concert") == b.taken("concert") == 3
    # campaigns are independent; a limit of 0 admits nobody
    assert a.take("other", 1, "p0") is True
    assert a.take("none", 0, "p0") is False and a.taken("none") == 0


def test_quota_never_exceeded_under_concurrent_takers(
    quota_pair: tuple[QuotaStore, QuotaStore],
) -> None:
    """Eight threads over two stores (two workers) race for 25 places, 400 tokens."""
    a, b = quota_pair
    won: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def run(k: int) -> None:
        store = a if k % 2 else b
        start.wait()
        for i in range(50):
            token = f"t{k}-{i}"
            if store.take("race", 25, token):
                with lock:
                    won.append(token)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 25 == len(set(won))
    assert a.taken("race") == 25


def test_quota_restore_puts_back_tokens_beyond_the_limit(
    quota_pair: tuple[QuotaStore, QuotaStore],
) -> None:
    a, b = quota_pair
    a.restore("c", ["p1", "p2"])
    b.restore("c", ["p2", "p3"])
    assert a.taken("c") == 3
    assert b.take("c", 3, "p1") is True and b.take("c", 3, "p4") is False
    a.restore("c", [])
    assert a.taken("c") == 3
