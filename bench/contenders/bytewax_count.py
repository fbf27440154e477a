"""Runtime ceiling: a bare Bytewax flow doing a keyed count, on the engine's input.

``KafkaInput`` (the engine's own input connector: assign-based, one consumer per
partition) -> ``op.map`` orjson decode -> ``op.key_on`` customer id ->
``op.stateful_map`` count -> a sink that discards. No recovery. Whatever the engine
does beyond this is its own cost; this is what Bytewax itself allows.

The source is wrapped in :class:`bench.timing.TimedSource`; each partition ends
after 1 s without a record (``eof_when_idle_s``), which the timing excludes.
``--processes P`` runs a P-process cluster (one worker each) on this host.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import cluster_main, run_main

from bench import gcstats
from bench.contenders import parse_args, scratch_dir, write_result
from bench.services import free_port
from bench.timing import TimedSource, read_timings
from connectors.kafka import KafkaInput
from flows.model import RawRecord

CONTENDER = True

EOF_WHEN_IDLE_S = 1.0


class _Discard(StatelessSinkPartition[Any]):
    def write_batch(self, items: list[Any]) -> None:
        pass


class DiscardSink(DynamicSink[Any]):
    """A sink that drops everything."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Discard:
        """A partition that drops everything."""
        return _Discard()


def _decode(rec: RawRecord) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(rec.value)
    return doc


def _customer(doc: dict[str, Any]) -> str:
    return str(doc["customer_id"])


def _count(state: int | None, _doc: dict[str, Any]) -> tuple[int, int]:
    n = (state or 0) + 1
    return n, n


def count_flow(source: Source[RawRecord]) -> Dataflow:
    """The keyed count over any source of raw records (``bench.decode`` uses it too)."""
    flow = Dataflow("bench_bytewax_count")
    raw = op.input("in", flow, source)
    docs = op.map("decode", raw, _decode)
    keyed = op.key_on("key", docs, _customer)
    counts = op.stateful_map("count", keyed, _count)
    op.output("out", counts, DiscardSink())
    return flow


def build_flow(brokers: str, topics: Sequence[str], timing_dir: Path) -> Dataflow:
    """The keyed-count flow over ``topics``, timed into ``timing_dir``."""
    return count_flow(TimedSource(
        KafkaInput(brokers, dict.fromkeys(topics, "json"), eof_when_idle_s=EOF_WHEN_IDLE_S),
        timing_dir,
    ))


def _own_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--addresses", default=None, help=argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the flow (or one process of the cluster), then write the timing."""
    args = parse_args(argv, __doc__, _own_args)
    timing_dir = scratch_dir(args.result) / "timing"
    gcstats.install(timing_dir)  # each process of a cluster writes its collections there
    proc_id = args.extra.process_id
    if proc_id is not None:  # one member of a cluster started below
        flow = build_flow(args.brokers, args.topics, timing_dir)
        cluster_main(flow, args.extra.addresses.split(","), proc_id)  # type: ignore[no-untyped-call]
        return 0
    shutil.rmtree(timing_dir, ignore_errors=True)  # no files of an earlier attempt
    if args.processes == 1:
        run_main(build_flow(args.brokers, args.topics, timing_dir))  # type: ignore[no-untyped-call]
    else:
        addresses = ",".join(f"127.0.0.1:{free_port()}" for _ in range(args.processes))
        base = list(argv if argv is not None else sys.argv[1:])
        procs = [
            subprocess.Popen([sys.executable, "-m", __spec__.name if __spec__ else __name__,
                              *base, "--process-id", str(i), "--addresses", addresses])
            for i in range(args.processes)
        ]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"cluster processes exited with {codes}")
    write_result(args.result, read_timings(timing_dir), gc_dir=timing_dir,
                 processes=args.processes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
