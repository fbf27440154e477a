"""Peer: the same keyed count in Quix Streams.

One ``StreamingDataFrame`` per input topic (JSON values: Quix decodes with orjson too),
concatenated, then a stateful count per message key (the producer keyed every event
by customer id, so no ``group_by`` repartition is needed). Quix state lives in its
RocksDB store under the scratch directory. Single process only.

Tansu and Quix (found while setting this up):

* Quix reads each input topic's configuration when it starts and fails if it cannot
  (``DescribeConfigs``); Tansu reports none for a topic created without
  configuration, so the dataset topics are created with ``retention.ms`` set.
* Quix subscribes with a consumer group, and a group join on Tansu is slow: about
  24 s from ``app.run()`` to the first message with librdkafka's defaults, about 2 s
  with ``session.timeout.ms=2000`` and ``heartbeat.interval.ms=500`` (measured
  here). The join is before the first record, so outside the measured window
  either way; it only makes the bench (and the quick test) longer.
* Concatenating dataframes of several topics turns on Quix's partition time
  alignment: it buffers up to 10,000 messages per partition and, when a partition's
  buffer runs empty, polls until it learns that partition's high watermark again.
  At the end of a finite input each such poll waits for ``consumer_poll_timeout``
  (1 s by default, about 2 s per run in all): it is set to 0.1 s here, since that
  tail wait is not counting. Quix also gets the engine's fetch tuning
  (``fetch.wait.max.ms=5``, ``fetch.queue.backoff.ms=1``). Mid-stream pauses of a
  few hundred ms remain (commits, alignment) and make Quix the noisiest figure.
* Changelog topics are off (``use_changelog_topics=False``): with them, every state
  update is also produced to a changelog topic on the same broker, which is Quix's
  recovery, not the count. The Bytewax ceiling runs without recovery too. Pass
  ``--changelog`` to measure Quix with them.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
import uuid
from collections.abc import Sequence
from typing import Any

from bench import gcstats
from bench.contenders import parse_args, scratch_dir, write_result
from bench.timing import Timing

CONTENDER = True

# Stop if no message arrives for this long (the result then shows fewer events).
IDLE_GIVE_UP_S = 30.0


def _own_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--changelog", action="store_true",
                   help="keep Quix's changelog topics (state recovery) on")


def main(argv: Sequence[str] | None = None) -> int:
    """Count per key until ``--expect`` events went through, then write the timing."""
    gcstats.install()
    args = parse_args(argv, __doc__, _own_args)
    if args.processes != 1:
        raise SystemExit("quix_count runs on one process only")
    from quixstreams import Application  # noqa: PLC0415 (slow import, after arg checks)
    from quixstreams.state import State  # noqa: PLC0415

    state_dir = scratch_dir(args.result) / "state"
    shutil.rmtree(state_dir, ignore_errors=True)
    app = Application(
        broker_address=args.brokers,
        consumer_group=f"bench-quix-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        consumer_extra_config={
            # Fast group join on Tansu (see the module docstring).
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 500,
            # The same librdkafka fetch tuning as the engine's KafkaInput.
            "fetch.wait.max.ms": 5,
            "fetch.queue.backoff.ms": 1,
        },
        # See the module docstring: 1 s (the default) idles up to 1 s per emptied
        # partition buffer at the end of a finite input.
        consumer_poll_timeout=0.1,
        state_dir=state_dir,
        use_changelog_topics=args.extra.changelog,
        loglevel=logging.WARNING,
    )
    frames = [
        app.dataframe(app.topic(t, value_deserializer="json", key_deserializer="str"))
        for t in args.topics
    ]
    sdf = frames[0]
    for other in frames[1:]:
        sdf = sdf.concat(other)

    expect = args.expect
    seen = 0
    first = 0.0
    last = 0.0

    def count(_value: Any, state: State[Any, Any]) -> int:
        nonlocal seen, first, last
        if seen == 0:
            first = time.time()
        n: int = state.get("n", 0) + 1
        state.set("n", n)
        seen += 1
        if seen >= expect:
            last = time.time()
        return n

    sdf = sdf.apply(count, stateful=True)
    app.run(count=expect, timeout=IDLE_GIVE_UP_S, collect=False)
    if seen < expect:
        last = time.time()
    timing = Timing(seen, last - first, first, last) if seen else Timing(0, 0.0)
    write_result(args.result, timing, changelog=args.extra.changelog)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
