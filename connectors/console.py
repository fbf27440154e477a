"""The live terminal view: pushes and alerts as they fire, stats now and then.

Customer ids are masked to their last four characters here (they may be phone
numbers): :func:`flows.masking.mask_id` on every id the view prints, in push lines
(the customer and a ``customer:<id>`` channel), alert lines (the subject, and any
sample a detail would show) and dead-letter lines (a detail should never quote the
message; any phone-number-like run of digits in it is masked all the same). The
data outputs carry them whole.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from flows.masking import mask_channel, mask_id, mask_numbers
from flows.model import Alert, DeadLetter, Push, ms_to_datetime

__all__ = ["ConsoleView", "mask"]

mask = mask_id
"""``13800001234`` → ``…1234`` (:func:`flows.masking.mask_id`)."""


class _Part(StatelessSinkPartition[Any]):
    def __init__(self, view: ConsoleView, fmt: Callable[[Any], str | None]) -> None:
        self._view = view
        self._fmt = fmt

    def write_batch(self, items: list[Any]) -> None:
        lines = [line for line in map(self._fmt, items) if line]
        if lines:
            self._view.write(lines)


class _Sink(DynamicSink[Any]):
    def __init__(self, view: ConsoleView, fmt: Callable[[Any], str | None]) -> None:
        self._view = view
        self._fmt = fmt

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Part:
        return _Part(self._view, self._fmt)


class ConsoleView:
    """Formats outputs for a person watching ``make run``; thread-safe across workers."""

    def __init__(self, out: TextIO | None = None, now_ms: Callable[[], int] | None = None,
                 color: bool | None = None) -> None:
        self.out = out or sys.stdout
        self.now_ms = now_ms or (lambda: time.time_ns() // 1_000_000)
        self.color = self.out.isatty() if color is None else color
        self._lock = threading.Lock()
        self.counts = {"push": 0, "alert": 0, "dead_letter": 0}

    def write(self, lines: list[str]) -> None:
        """Print lines atomically."""
        with self._lock:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def _stamp(self, ms: int) -> str:
        return ms_to_datetime(ms).strftime("%H:%M:%S.%f")[:-3]

    def push_line(self, p: Push) -> str:
        """One line for a push, with its lag behind the triggering event."""
        self.counts["push"] += 1
        lag = self.now_ms() - p.event_ts
        content = f"{p.content.get('module')}/{p.content.get('kind')}"
        return (f"{self._stamp(p.event_ts)}  {self._c('1;32', 'PUSH ')}  {p.rule_id:<13} → "
                f"{mask_channel(p.channel):<18} {content:<24} {mask_id(p.customer_id)}"
                f"  (+{lag} ms)")

    def alert_line(self, a: Alert) -> str:
        """One line for an alert, with its evidence in short."""
        self.counts["alert"] += 1
        d = a.data
        if a.type.endswith("dwell.step"):
            detail = (f"{a.subject}  n={d.get('n')} mean={d.get('mean_s')} s "
                      f"p90={d.get('p90_s')} s subscribed={d.get('share_subscribed')}")
        else:
            # a per-customer alert's subject is the customer id
            detail = (f"{mask_id(a.subject)} stuck on {d.get('module')}/{d.get('step')} "
                      f"{d.get('dwell_s')} s at {d.get('terminal_id')}")
        return f"{self._stamp(a.time_ms)}  {self._c('1;31', 'ALERT')}  {a.type:<27} {detail}"

    def dead_letter_line(self, d: DeadLetter) -> str | None:
        """Dead letters are counted; the first few are shown."""
        self.counts["dead_letter"] += 1
        if self.counts["dead_letter"] > 5:
            return None
        more = "  (further dead letters are counted in the stats line)" \
            if self.counts["dead_letter"] == 5 else ""
        detail = mask_numbers(d.detail)[:60]
        return f"{'':12}  {self._c('33', 'DEAD ')}  {d.reason:<14} {detail}{more}"

    def stats_line(self, doc: dict[str, Any]) -> str:
        """A one-line summary of the stats document."""
        ev = doc.get("events", {})
        rules = doc.get("rules", {})
        pushes = sum(r.get("pushes", 0) for r in rules.values())
        conv = sum(r.get("conversions", 0) for r in rules.values())
        blocked = sum(sum(r.get("blocked", {}).values()) for r in rules.values())
        alerts = sum(doc.get("alerts", {}).values())
        return self._c("2", (
            f"{'':12}  STATS  events={sum(ev.values())} "
            + " ".join(f"{k}={v}" for k, v in sorted(ev.items()))
            + f"  pushes={pushes} blocked={blocked} conversions={conv} alerts={alerts}"
            f"  dead_letters={doc.get('dead_letters_total', 0)}"))

    def sinks(self) -> dict[str, DynamicSink[Any]]:
        """One sink per output kind."""
        return {
            "pushes": _Sink(self, self.push_line),
            "alerts": _Sink(self, self.alert_line),
            "dead_letters": _Sink(self, self.dead_letter_line),
            "stats": _Sink(self, self.stats_line),
        }
