"""Snapshot part: what a recovery snapshot of the customer shards costs at each epoch.

Run when named (``python -m bench snapshot``); no broker or Redis is used. With a
recovery store, Bytewax asks every shard that saw an event for its snapshot at the end
of each snapshot interval (``recovery.snapshot_interval_s``, 10 s by default), and the
shard's logic packs it then, on the dataflow's thread: while it packs, no event moves.

The part fills 64 shard engines (as the flow's default ``engine.shards``) with the
memory part's population (:func:`bench.memory.population`: 1 to 3 network events per
customer, one in 15 plays a terminal session), 1,000,000 customers, through the real
decoder and the live engine path. Then each run:

* sends one network event to each of 50,000 customers picked at random (5k events/s for
  one 10 s interval, every event a different customer: the most customers an interval
  at that rate can change);
* times the incremental snapshot every shard takes in the flow (``ShardEngine`` made
  ``incremental``, as ``build_flow`` makes it with a recovery store: only changed
  customers are packed again) and, over the very same state, the full snapshot (the
  engine without ``incremental``, which was every snapshot before; the baseline);
  both as the flow's shard logic does it, ``pack(engine.snapshot())``; and an
  incremental one right after, with no customer changed (the floor: every customer's
  kept bytes encoded again);
* times storing each as Bytewax's SQLite recovery partition does (both hold every
  customer, so both weigh about the same), each in its own file, twice (once before the
  other kind and once after: the first write in a row is slower), and takes the mean;
* times a restore from each (``ShardEngine`` built from the decoded snapshot, one
  shard at a time; the full one into an engine without ``incremental``, as before), and
  weighs each snapshot and the packed map an incremental engine keeps between
  snapshots (``sys.getsizeof`` of the bytes and of the map).

The population is built once; each run changes a new sample of customers. A shard
that saw no event in an interval is not asked for a snapshot at all, so the figures
are the cost when every shard did (as at any real rate).
"""

from __future__ import annotations

import pickle
import random
import sqlite3
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.core import BenchContext, PartResult
from bench.memory import SyntheticProfiles, customer_id, population
from flows.codec import json_dumps, pack, unpack
from flows.engine import EngineConfig, ShardEngine, shard_of
from flows.model import Envelope, RawRecord, decode_record
from flows.rules import RuleSet, load_default_rules
from flows.runner import tune_gc

__all__ = ["FULL", "QUICK", "run"]

PART = "snapshot"
SHARDS = 64
FULL = {"customers": 1_000_000, "changed": 50_000}
QUICK = {"customers": 5_000, "changed": 500}
EVENT_GAP_MS = 43  # simulated time between population events (about a day for 2M)
INTERVAL_S = 10.0  # the default recovery.snapshot_interval_s


