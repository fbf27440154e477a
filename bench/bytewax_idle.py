"""A bare Bytewax flow with nothing to read, for the input-drift part (``bench/input_drift.py``).

``python -m bench.bytewax_idle --layout two|one --seconds S --window W [--workers N]
[--epoch E] [--fast-rest-ms R] [--epoch-quiet-ms Q]``: 9 partitions woken every ``R``
(1) ms, like the engine's Kafka partitions before the idle rest, and 1 partition woken
every 50 ms, like the rule-change input, none of which ever has a record; read by two
``op.input`` steps merged (``two``) or by one step (``one``,
:func:`connectors.wrapped.with_partitions_of`), into a sink that drops everything; ``E``
(1) s epochs, ``N`` (1) workers; with ``Q`` > 0, every partition wrapped in a
:class:`connectors.wrapped.EpochGrid` with that quiet window, as the engine does with
more than one worker. Every ``W``
seconds it prints one JSON line: the age, the process's CPU over the window (``/proc``;
with one worker, its thread is nearly all of it), the longest pause between two reads
of a fast partition, and the reads per second of those partitions.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, Source, StatefulSourcePartition
from bytewax.testing import cluster_main

from bench.contenders.bytewax_count import DiscardSink
from connectors.wrapped import EpochGrid, with_partitions_of, wrap_source

__all__ = ["build", "main"]

FAST_PARTS = 9
FAST_REST = timedelta(milliseconds=1)
SLOW_REST = timedelta(milliseconds=50)
EPOCH = timedelta(seconds=1)


class _Reads:
    """The reads of the fast partitions: how many, and the longest pause (one worker)."""

    def __init__(self) -> None:
        self.count = 0
        self.longest_s = 0.0

    def take(self) -> tuple[int, float]:
        n, longest = self.count, self.longest_s
        self.count, self.longest_s = 0, 0.0
        return n, longest


class _Part(StatefulSourcePartition[Any, None]):
    def __init__(self, rest: timedelta, until: float, reads: _Reads | None) -> None:
        self.rest = rest
        self.until = until
        self.reads = reads
        self.last = 0.0
        self.awake: datetime | None = None

    def next_batch(self) -> list[Any]:
        now = time.monotonic()
        if now >= self.until:
            raise StopIteration
        if self.reads is not None:
            if self.last:
                self.reads.longest_s = max(self.reads.longest_s, now - self.last)
            self.reads.count += 1
            self.last = now
        self.awake = datetime.now(UTC) + self.rest
        return []

    def next_awake(self) -> datetime | None:
        return self.awake

    def snapshot(self) -> None:
        return None


class _Source(FixedPartitionedSource[Any, None]):
    def __init__(self, names: list[str], rest: timedelta, until: float,
                 reads: _Reads | None) -> None:
        self.names = names
        self.rest = rest
        self.until = until
        self.reads = reads

    def list_parts(self) -> list[str]:
        return self.names

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _Part:
        return _Part(self.rest, self.until, self.reads)


def build(layout: str, until: float, reads: _Reads,
          fast_rest: timedelta = FAST_REST, grid: EpochGrid | None = None) -> Dataflow:
    """The flow: ``two`` input steps merged, or ``one`` step reading both sources;
    with ``grid``, every partition wrapped in it."""
    fast: Source[Any] = _Source([f"events/{i}" for i in range(FAST_PARTS)], fast_rest, until,
                                reads)
    slow: Source[Any] = _Source(["rules"], SLOW_REST, until, None)
    if grid is not None:
        fast, slow = wrap_source(fast, grid), wrap_source(slow, grid)
    flow = Dataflow("idle")
    if layout == "two":
        s = op.merge("merged", op.input("events_in", flow, fast),
                     op.input("rules_in", flow, slow))
    elif layout == "one":
        s = op.input("events_in", flow, with_partitions_of(fast, slow, "control:"))
    else:
        raise ValueError(f"layout must be 'one' or 'two', not {layout!r}")
    op.output("out", s, DiscardSink())
    return flow


def _process_cpu_s() -> float:
    with open("/proc/self/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    """Run the flow for ``--seconds``, printing a JSON line per ``--window``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", choices=["one", "two"], required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=1, help="worker threads")
    ap.add_argument("--epoch", type=float, default=EPOCH.total_seconds(),
                    help="epoch interval, s")
    ap.add_argument("--fast-rest-ms", type=float, default=FAST_REST / timedelta(milliseconds=1),
                    help="rest of the 9 fast partitions, ms")
    ap.add_argument("--epoch-quiet-ms", type=float, default=0.0,
                    help="> 0: keep the epochs on a grid (connectors.wrapped.EpochGrid)")
    args = ap.parse_args(argv)
    epoch = timedelta(seconds=args.epoch)
    grid = (EpochGrid(epoch, timedelta(milliseconds=args.epoch_quiet_ms))
            if args.epoch_quiet_ms > 0 else None)
    born = time.monotonic()
    reads = _Reads()
    # a half window more, so that the last window is printed before the flow ends
    flow = build(args.layout, born + args.seconds + args.window / 2, reads,
                 timedelta(milliseconds=args.fast_rest_ms), grid)

    def watch() -> None:
        last = _process_cpu_s()
        while True:
            time.sleep(args.window)
            now = _process_cpu_s()
            n, longest = reads.take()
            print(orjson.dumps({
                "age_s": round(time.monotonic() - born, 1),
                "cores": round((now - last) / args.window, 4),
                "longest_pause_ms": round(longest * 1000, 1),
                "reads_per_s": round(n / args.window),
            }).decode(), flush=True)
            last = now

    threading.Thread(target=watch, daemon=True).start()
    interval = grid.runtime_interval if grid is not None else epoch
    cluster_main(flow, [], 0, epoch_interval=interval,  # type: ignore[no-untyped-call]
                 worker_count_per_proc=args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
