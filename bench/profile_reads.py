"""Profile reads part: what reading one customer's profile from Redis costs the engine.

Run when named (``python -m bench profile_reads``); it needs only the redis-server the
suite starts. A py-spy profile of the throughput part's ``touchstream 1p`` process found
``RedisProfileStore.prefetch`` at about 31 % of its main thread: clicks are 20 % of the
events and come from 100,000 customers, so most are cache misses, read per batch.

Each run loads the workload's profiles (:func:`bench.workload.profiles`) under a key
prefix of its own, then reads batches of random customers three ways, in the same run,
every profile uncached (``cache_ttl_s=0``), timing wall clock and this process's CPU
(client side: the Redis server's own work is in the wall figure only):

* ``HGETALL pipeline`` (the baseline, how the store read until commit ``ee4653d``): a
  pipeline of one ``HGETALL`` per customer, each hash decoded with no memo;
* ``script, no memo``: the store as it reads now (one ``EVALSHA_RO`` per batch, ``HMGET``
  of the known fields per key inside it), with its decode memo off;
* ``script + memo``: the store as the engine uses it (memo of 4,096 value tuples).

Batch sizes: 1,000 (a full consume batch of the clicks partition under load) and 100.
The workload's profiles repeat their values (few subscription sets and segments, no
trials), so the memo hits often here; the note gives how many distinct value tuples
there are. A population whose hashes are mostly distinct (per-customer trial times)
gets the ``script, no memo`` figure.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.core import BenchContext, PartResult
from bench.workload import customer_id, drop_profiles, load_profiles, profiles
from flows.model import Profile
from state.redis_store import PROFILE_FIELDS, ProfileDecoder, RedisProfileStore, encode_profile

__all__ = ["FULL", "QUICK", "Size", "run"]

PART = "profile_reads"
PREFIX = "bench-profile-reads:"


@dataclass(frozen=True)
class Size:
    """How big a run is: the profiles loaded, the ids read per batch size, the sizes."""

    customers: int
    ids_per_size: int
    sizes: tuple[int, ...]


FULL = Size(customers=100_000, ids_per_size=50_000, sizes=(1_000, 100))
QUICK = Size(customers=2_000, ids_per_size=1_000, sizes=(100, 10))
WAYS = ("HGETALL pipeline", "script, no memo", "script + memo")


def _baseline(client: redis.Redis, decoder: ProfileDecoder) -> Callable[[Sequence[str]],
                                                                       dict[str, Profile]]:
    """The store's read before ``ee4653d``: a pipeline of HGETALL, every hash decoded."""

    def read(ids: Sequence[str]) -> dict[str, Profile]:
        pipe = client.pipeline(transaction=False)
        for cid in ids:
            pipe.hgetall(PREFIX + cid)
        return {cid: decoder.decode_hash(cid, raw)
                for cid, raw in zip(ids, pipe.execute(), strict=True)}

    return read


def _time(read: Callable[[Sequence[str]], dict[str, Profile]],
          batches: list[list[str]]) -> tuple[float, float, list[dict[str, Profile]]]:
    """Wall and CPU microseconds per id over all batches, and what was read."""
    n = sum(len(b) for b in batches)
    c0, w0 = time.process_time(), time.perf_counter()
    got = [read(b) for b in batches]
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return wall * 1e6 / n, cpu * 1e6 / n, got


def _plot(result: PartResult, sizes: Sequence[int], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, what in zip(axes, ("wall", "CPU"), strict=True):
        width = 0.8 / len(sizes)
        for k, size in enumerate(sizes):
            meds = [result.figure(f"{way}, batch {size:,}, {what} per profile", "us").median
                    for way in WAYS]
            ys = [i + k * width for i in range(len(WAYS))]
            ax.barh(ys, meds, height=width, label=f"batch {size:,}")
            for y, v in zip(ys, meds, strict=True):
                ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
        ax.set_yticks([i + width * (len(sizes) - 1) / 2 for i in range(len(WAYS))], WAYS)
        ax.invert_yaxis()
        ax.set_xlabel(f"µs {what} per profile (median of runs)")
    axes[0].legend(loc="upper right", fontsize=8)  # the short bars are at the top
    fig.suptitle("Reading uncached profiles from Redis, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx: BenchContext) -> PartResult:
    """Load the profiles, time the three ways ``ctx.runs`` times, drop the profiles."""
    size = QUICK if ctx.quick else FULL
    sizes, customers = size.sizes, size.customers
    result = PartResult(PART)
    population = list(profiles(customers))
    distinct = len({tuple(encode_profile(p).get(f) for f in PROFILE_FIELDS)
                    for p in population})
    for n in sizes:  # the table's order: per batch size, the three ways, then the ratios
        for what in ("wall", "CPU"):
            for way in WAYS:
                result.figure(f"{way}, batch {n:,}, {what} per profile", "us",
                              higher_is_better=False)
        for what in ("wall", "CPU"):
            result.figure(f"script + memo / HGETALL pipeline, batch {n:,}, {what}", "ratio",
                          higher_is_better=False)
    client = redis.Redis.from_url(ctx.redis_url)
    try:
        drop_profiles(client, PREFIX)
        load_profiles(client, population, PREFIX)
        rng = random.Random(7)
        for _ in range(ctx.runs):
            # fresh each run: an empty memo, nothing cached
            readers: dict[str, Callable[[Sequence[str]], dict[str, Profile]]] = {
                WAYS[0]: _baseline(client, ProfileDecoder(0)),
                WAYS[1]: RedisProfileStore(client, cache_ttl_s=0, prefix=PREFIX,
                                           decode_memo=0).get_many,
                WAYS[2]: RedisProfileStore(client, cache_ttl_s=0, prefix=PREFIX).get_many,
            }
            for n in sizes:
                batches = [[customer_id(rng.randrange(customers)) for _ in range(n)]
                           for _ in range(max(1, size.ids_per_size // n))]
                reads: dict[str, Any] = {}
                for way in random.Random(n).sample(WAYS, len(WAYS)):  # no fixed order
                    wall, cpu, reads[way] = _time(readers[way], batches)
                    result.figure(f"{way}, batch {n:,}, wall per profile", "us",
                                  higher_is_better=False).values.append(wall)
                    result.figure(f"{way}, batch {n:,}, CPU per profile", "us",
                                  higher_is_better=False).values.append(cpu)
                if not reads[WAYS[0]] == reads[WAYS[1]] == reads[WAYS[2]]:
                    raise RuntimeError(f"the three ways read different profiles (batch {n})")
                for what in ("wall", "CPU"):
                    result.append_ratio(f"script + memo / HGETALL pipeline, batch {n:,}, {what}",
                                        f"{WAYS[2]}, batch {n:,}, {what} per profile",
                                        f"{WAYS[0]}, batch {n:,}, {what} per profile")
    finally:
        drop_profiles(client, PREFIX)
        client.close()
    plot = ctx.results_path(PART, ".png")
    _plot(result, sizes, plot)
    result.plots.append(plot)
    result.extra.update(customers=customers, distinct_value_tuples=distinct,
                        read_check="the three ways read equal profiles in every run")
    result.notes.append(
        f"{customers:,} workload profiles, {distinct:,} distinct value tuples among them "
        "(the memo hits often); random customers, every read uncached; CPU is this "
        "process's (the client's), wall includes the Redis server's work")
    return result