class _Shards:
    """The shard engines and the simulated clock that feeds them."""

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self.store = SyntheticProfiles()  # profiles from the id, none held
        self.config = EngineConfig(shards=SHARDS)
        self.engines = [ShardEngine(i, rules, self.store, self.config, incremental=True)
                        for i in range(SHARDS)]
        self.now = 1_800_000_000_000
        self.pushes = 0

    def feed(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Decode and apply ``(topic, event without ts)`` in order, live."""
        out: list[Any] = []
        for topic, doc in events:
            self.now += EVENT_GAP_MS
            doc["ts"] = self.now
            env = decode_record(RawRecord(f"{topic}/0", 0, json_dumps(doc)))
            if type(env) is not Envelope:
                raise RuntimeError(f"a population event did not decode: {env}")
            self.engines[shard_of(env.event.customer_id, SHARDS)].on_live_event(
                env, self.now, out)
        self.pushes += sum(1 for x in out if type(x).__name__ == "Push")

    def full_view(self, eng: ShardEngine) -> ShardEngine:
        """An engine without ``incremental`` over ``eng``'s very state (the baseline)."""
        full = ShardEngine(eng.shard, self.rules, self.store, self.config)
        full.customers, full.timers, full.buffer = eng.customers, eng.timers, eng.buffer
        full.wm, full.next_sweep, full.taken = eng.wm, eng.next_sweep, eng.taken
        return full

    def held(self) -> int:
        return sum(len(e.customers) for e in self.engines)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


class _Store:
    """A recovery partition's ``snaps`` table as Bytewax 0.21.1 writes it (SQLite in WAL
    mode, one row per state key and epoch holding the pickled snapshot, rows older than
    the kept epoch deleted): what storing a snapshot costs beside packing it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.con = sqlite3.connect(path)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("CREATE TABLE IF NOT EXISTS snaps (step_id TEXT NOT NULL, "
                         "state_key TEXT NOT NULL, snap_epoch INTEGER NOT NULL, "
                         "ser_change BLOB, PRIMARY KEY (step_id, state_key, snap_epoch))")
        self.epoch = 0

    def write(self, snaps: list[bytes]) -> None:
        """Store one epoch's snapshots and drop the epoch before it."""
        self.epoch += 1
        with self.con:
            self.con.executemany(
                "INSERT INTO snaps VALUES ('experience.customers', ?, ?, ?)",
                [(str(i), self.epoch, pickle.dumps(b)) for i, b in enumerate(snaps)])
            self.con.execute("DELETE FROM snaps WHERE snap_epoch < ?", (self.epoch,))

    def close(self) -> None:
        self.con.close()


def _restore_s(snaps: list[bytes], shards: _Shards, *, incremental: bool) -> float:
    total = 0.0
    for blob in snaps:  # one shard at a time: one shard's copy in memory at once
        t = time.perf_counter()
        eng = ShardEngine(0, shards.rules, shards.store, shards.config, unpack(blob),
                          incremental=incremental)
        total += time.perf_counter() - t
        del eng
    return total


def _plot(result: PartResult, path: Path, customers: int, changed: int) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = [("snapshot, full (before)", "full snapshot, every shard"),
             ("snapshot, incremental", "incremental snapshot, every shard"),
             ("store incremental (SQLite)",
              "storing the incremental snapshots (SQLite, as Bytewax)"),
             ("restore, full", "restore from a full snapshot"),
             ("restore, incremental", "restore from an incremental snapshot")]
    meds = [result.figure(f, "s").median for _, f in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    labels = [n for n, _ in names][::-1]
    ax.barh(labels, meds[::-1], color=["#55a868", "#55a868", "#8172b2", "#4c72b0", "#c44e52"])
    for y, v in enumerate(meds[::-1]):
        ax.text(v, y, f" {v:.2f} s", va="center")
    ax.set_xlabel("seconds (median of runs), all 64 shards")
    ax.set_title(f"{customers:,} customers held, {changed:,} changed since the last snapshot")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx: BenchContext) -> PartResult:
    """Build the population once, then measure ``ctx.runs`` snapshot intervals."""
    size = QUICK if ctx.quick else FULL
    n, changed = size["customers"], size["changed"]
    result = PartResult(PART)
    tune_gc(50_000)  # as the engine's process runs (engine.gc_gen0_threshold)
    shards = _Shards(load_default_rules())
    t_build = time.perf_counter()
    for _seen, block in population(n, seed=7):
        shards.feed(block)
    build_s = time.perf_counter() - t_build
    held = shards.held()
    # The first snapshot packs every customer (each one is new since the start).
    first_s, _ = _timed(lambda: [pack(e.snapshot()) for e in shards.engines])
    rng = random.Random(11)
    # one recovery partition for each kind, each holding its epoch before
    first = [pack(e.snapshot()) for e in shards.engines]
    store, store_full = (_Store(ctx.work_dir / kind / "part-0.sqlite3")
                         for kind in ("incremental", "full"))
    store.write(first)
    store_full.write(first)
    del first
    for _ in range(ctx.runs):
        sample = rng.sample(range(n), changed)
        shards.feed([("net.location", {"type": "location", "customer_id": customer_id(i),
                                       "cell_id": "cell-7", "poi": "mall",
                                       "poi_id": "mall-3"}) for i in sample])
        inc_s, inc = _timed(lambda: [pack(e.snapshot()) for e in shards.engines])
        # the floor of an incremental snapshot: nothing changed, every customer's bytes
        # kept, the map encoded again
        floor_s, _ = _timed(lambda: [pack(e.snapshot()) for e in shards.engines])
        full_s, full = _timed(lambda: [pack(shards.full_view(e).snapshot())
                                       for e in shards.engines])
        # whichever store writes first in a row is slower here (about 0.37 s against
        # 0.24 s at 1M customers, either kind): each kind writes once first and once
        # second, and its figure is the mean of the two
        a, _ = _timed(partial(store.write, inc))
        b, _ = _timed(partial(store_full.write, full))
        b2, _ = _timed(partial(store_full.write, full))
        a2, _ = _timed(partial(store.write, inc))
        store_s, store_full_s = (a + a2) / 2, (b + b2) / 2
        kept = sum(sys.getsizeof(e._packed) + sum(map(sys.getsizeof, e._packed.values()))
                   for e in shards.engines)
        result.figure("full snapshot, every shard", "s", higher_is_better=False) \
            .values.append(full_s)
        result.figure("incremental snapshot, every shard", "s", higher_is_better=False) \
            .values.append(inc_s)
        result.figure("incremental snapshot, no customer changed", "s",
                      higher_is_better=False).values.append(floor_s)
        result.figure("full/incremental snapshot time", "ratio").values.append(full_s / inc_s)
        result.figure("storing the incremental snapshots (SQLite, as Bytewax)", "s",
                      higher_is_better=False).values.append(store_s)
        result.figure("storing the full snapshots (SQLite, as Bytewax)", "s",
                      higher_is_better=False).values.append(store_full_s)
        every = f"{INTERVAL_S:.0f} s"
        result.figure(f"incremental: pack + store, share of each {every}", "share",
                      higher_is_better=False).values.append((inc_s + store_s) / INTERVAL_S)
        result.figure(f"full: pack + store, share of each {every}", "share",
                      higher_is_better=False).values.append((full_s + store_full_s) / INTERVAL_S)
        result.figure("full snapshot size per customer", "B", higher_is_better=False) \
            .values.append(sum(map(len, full)) / held)
        result.figure("incremental snapshot size per customer", "B",
                      higher_is_better=False).values.append(sum(map(len, inc)) / held)
        result.figure("packed map kept between snapshots, per customer", "B",
                      higher_is_better=False).values.append(kept / held)
        result.figure("restore from a full snapshot", "s", higher_is_better=False) \
            .values.append(_restore_s(full, shards, incremental=False))  # as before
        result.figure("restore from an incremental snapshot", "s", higher_is_better=False) \
            .values.append(_restore_s(inc, shards, incremental=True))
        del inc, full
    store.close()
    store_full.close()
    result.extra.update({"customers held": held, "changed per run": changed,
                         "population build s": round(build_s, 1),
                         "first incremental snapshot s (every customer new)":
                             round(first_s, 3),
                         "pushes while building": shards.pushes})
    plot = ctx.results_path(PART, ".png")
    _plot(result, plot, held, changed)
    result.plots.append(plot)
    result.notes.append(
        f"{held:,} customers in {SHARDS} shards (the memory part's population, built once "
        f"in {build_s:.0f} s); each run sends one location event to {changed:,} customers "
        "picked at random, then takes the incremental snapshot every shard takes in a flow "
        "with a recovery store and the full one (the baseline) of the same state, and "
        "stores each as Bytewax's SQLite recovery partition does; 'share "
        f"of each {INTERVAL_S:.0f} s' is packing plus storing over the default snapshot "
        "interval (the shards pack on the dataflow's thread: meanwhile no event moves)")
    return result
