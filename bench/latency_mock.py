"""Latency part on librdkafka's mock cluster: the engine on a broker that keeps up.

The latency part (:mod:`bench.latency`) measures on Tansu's memory storage, whose
fetches slow down as its log grows (``python -m bench broker_fetch``), so at 5k and
10k events/s its figures are the broker's. This part runs the same phases at the two
target rates, 5k and 10k events/s for 20 s each (quick: the latency part's quick
phase), with the same engine, load, readers and Redis, against librdkafka's mock
cluster (:mod:`bench.mock_kafka`), which this part starts for itself and stops after.
Its topics have the 4 partitions the mock cluster gives them (Tansu's: 3).

It says what the engine adds when the broker is not the bound. It does not stand in
for the Tansu figures: the mock cluster is a test double in C, not a Kafka broker.

``python -m bench latency_mock``; ``python -m bench.latency --broker mock`` runs the
latency part's whole plan (1k, 5k with the ``help-sprite`` timers, 10k) on it.
"""

from __future__ import annotations

from dataclasses import replace

from bench import latency
from bench.core import BenchContext, PartResult
from bench.mock_kafka import start_mock_kafka

__all__ = ["PART", "PHASES", "run"]

PART = "latency_mock"
PHASES = (latency.Phase("5k", 5000, 20), latency.Phase("10k", 10_000, 20))
"""The target rates, 20 s each (no stuck customers: the timers are the latency part's)."""


def run(ctx: BenchContext) -> PartResult:
    """The latency part's phases at 5k and 10k events/s on a mock cluster of its own."""
    broker = start_mock_kafka(ctx.work_dir / "mock-kafka" / "mock-kafka.log")
    try:
        mctx = replace(ctx, brokers=broker.address, broker="mock")
        plan = latency.plan_for(mctx)
        if not ctx.quick:
            plan = replace(plan, phases=PHASES)
        result = latency.run(mctx, plan=plan)  # named latency_mock (PART) on this broker
    finally:
        broker.stop()
    result.notes.append(
        "broker: librdkafka's mock cluster (bench/mock_kafka.py), started for this part, "
        "not Tansu: a test double in C whose fetch walks at most 5 MiB of batches per "
        "partition")
    return result
