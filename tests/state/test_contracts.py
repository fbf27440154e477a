"""One set of contract tests for every ProfileStore and GuardStore implementation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from flows.model import Profile
from state.guards import GuardRequest, GuardStore, InMemoryGuardStore
from state.profiles import InMemoryProfileStore, ProfileStore
from state.redis_store import RedisGuardStore, RedisProfileStore

T0 = 1_700_000_000_000
MIN = 60_000

Profiles = InMemoryProfileStore | RedisProfileStore

IMPLS = ["memory", pytest.param("redis", marks=pytest.mark.integration)]


@pytest.fixture
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    url: str = request.getfixturevalue("redis_url")
    c = redis.Redis.from_url(url)
    yield c
    c.close()


@pytest.fixture(params=IMPLS)
def profiles(request: pytest.FixtureRequest) -> Profiles:
    if request.param == "memory":
        return InMemoryProfileStore()
    return RedisProfileStore(request.getfixturevalue("client"))


@pytest.fixture(params=IMPLS)
def guards(request: pytest.FixtureRequest) -> GuardStore:
    if request.param == "memory":
        return InMemoryGuardStore()
    return RedisGuardStore(request.getfixturevalue("client"))


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
