"""Sources wrapped around other sources.

A source wrapped with hooks around its partitions (:func:`wrap_source`): same
partitions, items and resume state as the inner source; only when a partition ends, and
what is told of it, differs. :func:`flows.shutdown.stoppable` (a stop request ends every
partition) and :func:`connectors.rules_sources.end_with_input` (the rule-change input
ends with the event input) are both such wrappers, for fixed-partitioned and dynamic
sources alike.

Two fixed-partitioned sources read as one (:func:`with_partitions_of`), so that a
dataflow has one input step where it would have two (see there why that matters).

:class:`EpochGrid`: hooks that keep the workers of a multi-worker dataflow from
drifting apart epoch by epoch (see there).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from bytewax.inputs import (
    DynamicSource,
    FixedPartitionedSource,
    Source,
    StatefulSourcePartition,
    StatelessSourcePartition,
)

__all__ = ["EpochGrid", "PartitionHooks", "with_partitions_of", "wrap_source"]

log = logging.getLogger(__name__)

X = TypeVar("X")
S = TypeVar("S")


class PartitionHooks(Protocol):
    """What a wrapper does around each partition of the inner source."""

    def built(self) -> None:
        """A partition was built on this worker."""

    def before_batch(self) -> None:
        """Before each batch; raise :class:`StopIteration` to end the partition."""

    def ended(self) -> None:
        """The inner partition ended by itself (called once per partition)."""

    def awake(self, at: datetime | None) -> datetime | None:
        """When the partition should be asked again, given the inner partition's wish."""


class _Hooked:
    """The part both partition kinds share: the hooks around ``next_batch``."""

    def __init__(self, inner: Any, hooks: PartitionHooks) -> None:
        self._inner = inner
        self._hooks = hooks
        self._ended = False

    def _next(self) -> Any:
        self._hooks.before_batch()
        try:
            return self._inner.next_batch()
        except StopIteration:
            if not self._ended:
                self._ended = True
                self._hooks.ended()
            raise

    def _awake(self) -> datetime | None:
        return self._hooks.awake(self._inner.next_awake())


class _Part(_Hooked, StatefulSourcePartition[X, S], Generic[X, S]):
    def next_batch(self) -> Iterable[X]:
        return self._next()  # type: ignore[no-any-return]

    def next_awake(self) -> datetime | None:
        return self._awake()

    def snapshot(self) -> S:
        # Also after a stop: the resume state of where it got to.
        return self._inner.snapshot()  # type: ignore[no-any-return]

    def close(self) -> None:
        self._inner.close()


class _StatelessPart(_Hooked, StatelessSourcePartition[X], Generic[X]):
    def next_batch(self) -> Iterable[X]:
        return self._next()  # type: ignore[no-any-return]

    def next_awake(self) -> datetime | None:
        return self._awake()

    def close(self) -> None:
        self._inner.close()


class _FixedSource(FixedPartitionedSource[X, S], Generic[X, S]):
    def __init__(self, inner: FixedPartitionedSource[X, S], hooks: PartitionHooks) -> None:
        self.inner = inner
        self.hooks = hooks

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: S | None) -> _Part[X, S]:
        self.hooks.built()
        return _Part(self.inner.build_part(step_id, for_part, resume_state), self.hooks)


class _DynamicSource(DynamicSource[X], Generic[X]):
    def __init__(self, inner: DynamicSource[X], hooks: PartitionHooks) -> None:
        self.inner = inner
        self.hooks = hooks

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _StatelessPart[X]:
        self.hooks.built()
        return _StatelessPart(self.inner.build(step_id, worker_index, worker_count), self.hooks)


def wrap_source(source: Source[X], hooks: PartitionHooks) -> Source[X]:
    """``source`` with ``hooks`` around each of its partitions (fixed or dynamic)."""
    if isinstance(source, FixedPartitionedSource):
        return _FixedSource(source, hooks)
    if isinstance(source, DynamicSource):
        return _DynamicSource(source, hooks)
    raise TypeError(f"cannot wrap a {type(source).__name__}")


class _Joined(FixedPartitionedSource[Any, Any]):
    def __init__(self, main: FixedPartitionedSource[Any, Any],
                 extra: FixedPartitionedSource[Any, Any], prefix: str) -> None:
        self.main = main
        self.extra = extra
        self.prefix = prefix

    def list_parts(self) -> list[str]:
        main = self.main.list_parts()
        taken = [p for p in main if p.startswith(self.prefix)]
        if taken:
            raise ValueError(f"partition names {taken} begin with {self.prefix!r}, "
                             "which names the partitions of the other source")
        return main + [self.prefix + p for p in self.extra.list_parts()]

    def build_part(self, step_id: str, for_part: str,
                   resume_state: Any | None) -> StatefulSourcePartition[Any, Any]:
        if for_part.startswith(self.prefix):
            return self.extra.build_part(step_id, for_part[len(self.prefix):], resume_state)
        return self.main.build_part(step_id, for_part, resume_state)


