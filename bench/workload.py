"""The benchmark workload: a realistic, seeded mix of the three customer streams.

80 % network signals (location and call volumes), 20 % terminal clicks, spread over a
fixed population of customers (100,000 by default). Click sessions are coherent per
customer (start, module, step enter/exit, help, order, end), so the default rules
fire: cinema visits trigger ``cinema-pay``, call bursts ``call-spike``, sessions of
care-link subscribers ``setup-first`` and so on. Generation is deterministic for a
given seed, so every contender in a run reads byte-identical topics.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import redis

from connectors.demo import HALLS, MODULES
from flows.codec import json_dumps
from flows.model import Profile
from state.redis_store import RedisProfileStore

__all__ = ["Workload", "customer_id", "drop_profiles", "load_profiles", "profiles",
           "session_script"]

POIS = ("mall", "stadium", "office", "cinema", "home", None)
STEPS = ("intro", "pair", "door_sensor_setup", "confirm")


def customer_id(i: int) -> str:
    """The i-th benchmark customer (11 digits, like a phone number)."""
    return f"137{i:08d}"


def profiles(customers: int, seed: int = 1) -> Iterator[Profile]:
    """A profile for every customer: some subscriptions, music prefs, segments."""
    rng = random.Random(seed)
    for i in range(customers):
        subs = frozenset(m for m in MODULES if rng.random() < 0.15)
        yield Profile(
            customer_id(i),
            subscriptions=subs,
            configured=frozenset(m for m in sorted(subs) if rng.random() < 0.5),
            segment=rng.choice(("youth", "family", "senior", None)),
            prefs={"music": ("jazz",)} if rng.random() < 0.2 else {},
        )


@dataclass
class Workload:
    """A seeded event generator. ``events(n, start_ms, span_ms)`` yields
    ``(topic_kind, customer_id, json bytes)`` with event times spread over the span."""

    customers: int = 100_000
    seed: int = 1
    click_share: float = 0.2

    def events(self, n: int, start_ms: int, span_ms: int) -> Iterator[tuple[str, str, bytes]]:
        """``n`` events; ``topic_kind`` is ``clicks``, ``location`` or ``calls``."""
        rng = random.Random(self.seed)
        # Per-customer click session state: index into a session script.
        open_sessions: dict[int, list[dict[str, object]]] = {}
        for k in range(n):
            ts = start_ms + (span_ms * k) // max(n, 1)
            roll = rng.random()
            if roll < self.click_share:
                i = rng.randrange(self.customers)
                script = open_sessions.get(i)
                if not script:
                    script = open_sessions[i] = session_script(rng, customer_id(i))
                ev = script.pop(0)
                if not script:
                    del open_sessions[i]
                ev["ts"] = ts
                yield "clicks", customer_id(i), json_dumps(ev)
                continue
            i = rng.randrange(self.customers)
            cid = customer_id(i)
            if roll < self.click_share + (1 - self.click_share) / 2:
                poi = rng.choice(POIS)
                doc: dict[str, object] = {"type": "location", "customer_id": cid, "ts": ts,
                                          "cell_id": f"cell-{rng.randrange(500)}"}
                if poi is not None:
                    doc["poi"] = poi
                    doc["poi_id"] = f"{poi}-{rng.randrange(20)}"
                yield "location", cid, json_dumps(doc)
            else:
                burst = rng.random() < 0.02
                total = rng.randrange(12, 20) if burst else rng.randrange(0, 5)
                yield "calls", cid, json_dumps({
                    "type": "calls", "customer_id": cid, "ts": ts, "interval_s": 300,
                    "calls_in": total - total // 3, "calls_out": total // 3,
                    "missed": rng.randrange(0, 2)})


def session_script(rng: random.Random, cid: str, hall: str | None = None,
                   term: str | None = None) -> list[dict[str, object]]:
    """One coherent terminal session of ``cid`` (start, module, steps, maybe help, a demo
    or an order, end); the hall and terminal are drawn from ``rng`` unless given."""
    if hall is None:
        hall = rng.choice(HALLS)
    if term is None:
        term = f"{hall}-T{rng.randrange(40):02d}"

    def click(action: str, module: str | None = None, step: str | None = None) -> dict[str, object]:
        ev: dict[str, object] = {"type": "click", "customer_id": cid, "terminal_id": term,
                                 "hall_id": hall, "action": action}
        if module:
            ev["module"] = module
        if step:
            ev["step"] = step
        return ev

    module = rng.choice(MODULES)
    out = [click("session_start"), click("module_enter", module)]
    for step in STEPS[: rng.randrange(1, len(STEPS) + 1)]:
        out.append(click("step_enter", module, step))
        if rng.random() < 0.1:
            out.append(click("help", module, step))
            break
        out.append(click("step_exit", module, step))
    if rng.random() < 0.3:
        out.append(click("demo_play", module))
    if rng.random() < 0.1:
        out.append(click("order", module))
    out.append(click("session_end"))
    return out


def load_profiles(client: redis.Redis, population: Iterable[Profile], prefix: str) -> None:
    """Write profiles as the engine's Redis store keeps them, under ``prefix``, 5,000 per
    round trip (a part's own prefix: never the engine's ``profile:``)."""
    store = RedisProfileStore(client, prefix=prefix)
    batch: list[Profile] = []
    for p in population:
        batch.append(p)
        if len(batch) == 5_000:
            store.put_many(batch)
            batch = []
    if batch:
        store.put_many(batch)


def drop_profiles(client: redis.Redis, prefix: str) -> None:
    """Delete every key under ``prefix`` (what :func:`load_profiles` wrote)."""
    keys = list(client.scan_iter(match=prefix + "*", count=10_000))
    for i in range(0, len(keys), 10_000):
        client.unlink(*keys[i : i + 10_000])
