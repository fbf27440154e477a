"""Timer reads part: what firing many due ``help-sprite`` timers at once costs the engine.

Run when named (``python -m bench timer_reads``); it needs only the redis-server the
suite starts. A dwell timer fires long after the click that set it (90 s for
``help-sprite``), past the profile cache (5 s), so the profile its rule reads comes from
Redis. Until the change this part was written for, ``ShardEngine`` read it with one
round trip per fired timer, one after the other; now :meth:`ShardEngine.fire_due` reads
the profiles of every timer due at that moment in one round trip. Many timers come due
at once after any pause: a restart from a snapshot, a stalled worker, a Redis outage.

Each run sets up two identical shard engines with the Redis profile store the engine
uses (workload profiles under a key prefix of their own): ``N`` customers each open a
session and enter a step, through the live intake, their step entries 1 ms apart, so
their timers come due 1 ms apart. The store's clock is then moved past its cache age, as
90 s would, and the timers are fired two ways, in the same run:

* ``one due per call`` (the baseline: the cost of the old per-timer read): ``fire_due``
  at each timer's deadline in turn, so each call fires one timer and reads one profile;
* ``all due at once`` (how a pause ends): one ``fire_due`` past the last deadline.

Both must fire the same pushes and alerts, or the part fails. Figures per fired timer:
wall and CPU (this process's, the client's: the Redis server's work is in wall only),
and the profile reads' Redis round trips (the engine's own
``touchstream_redis_rtt_seconds{op="profile_get"}`` count).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from prometheus_client import REGISTRY

from bench.core import BenchContext, PartResult
from bench.workload import customer_id, drop_profiles, load_profiles, profiles
from flows.codec import json_dumps
from flows.engine import EngineConfig, ShardEngine
from flows.experience import LiveIntake
from flows.model import DEFAULT_LIMITS, RawRecord
from flows.rules import load_default_rules
from flows.settings import RedisSettings
from state.guards import InMemoryQuotaStore
from state.redis_store import RedisProfileStore

__all__ = ["FULL", "QUICK", "WAYS", "run"]

PART = "timer_reads"
PREFIX = "bench-timer-reads:"
NOW_MS = 1_790_000_000_000
RULES = load_default_rules()
DWELL_MS = next(r.trigger.dwell for r in RULES.rules if r.id == "help-sprite")
"""``help-sprite``'s dwell in the default rules (90 s)."""
CACHE_TTL_S = RedisSettings().profile_cache_ttl_s
"""The profile cache's age bound the engine runs with by default (5 s)."""
WAYS = ("one due per call", "all due at once")


@dataclass(frozen=True)
class Size:
    """The numbers of timers due together, one figure set each."""

    timers: tuple[int, ...]


FULL = Size(timers=(100, 1_000, 10_000))
QUICK = Size(timers=(10, 100))


class _Clock:
    """The profile store's clock, moved by hand (seconds)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _step_records(n: int) -> list[RawRecord]:
    """Per customer: session start, module enter, step enter, 1 ms after the previous
    customer's, so the timers are due 1 ms apart."""
    out: list[RawRecord] = []
    for i in range(n):
        cid = customer_id(i)
        ts = NOW_MS + i
        base = {"type": "click", "customer_id": cid, "ts": ts, "terminal_id": "H01-T01",
                "hall_id": "H01"}
        for action, extra in (("session_start", {}), ("module_enter", {"module": "remote_cam"}),
                              ("step_enter", {"module": "remote_cam", "step": "pair"})):
            doc = {**base, "action": action, **extra}
            out.append(RawRecord("touch.clicks/0", len(out), json_dumps(doc), cid.encode()))
    return out


def _engine(client: redis.Redis, clock: _Clock, n: int) -> ShardEngine:
    """An engine with ``n`` customers on a step (their profiles read, then aged out)."""
    clock.t = 0.0
    store = RedisProfileStore(client, CACHE_TTL_S, now=clock, prefix=PREFIX)
    eng = ShardEngine(0, RULES, store, EngineConfig(shards=1),
                      quota=InMemoryQuotaStore())
    intake = LiveIntake(DEFAULT_LIMITS, 300_000, 86_400_000, 3_600_000)
    now = NOW_MS + n
    eng.on_live_batch(intake([_step_records(n)], now, []), now, [])
    clock.t = DWELL_MS / 1000  # the timers' moment: the cache entries are past their age
    return eng