def with_partitions_of(main: Source[X], extra: Source[Any], prefix: str) -> Source[Any]:
    """One fixed-partitioned source with the partitions of ``main`` and of ``extra``.

    ``extra``'s partitions are named ``prefix`` + their own name (``main``'s must not
    begin with ``prefix``); each partition keeps its items and its resume state, and is
    built by its own source.

    Why: Bytewax 0.21.1 keeps the epoch of every input partition on its own clock and
    lets an input step read the next epoch only once every output has finished the
    previous one. An input step checks the epochs of all of its partitions at each
    activation, so its partitions move to the next epoch together. Two input steps do
    not: a step woken every 50 ms (the rule changes) notices its epoch's end up to a few
    ms later than one woken every 1 ms (the Kafka partitions), every epoch, and the
    difference adds up. The faster step then waits longer at every epoch end, spinning
    (its partitions' wake-up times have passed, so Bytewax activates it at once, again
    and again) instead of reading. With 1 s epochs an idle engine's wait, and its
    worker's CPU, grew with its age (``bench/README.md``, "Two input steps drift
    apart"). One step has one rhythm.
    """
    if not isinstance(main, FixedPartitionedSource) or not isinstance(
            extra, FixedPartitionedSource):
        raise TypeError("with_partitions_of joins fixed-partitioned sources; got "
                        f"{type(main).__name__} and {type(extra).__name__}")
    return _Joined(main, extra, prefix)


_SOON = 0.001
"""How soon :class:`EpochGrid` has a partition polled again just after an epoch end (s)."""


class EpochGrid:
    """Partition hooks that end each worker's epochs on a fixed schedule.

    Why: Bytewax 0.21.1 (``src/inputs.rs``, ``partitioned_input``) ends an input
    partition's epoch at the first activation of its step at least ``epoch_interval``
    after that epoch started, and starts the next epoch then. So every epoch lasts the
    interval plus however late that activation came (up to a partition's rest between
    polls), and each worker runs its own step with its own lateness. An input reads the
    next epoch only once every output of every worker has finished the previous one, so
    the worker ahead waits at each epoch end for the one behind, spinning. Measured, the
    wait grew with the dataflow's age and did not stop growing (2 workers with nothing
    to read, 10 ms rests, 1 s epochs: the longest pause between two reads went from 104
    to 527 ms in 10 minutes, and the CPU from 0.10 to 0.52 cores; with this grid, 30 ms
    and 0.06-0.07 cores throughout; ``bench/README.md``, "Workers of one dataflow drift
    apart").

    How: each worker's epochs end on a grid of its own, every ``epoch`` from the moment
    its partitions were first asked when to wake (when Bytewax started their first
    epoch). Bytewax is given the interval ``epoch - quiet / 2``
    (:attr:`runtime_interval`), and no partition on the worker may be woken in the
    ``quiet`` before a grid point: a wake-up there is moved to the grid point, and one
    due just after a grid point is moved back to it. An epoch that started on time
    reaches its interval inside the quiet window, so it ends at the grid point. One
    that started late (a long batch, a collection) ends up to ``quiet / 2`` less late at
    each epoch until it is back on the grid; for ``quiet`` after each grid point the
    partitions are polled every millisecond, so that a little lateness ends at once.
    The workers' grids start together (within the time Bytewax takes to start their
    first epochs), so they stay that close.

    The price is that the input reads nothing in the ``quiet`` before each epoch end: a
    record that arrives then waits up to ``quiet``. Every partition of the input step
    must be wrapped with the same hooks (a partition woken in the window would end the
    epoch early). The clock ``now`` (seconds since the Unix epoch) and ``worker`` (which
    worker is asking: the OS thread's id) are injected for tests.
    """

    def __init__(self, epoch: timedelta, quiet: timedelta,
                 now: Callable[[], float] = time.time,
                 worker: Callable[[], int] = threading.get_ident) -> None:
        if quiet <= timedelta(0):
            raise ValueError("quiet must be positive")
        if quiet * 2 >= epoch:
            raise ValueError(f"quiet ({quiet}) must be less than half the epoch ({epoch})")
        self._epoch = epoch.total_seconds()
        self._quiet = quiet.total_seconds()
        self._now = now
        self._worker = worker
        # Per worker thread (by OS thread id): when its first epoch began. Not a
        # threading.local: Bytewax's workers are threads Python did not start, and
        # data kept in one did not survive from one call into Python to the next.
        self._origins: dict[int, float] = {}
        self.runtime_interval = epoch - quiet / 2
        """The epoch interval to run Bytewax with."""

    def built(self) -> None:
        pass

    def before_batch(self) -> None:
        pass

    def ended(self) -> None:
        pass

    def awake(self, at: datetime | None) -> datetime | None:
        """When to wake the partition instead of ``at`` (None: at once, or after
        Bytewax's cooldown): the epoch end if ``at`` falls in the ``quiet`` before or
        after one of this worker's epoch ends; within ``quiet`` after an end that has
        passed, at most 1 ms from now; else ``at``."""
        now = self._now()
        # the first ask on this worker is when Bytewax starts its first epoch
        worker = self._worker()
        origin = self._origins.get(worker)
        if origin is None:
            origin = self._origins[worker] = now
            log.info("epochs of this worker end every %g s from %s on (nothing is read "
                     "in the %g ms before each end)", self._epoch,
                     datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
                     self._quiet * 1000)
        t = now if at is None else max(at.timestamp(), now)
        end = origin + round((t - origin) / self._epoch) * self._epoch  # the nearest one
        if end > now:
            if end - self._quiet <= t < end + self._quiet:
                return datetime.fromtimestamp(end, UTC)
            return at
        if now < end + self._quiet and t > now + _SOON:
            # Just after an epoch end: poll often, so that an epoch that began late ends
            # as soon as Bytewax lets it (else it can stay a rest late for good).
            return datetime.fromtimestamp(now + _SOON, UTC)
        return at
