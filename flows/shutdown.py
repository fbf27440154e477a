"""Clean stop on SIGTERM / Ctrl-C: end the input, let the dataflow finish, exit 0.

Bytewax 0.21 has no "stop" call. A dataflow ends when every input partition has
ended, so a stop is an end of input: :class:`StopRequest` is set by the signal
handlers that :func:`handle_stop_signals` installs, and :class:`StoppableSource`
wraps the input so that each partition's ``next_batch`` raises ``StopIteration``
once it is set. Then, in order:

* the batch in flight goes through the flow (``next_batch`` is never interrupted);
* every stateful step runs ``on_eof``; in live mode that emits only counters and a
  stats document, never a push or an alert (dwell timers stay pending in the state);
* the input partitions snapshot their resume state (the next Kafka offset) at their
  end of input, and Bytewax commits the last epoch's snapshot;
* the sinks' ``close()`` flush: Kafka producers wait for their acknowledgements,
  the webhook sender drains its queue (what it cannot send stays in the outbox).

A partition that ended this way is not "done forever": on the next start Bytewax
rebuilds it from its snapshot and it goes on from that offset.

A second signal while stopping ends the process at once (exit 128 + signal), like a
crash: with recovery on, the next start replays from the last snapshot.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any, TypeVar

from bytewax.inputs import Source

from connectors.wrapped import wrap_source

__all__ = ["StopRequest", "handle_stop_signals", "stoppable"]

log = logging.getLogger(__name__)

X = TypeVar("X")

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
"""The signals that ask for a clean stop."""

_CHECK_EVERY = timedelta(milliseconds=200)


class StopRequest:
    """A process-wide "stop now, cleanly" flag (thread-safe)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    def set(self, reason: str = "requested") -> None:
        """Ask every wrapped input partition to end."""
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until a stop is asked for (or ``timeout`` seconds); True if it was."""
        return self._event.wait(timeout)


@contextmanager
def handle_stop_signals(stop: StopRequest,
                        signals: Iterable[signal.Signals] = STOP_SIGNALS) -> Iterator[bool]:
    """Within the block, SIGTERM and SIGINT set ``stop`` instead of killing the process.

    Yields whether the handlers were installed: signal handlers can only be set from
    the main thread, so elsewhere nothing is installed (and False is yielded). The
    previous handlers come back when the block ends. A second signal while stopping
    exits at once with status 128 + signal number.
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    sigs = tuple(signals)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("%s again while stopping: exiting now (recovery replays the rest)",
                        name)
            os._exit(128 + signum)
        log.info("%s: stopping cleanly (finishing the batch in flight, flushing outputs, "
                 "taking a snapshot); send it again to exit at once", name)
        stop.set(name)

    previous: dict[signal.Signals, Any] = {}
    try:
        for s in sigs:
            previous[s] = signal.signal(s, on_signal)
        yield True
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _StopHooks:
    """Ends every partition (``StopIteration``) once the stop request is set."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop

    def built(self) -> None:
        pass

    def before_batch(self) -> None:
        if self.stop.is_set():
            raise StopIteration

    def ended(self) -> None:
        pass

    def awake(self, at: datetime | None) -> datetime | None:
        # A partition asleep until far ahead would notice the stop only then.
        if at is None or self.stop.is_set():
            return None
        return min(at, datetime.now(UTC) + _CHECK_EVERY)


def stoppable(source: Source[X], stop: StopRequest) -> Source[X]:
    """``source`` wrapped so that ``stop`` ends it (fixed-partitioned or dynamic).

    Same partitions, items and resume state as ``source``; only the end differs (a
    stopped partition still snapshots where it got to).
    """
    return wrap_source(source, _StopHooks(stop))
