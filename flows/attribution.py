"""Push → order attribution, with the control group beside it. Plain Python.

A push *converts* when the same customer orders the pushed module within
``window_ms`` after the push (``0 <= order.ts - push.ts <= window_ms``). Each order
is credited to one push only: the latest push of that module to that customer at or
before the order (last touch); a push converts at most once. Control-group records
(:class:`HoldoutRecord`: a push the engine would have sent but held back) are matched
the same way, on their own, so their order rate is what the treated rate is compared
with: ``uplift = treated rate - control rate``.

Results are grouped four ways: per rule, campaign (the rule's campaign id when the
rule set maps one, else the rule id), hall and module.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AttributionReport",
    "GroupStats",
    "HoldoutRecord",
    "OrderRecord",
    "PushRecord",
    "attribute",
]

DIMENSIONS = ("rule", "campaign", "hall", "module")


@dataclass(frozen=True, slots=True)
class PushRecord:
    """A push sent: who, when (event time, ms), which rule, module and hall."""

    push_id: str
    rule_id: str
    customer_id: str
    ts: int
    module: str
    hall: str = "-"


@dataclass(frozen=True, slots=True)
class OrderRecord:
    """An order click: who ordered which module, when, in which hall."""

    customer_id: str
    ts: int
    module: str
    hall: str = "-"


@dataclass(frozen=True, slots=True)
class HoldoutRecord:
    """A control-group record: the push ``rule_id`` would have sent, held back."""

    rule_id: str
    customer_id: str
    ts: int
    hall: str
    module: str


@dataclass(slots=True)
class GroupStats:
    """Counts of one group (one rule, campaign, hall or module)."""

    pushes: int = 0
    customers: set[str] = field(default_factory=set)
    converted: int = 0
    holdouts: int = 0
    holdout_converted: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: counts, rates, and ``uplift`` (None without a control group)."""
        rate = self.converted / self.pushes if self.pushes else None
        crate = self.holdout_converted / self.holdouts if self.holdouts else None
        return {
            "pushes": self.pushes,
            "customers": len(self.customers),
            "orders": self.converted,
            "order_rate": None if rate is None else round(rate, 4),
            "control": self.holdouts,
            "control_orders": self.holdout_converted,
            "control_order_rate": None if crate is None else round(crate, 4),
            "uplift": None if rate is None or crate is None else round(rate - crate, 4),
        }


@dataclass(frozen=True, slots=True)
class AttributionReport:
    """Per dimension (``rule``, ``campaign``, ``hall``, ``module``), per value: stats;
    ``converted`` holds the push ids that converted."""

    window_ms: int
    groups: Mapping[str, Mapping[str, GroupStats]]
    converted: frozenset[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report."""
        return {
            "window_s": self.window_ms // 1000,
            **{dim: {k: g.to_dict() for k, g in sorted(self.groups[dim].items())}
               for dim in DIMENSIONS},
        }


def _match(items: list[tuple[int, str, str]],
           orders: Mapping[tuple[str, str], list[int]], window_ms: int) -> set[str]:
    """Last-touch matching. ``items``: ``(ts, customer, module)`` keyed by index; returns
    the indexes (as str) that converted."""
    by_key: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for i, (ts, cid, module) in enumerate(items):
        by_key.setdefault((cid, module), []).append((ts, str(i)))
    won: set[str] = set()
    for key, touches in by_key.items():
        order_times = orders.get(key)
        if not order_times:
            continue
        touches.sort()
        times = [t for t, _ in touches]
        for ots in order_times:
            # the latest touch at or before the order, not yet credited, within window
            j = bisect.bisect_right(times, ots) - 1
            while j >= 0 and ots - times[j] <= window_ms:
                tid = touches[j][1]
                if tid not in won:
                    won.add(tid)
                    break
                j -= 1
    return won


def attribute(pushes: Iterable[PushRecord], orders: Iterable[OrderRecord],
              window_ms: int, holdouts: Iterable[HoldoutRecord] = (),
              campaigns: Mapping[str, str] | None = None) -> AttributionReport:
    """Attribute orders to pushes (and to control records) within ``window_ms``.

    ``campaigns`` maps a rule id to its campaign id (a rule without one is its own
    campaign).
    """
    if window_ms < 0:
        raise ValueError("window_ms must be >= 0")
    camp = campaigns or {}
    order_times: dict[tuple[str, str], list[int]] = {}
    for o in orders:
        order_times.setdefault((o.customer_id, o.module), []).append(o.ts)
    for v in order_times.values():
        v.sort()
    plist = list(pushes)
    hlist = list(holdouts)
    won_p = _match([(p.ts, p.customer_id, p.module) for p in plist], order_times, window_ms)
    won_h = _match([(h.ts, h.customer_id, h.module) for h in hlist], order_times, window_ms)
    groups: dict[str, dict[str, GroupStats]] = {d: {} for d in DIMENSIONS}

    def keys(rule_id: str, hall: str, module: str) -> list[tuple[str, str]]:
        return [("rule", rule_id), ("campaign", camp.get(rule_id, rule_id)),
                ("hall", hall), ("module", module)]

    converted: set[str] = set()
    for i, p in enumerate(plist):
        hit = str(i) in won_p
        if hit:
            converted.add(p.push_id)
        for dim, k in keys(p.rule_id, p.hall, p.module):
            g = groups[dim].setdefault(k, GroupStats())
            g.pushes += 1
            g.customers.add(p.customer_id)
            g.converted += hit
    for i, h in enumerate(hlist):
        hit = str(i) in won_h
        for dim, k in keys(h.rule_id, h.hall, h.module):
            g = groups[dim].setdefault(k, GroupStats())
            g.holdouts += 1
            g.holdout_converted += hit
    return AttributionReport(window_ms, groups, frozenset(converted))
