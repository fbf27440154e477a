"""One way to measure throughput, for every contender.

    rate = events / (time the last record was read or processed
                     - time the first record was received)

Start-up (process start, imports, connecting, a consumer-group join) and shut-down
(an idle wait before a finite source ends, closing) are outside that window, so a
contender is not charged for how it learns that the input is over.

For Bytewax flows, :class:`TimedSource` wraps any :class:`FixedPartitionedSource`
(e.g. ``connectors.kafka.KafkaInput``) and records, for each worker, the wall time
the first non-empty batch was returned, the wall time the last one was done with,
and the record count. A Bytewax worker alternates between reading and processing:
the next ``next_batch()`` call on a partition comes once the previous batch of that
partition went through the flow, so that call's time is taken as "the last batch was
processed" (at worst it is off by one batch's processing time). Each worker writes
its figures as JSON to its own file under a directory (``timing-<pid>-<n>.json``);
:func:`read_timings` combines the files of all workers and processes with
``min(first)`` and ``max(last)``. Wall-clock times (``time.time()``) are used so
files from different processes on one host compare.

Usage (one process or a cluster; every process gets the same directory)::

    src = TimedSource(KafkaInput(brokers, topics, eof_when_idle_s=1.0), timing_dir)
    ...run the flow...
    t = read_timings(timing_dir)   # Timing(events, seconds, rate)
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

__all__ = [
    "Stopwatch",
    "TimedSource",
    "Timing",
    "TimingError",
    "combine_timings",
    "read_timings",
]

X = TypeVar("X")
S = TypeVar("S")


class TimingError(RuntimeError):
    """No timing was recorded (nothing read, or no timing file written)."""


@dataclass(frozen=True)
class Timing:
    """``events`` read between the first and the last record, ``seconds`` apart."""

    events: int
    seconds: float
    first: float = 0.0
    last: float = 0.0

    @property
    def rate(self) -> float:
        """Events per second (0 if nothing or no time was measured)."""
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """``{"events", "seconds", "rate", "first", "last"}``."""
        return {"events": self.events, "seconds": self.seconds, "rate": self.rate,
                "first": self.first, "last": self.last}


class Stopwatch:
    """First/last/count bookkeeping, for a contender that reads records itself.

    Call :meth:`batch` after each read batch has been handled, with its size and the
    time the batch arrived (:meth:`now` taken right after the read returned).
    """

    __slots__ = ("count", "first", "last")

    def __init__(self) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None

    @staticmethod
    def now() -> float:
        """Wall time, seconds."""
        return time.time()

    def batch(self, n: int, received: float, done: float | None = None) -> None:
        """Record a batch of ``n`` records received at ``received`` and finished at
        ``done`` (default: now). Empty batches are ignored."""
        if n <= 0:
            return
        if self.first is None:
            self.first = received
        self.count += n
        self.last = done if done is not None else time.time()

    def timing(self) -> Timing:
        """What was recorded."""
        if self.first is None or self.last is None:
            return Timing(0, 0.0)
        return Timing(self.count, self.last - self.first, self.first, self.last)

    def to_json(self) -> dict[str, Any]:
        """The raw figures (the format of a timing file)."""
        return {"count": self.count, "first": self.first, "last": self.last}


# --- the Bytewax source wrapper ---------------------------------------------------------


class _WorkerRecorder:
    """The figures of one worker thread, and the file they are written to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.watch = Stopwatch()

    def write(self) -> None:
        doc = {**self.watch.to_json(), "pid": os.getpid(),
               "written": datetime.now(UTC).isoformat(timespec="milliseconds")}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.path)


_recorders: dict[tuple[str, int], _WorkerRecorder] = {}
_recorders_lock = threading.Lock()


def _recorder(out_dir: Path) -> _WorkerRecorder:
    """This worker thread's recorder (Bytewax runs each worker on its own thread, and
    builds a worker's partitions on that thread)."""
    key = (str(out_dir), threading.get_ident())
    with _recorders_lock:
        rec = _recorders.get(key)
        if rec is None:
            out_dir.mkdir(parents=True, exist_ok=True)
            n = sum(1 for k in _recorders if k[0] == key[0])
            rec = _recorders[key] = _WorkerRecorder(out_dir / f"timing-{os.getpid()}-{n}.json")
        return rec


@atexit.register
def _flush_all() -> None:
    # Partitions are closed only when a finite flow completes; write what we have
    # on any normal interpreter exit too.
    with _recorders_lock:
        for rec in _recorders.values():
            try:
                rec.write()
            except OSError:
                pass


class _TimedPartition(StatefulSourcePartition[X, S], Generic[X, S]):
    def __init__(self, inner: StatefulSourcePartition[X, S], rec: _WorkerRecorder) -> None:
        self._inner = inner
        self._rec = rec
        # (size, received time) of the last non-empty batch until the worker
        # comes back for more, i.e. until that batch went through the flow.
        self._pending: tuple[int, float] | None = None

    def _settle(self) -> None:
        if self._pending is not None:
            n, received = self._pending
            self._pending = None
            self._rec.watch.batch(n, received, time.time())

    def next_batch(self) -> list[X]:
        self._settle()
        got = self._inner.next_batch()  # StopIteration passes through
        batch = got if isinstance(got, list) else list(got)  # may be any iterable
        if batch:
            self._pending = (len(batch), time.time())
        return batch

    def next_awake(self) -> datetime | None:
        return self._inner.next_awake()

    def snapshot(self) -> S:
        return self._inner.snapshot()

    def close(self) -> None:
        self._settle()
        try:
            self._inner.close()
        finally:
            self._rec.write()


class TimedSource(FixedPartitionedSource[X, S], Generic[X, S]):
    """Wrap a fixed-partitioned source to time what it feeds into the flow.

    Behaves exactly like ``inner`` (same partitions, items, resume state); each
    worker writes ``out_dir/timing-<pid>-<n>.json`` with ``count``, ``first`` and
    ``last`` (wall-clock seconds) when its partitions close (a finite flow ending)
    and at interpreter exit. Combine them with :func:`read_timings`.
    """

    def __init__(self, inner: FixedPartitionedSource[X, S], out_dir: str | Path) -> None:
        self.inner = inner
        self.out_dir = Path(out_dir)

    def list_parts(self) -> list[str]:
        """The inner source's partitions."""
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: S | None
                   ) -> _TimedPartition[X, S]:
        """Build the inner partition and time it on this worker's recorder."""
        inner = self.inner.build_part(step_id, for_part, resume_state)
        return _TimedPartition(inner, _recorder(self.out_dir))


# --- combining --------------------------------------------------------------------------


def combine_timings(paths: Iterable[str | Path]) -> Timing:
    """Combine timing files: total count, ``min(first)`` to ``max(last)``.

    Files of workers that read nothing count for nothing.

    :raises TimingError: if no file recorded any record.
    """
    count = 0
    firsts: list[float] = []
    lasts: list[float] = []
    seen = 0
    for p in paths:
        seen += 1
        doc = json.loads(Path(p).read_text())
        if doc.get("count") and doc.get("first") is not None and doc.get("last") is not None:
            count += int(doc["count"])
            firsts.append(float(doc["first"]))
            lasts.append(float(doc["last"]))
    if not firsts:
        raise TimingError(f"no records timed ({seen} timing file(s))")
    first, last = min(firsts), max(lasts)
    return Timing(count, last - first, first, last)


def read_timings(out_dir: str | Path) -> Timing:
    """Combine every ``timing-*.json`` file under ``out_dir``."""
    return combine_timings(sorted(Path(out_dir).glob("timing-*.json")))
