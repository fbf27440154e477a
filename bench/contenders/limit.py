"""Limit: a bare confluent-kafka consumer, the most any Python consumer gets here.

One consumer ``assign()``-ed to every partition of every topic from the beginning (no
group join), ``consume()`` in large batches, ``orjson.loads`` on every value and
nothing else. Single process only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from bench import gcstats
from bench.contenders import parse_args, write_result
from bench.timing import Stopwatch

CONTENDER = True

BATCH = 10_000
IDLE_GIVE_UP_S = 10.0
START_GIVE_UP_S = 60.0


def main(argv: Sequence[str] | None = None) -> int:
    """Consume ``--expect`` events, decode each, write the timing."""
    gcstats.install()
    args = parse_args(argv, __doc__)
    if args.processes != 1:
        raise SystemExit("limit runs on one process only")
    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": "bench-limit",  # required by librdkafka; assign() joins no group
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
        "fetch.wait.max.ms": 5,
        "fetch.queue.backoff.ms": 1,
        "queued.max.messages.kbytes": 262_144,
    })
    md = consumer.list_topics(timeout=10)
    parts: list[TopicPartition] = []
    for t in args.topics:
        tmd = md.topics.get(t)
        if tmd is None or tmd.error is not None:
            raise SystemExit(f"topic {t!r} not found")
        parts.extend(TopicPartition(t, p, OFFSET_BEGINNING) for p in sorted(tmd.partitions))
    consumer.assign(parts)

    watch = Stopwatch()
    loads = orjson.loads
    expect = args.expect
    last_progress = time.monotonic()
    try:
        while watch.count < expect:
            msgs = consumer.consume(min(BATCH, expect - watch.count), 0.1)
            received = time.time()
            n = 0
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise SystemExit(f"consumer error: {err}")
                loads(m.value())
                n += 1
            now = time.monotonic()
            if n:
                watch.batch(n, received)
                last_progress = now
            elif now - last_progress > (IDLE_GIVE_UP_S if watch.count else START_GIVE_UP_S):
                break  # the result shows how many were read; the caller reports it
    finally:
        consumer.close()
    write_result(args.result, watch.timing(), partitions=len(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