def _round_trips() -> float:
    """Profile reads so far in this process, as the engine's metric counts them."""
    got = REGISTRY.get_sample_value("touchstream_redis_rtt_seconds_count",
                                    {"op": "profile_get"})
    return got if got is not None else 0.0


def _fire(eng: ShardEngine, way: str, n: int) -> list[Any]:
    out: list[Any] = []
    if way == WAYS[0]:
        for i in range(n):
            eng.fire_due(NOW_MS + i + DWELL_MS, out)  # customer i's deadline: one due
    else:
        eng.fire_due(NOW_MS + n + DWELL_MS, out)
    return out


def _time(eng: ShardEngine, way: str, n: int) -> tuple[float, float, float, list[Any]]:
    """Wall and CPU seconds of firing the timers one way, its profile-read round trips,
    and what it fired."""
    r0 = _round_trips()
    c0, w0 = time.process_time(), time.perf_counter()
    out = _fire(eng, way, n)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return wall, cpu, _round_trips() - r0, out


def _plot(result: PartResult, sizes: tuple[int, ...], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / len(WAYS)
    for k, way in enumerate(WAYS):
        meds = [result.figure(f"{way}, {n:,} timers, wall per timer", "us").median
                for n in sizes]
        xs = [i + k * width for i in range(len(sizes))]
        ax.bar(xs, meds, width=width, label=way)
        for x, v in zip(xs, meds, strict=True):
            ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([i + width * (len(WAYS) - 1) / 2 for i in range(len(sizes))],
                  [f"{n:,} timers" for n in sizes])
    ax.set_ylabel("µs wall per fired timer (median)")
    ax.legend(fontsize=8)
    fig.suptitle("Firing help-sprite timers with profiles in Redis, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx: BenchContext) -> PartResult:
    """Load the profiles, fire the timers both ways ``ctx.runs`` times, drop the profiles."""
    sizes = (QUICK if ctx.quick else FULL).timers
    result = PartResult(PART)
    for n in sizes:  # the table's order
        for what, unit in (("wall", "us"), ("CPU", "us"), ("Redis round trips", "round trips")):
            for way in WAYS:
                result.figure(f"{way}, {n:,} timers, {what} per timer", unit,
                              higher_is_better=False)
        result.figure(f"all at once / one per call, {n:,} timers, wall", "ratio",
                      higher_is_better=False)
    client = redis.Redis.from_url(ctx.redis_url)
    clock = _Clock()
    try:
        drop_profiles(client, PREFIX)
        load_profiles(client, profiles(max(sizes)), PREFIX)
        for r in range(ctx.runs):
            for n in sizes:
                fired: dict[str, list[Any]] = {}
                for way in random.Random(r * 31 + n).sample(WAYS, len(WAYS)):  # no fixed order
                    eng = _engine(client, clock, n)
                    wall, cpu, reads, fired[way] = _time(eng, way, n)
                    for what, v in (("wall", wall * 1e6 / n), ("CPU", cpu * 1e6 / n),
                                    ("Redis round trips", reads / n)):
                        result.figure(f"{way}, {n:,} timers, {what} per timer", "").values \
                            .append(v)
                if fired[WAYS[0]] != fired[WAYS[1]]:
                    raise RuntimeError(f"the two ways fired different outputs ({n} timers)")
                helps = sum(1 for x in fired[WAYS[1]] if getattr(x, "rule_id", "") ==
                            "help-sprite")
                if helps != n:
                    raise RuntimeError(f"{helps} help-sprite pushes for {n} due timers")
                result.append_ratio(f"all at once / one per call, {n:,} timers, wall",
                                    f"{WAYS[1]}, {n:,} timers, wall per timer",
                                    f"{WAYS[0]}, {n:,} timers, wall per timer")
    finally:
        drop_profiles(client, PREFIX)
        client.close()
    plot = ctx.results_path(PART, ".png")
    _plot(result, sizes, plot)
    result.plots.append(plot)
    result.extra.update(timers=list(sizes), check="both ways fired equal outputs, "
                        "one help-sprite push per timer, in every run")
    result.notes.append(
        "help-sprite timers of customers on a step, their profiles in Redis and out of the "
        "store's cache; CPU is this process's (the client's), wall includes the Redis "
        "server's work; round trips are the engine's profile_get count")
    return result
