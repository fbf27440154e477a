"""Epoch-grid part: what the epoch grid of multi-worker runs costs the 2-process engine.

With more than one worker in all, the engine wraps every input partition in
:class:`connectors.wrapped.EpochGrid`: each worker's epochs end on a fixed schedule, and
the input reads nothing in the ``engine.epoch_quiet_ms`` (20 ms) before each epoch end
(``bench/README.md``, "Workers of one dataflow drift apart"). This part measures what
that costs in throughput: pairs of the throughput part's ``touchstream 2p`` contender
(the full flow on a 2-process cluster, 1 s epochs), one with the grid (the default) and
one with ``TOUCHSTREAM_ENGINE__EPOCH_QUIET_MS=0``, on the same fresh dataset, in an order
that alternates from pair to pair. Each run is a few seconds long, too short for the
drift the grid prevents to grow: this is only the grid's cost.

Figures: each arm's events/s, and per pair the rate without the grid over the rate with
it. Not in the default ``make bench``: ``python -m bench epoch_grid --runs N`` (N pairs;
about 40 s a pair); its quick mode is in ``make test``
(``tests/bench/test_epoch_grid_quick.py``).
"""

from __future__ import annotations

import uuid

from bench import throughput
from bench.contenders import run_contender
from bench.core import BenchContext, PartResult
from bench.dataset import delete_dataset, produce_dataset
from bench.workload import Workload

__all__ = ["ARMS", "PART", "run"]

PART = "epoch_grid"
ARMS: dict[str, dict[str, str]] = {
    "grid on": {},  # the engine's default
    "grid off": {"TOUCHSTREAM_ENGINE__EPOCH_QUIET_MS": "0"},
}
"""Each arm: what it sets in the contender's environment."""


def run(ctx: BenchContext) -> PartResult:
    """``ctx.runs`` pairs (quick: 1, tiny) of the 2-process engine, grid on and off."""
    size = throughput.QUICK if ctx.quick else throughput.FULL
    n, customers = size["events"], size["customers"]
    result = PartResult(PART)
    rates = {arm: result.figure(f"touchstream 2p events/s, {arm}", "events/s")
             for arm in ARMS}
    ratio = result.figure("touchstream 2p, grid off / grid on", "ratio",
                          higher_is_better=False)
    pairs: list[dict[str, float]] = []
    quiet_ms: dict[str, list[int]] = {arm: [] for arm in ARMS}
    work = ctx.work_dir / f"{PART}-{uuid.uuid4().hex[:6]}"
    for i in range(ctx.run_count):
        ds = produce_dataset(ctx.brokers, f"bench.eg{i + 1}.{uuid.uuid4().hex[:6]}.", n,
                             Workload(customers, throughput.SEED),
                             partitions=throughput.PARTITIONS)
        order = list(ARMS) if i % 2 == 0 else list(reversed(ARMS))
        pair: dict[str, float] = {}
        try:
            for arm in order:
                doc = run_contender(
                    "touchstream", brokers=ctx.brokers, topics=ds.topic_names, expect=n,
                    result=work / f"pair{i + 1}" / f"{arm.replace(' ', '-')}.json",
                    redis_url=ctx.redis_url, processes=2, env=ARMS[arm],
                    timeout_s=60.0 + n / 2_000)
                pair[arm] = float(doc["rate"])
                quiet_ms[arm].append(int(doc["epoch_quiet_ms"]))
                rates[arm].values.append(pair[arm])
        finally:
            delete_dataset(ds)
        ratio.values.append(pair["grid off"] / pair["grid on"])
        pairs.append(pair)
    result.extra["pairs"] = pairs
    result.extra["epoch_quiet_ms"] = quiet_ms  # what each arm's engine ran with
    result.extra["config"] = {"events": n, "customers": customers,
                              "partitions": throughput.PARTITIONS, "pairs": ctx.run_count}
    result.notes.append("pairs of 2-process engine runs on one fresh dataset each, the "
                        "order alternating; grid off = engine.epoch_quiet_ms 0; 1 s epochs")
    return result
