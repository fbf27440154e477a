"""Put a benchmark workload on Kafka: three fresh topics, keyed by customer id.

:func:`produce_dataset` creates ``<prefix>touch.clicks``, ``<prefix>net.location`` and
``<prefix>net.calls`` (``retention.ms`` set explicitly: Tansu reports no topic
configuration otherwise, and Quix Streams refuses to start on a topic whose
configuration it cannot read) and produces ``n`` workload events as fast as the
broker takes them, checking every delivery. Every contender of a run then reads the
same, already complete topics.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient

from bench.workload import Workload
from connectors.kafka import create_topics

__all__ = ["KINDS", "Dataset", "DatasetError", "delete_dataset", "produce_dataset"]

KINDS: dict[str, str] = {
    "clicks": "touch.clicks",
    "location": "net.location",
    "calls": "net.calls",
}
"""Workload event kind -> engine input topic (without prefix)."""

DEFAULT_SPAN_MS = 60_000


class DatasetError(RuntimeError):
    """Producing the dataset failed (undelivered messages, flush timeout)."""


@dataclass
class Dataset:
    """What is on the broker: topic names (by kind), partitions, event counts."""

    brokers: str
    topics: dict[str, str]
    partitions: int
    count: int
    per_topic: dict[str, int] = field(default_factory=dict)
    start_ms: int = 0
    span_ms: int = 0
    produce_s: float = 0.0

    @property
    def topic_names(self) -> list[str]:
        """The topic names, clicks, location, calls."""
        return [self.topics[k] for k in KINDS]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able description."""
        return asdict(self)


def produce_dataset(
    brokers: str,
    prefix: str,
    n: int,
    workload: Workload,
    partitions: int = 3,
    start_ms: int | None = None,
    span_ms: int = DEFAULT_SPAN_MS,
    *,
    flush_timeout_s: float = 120.0,
) -> Dataset:
    """Create the three topics and produce ``n`` events of ``workload``, key = customer id.

    Event times run from ``start_ms`` (default: now) over ``span_ms``. The engine
    dead-letters events more than an hour in the future and treats events older than
    its lateness (5 min) as stale, so "now + one minute" stays fresh for the few
    minutes a run of all contenders takes.

    :raises DatasetError: if any message was not delivered.
    """
    if start_ms is None:
        start_ms = int(time.time() * 1000)
    topics = {kind: f"{prefix}{base}" for kind, base in KINDS.items()}
    create_topics(brokers, dict.fromkeys(topics.values(), partitions))
    per_topic = dict.fromkeys(topics.values(), 0)
    errors: list[str] = []
    delivered = 0

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        nonlocal delivered
        if err is None:
            delivered += 1
        elif len(errors) < 20:
            errors.append(str(err))
        else:
            errors.append("")  # count only

    producer = Producer({
        "bootstrap.servers": brokers,
        "allow.auto.create.topics": False,
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 500_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "compression.type": "none",
        "acks": "all",
    })
    produce = producer.produce
    t0 = time.perf_counter()
    for kind, cid, value in workload.events(n, start_ms, span_ms):
        topic = topics[kind]
        key = cid.encode()
        while True:
            try:
                produce(topic, value, key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        per_topic[topic] += 1
    remaining = producer.flush(flush_timeout_s)
    produce_s = time.perf_counter() - t0
    if errors or remaining or delivered != n:
        shown = "; ".join(e for e in errors if e)
        raise DatasetError(
            f"dataset {prefix!r}: {delivered}/{n} delivered, {len(errors)} failed, "
            f"{remaining} still queued: {shown}"
        )
    return Dataset(brokers, topics, partitions, n, per_topic, start_ms, span_ms, produce_s)


def delete_dataset(dataset: Dataset, timeout_s: float = 30.0) -> list[str]:
    """Delete the dataset's topics and any other topic under its prefix (outputs a
    contender created there), to free the broker's memory between runs; return the
    names deleted."""
    admin = AdminClient({"bootstrap.servers": dataset.brokers})
    prefix = dataset.topics["clicks"][: -len(KINDS["clicks"])]
    existing = admin.list_topics(timeout=timeout_s).topics
    names = sorted({*dataset.topic_names, *(t for t in existing if prefix and t.startswith(prefix))}
                   & set(existing))
    if names:
        for fut in admin.delete_topics(names, request_timeout=timeout_s).values():
            fut.result(timeout_s)
    return names
