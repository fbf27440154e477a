"""Logic across customers: step friction, the replay sequencer, and stats. Plain Python."""

from __future__ import annotations

import heapq
import logging
import math
from bisect import insort
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from flows.engine import Progress, StatDelta, Tick, VisitDone, shard_of
from flows.model import Alert, DeadLetter, Envelope, stable_id
from flows.rules import RuleSet

__all__ = ["DEFAULT_MAX_NAMES", "OTHER_NAME", "WINDOW_SIZES_MS", "DwellHistogram",
           "FrictionEngine", "Sequencer", "StatsEngine", "TumblingWindows", "dwell_bucket",
           "rule_campaigns"]

log = logging.getLogger(__name__)


def _visit_order(v: VisitDone) -> tuple[int, str, int]:
    return (v.leave_ts, v.customer_id, v.enter_ts)


# A step with no visit in twice the longest window plus this (late and early clocks: live
# events may be up to engine.max_clock_skew_s ahead, an hour by default) behind the latest
# visit seen is forgotten; FrictionEngine's ``forget_margin_ms`` raises it.
FORGET_MARGIN_MS: Final = 3_600_000
# At most one sweep for forgotten steps per this much event time (or half a window).
SWEEP_EVERY_MS: Final = 60_000


class FrictionEngine:
    """Step friction: many customers slow on one (module, step) in a trailing window.

    Live, visits are evaluated as they arrive. In replay, they are buffered and
    evaluated in ``(leave_ts, module, step, customer, enter_ts)`` order once every
    shard's :class:`Progress` has passed them, so the alerts do not depend on how
    the shards' outputs interleave.

    Memory follows the steps visited lately, not every step name a terminal ever sent:
    a step whose latest visit is more than twice the longest window (plus
    ``forget_margin_ms``, at least :data:`FORGET_MARGIN_MS`; live, the clock skew an
    event may have) behind the latest visit evaluated is forgotten, and so is
    a step's last alert once no rule's ``once`` (plus the longest window) still holds
    it. In replay, visits are evaluated in leave order, so this changes no alert. Live,
    only a visit that arrives more than about the longest window behind the latest one
    could be judged differently (without its step's older visits).
    """

    def __init__(self, rules: RuleSet, shards: int, live: bool,
                 state: dict[str, Any] | None = None, *,
                 forget_margin_ms: int = FORGET_MARGIN_MS) -> None:
        self.rules = rules.of_kind("step_friction")
        self._margin = max(forget_margin_ms, FORGET_MARGIN_MS)
        self.shards = shards
        self.live = live
        self._keep = max((r.trigger.window for r in self.rules), default=0)
        self.windows: dict[tuple[str, str], deque[VisitDone]] = {}
        # Running totals over each whole window (dwell sum, visits per customer), so a
        # rule whose window is the longest one is judged without rescanning it.
        self._dwell_sum: dict[tuple[str, str], int] = {}
        self._who: dict[tuple[str, str], Counter[str]] = {}
        self.last_alert: dict[str, int] = {}
        self.progress: dict[int, int] = {}
        self.buffer: list[tuple[int, str, str, str, int, VisitDone]] = []
        self.high = 0  # the latest leave time evaluated
        self._next_sweep = 0
        if state is not None:
            self.last_alert = dict(state["last_alert"])
            self.progress = {int(k): v for k, v in state["progress"].items()}
            for v in state["visits"]:
                visit = VisitDone(*v)
                self._window(v[0], v[1]).append(visit)
                self._count(visit, 1)
                self.high = max(self.high, visit.leave_ts)
            for v in state["buffer"]:
                self._buffer(VisitDone(*v))

    def set_rules(self, rules: RuleSet) -> None:
        """Swap the rule set while running, keeping the windows, buffer and last alerts.

        The retained history follows the longest new window from the next visit on.
        """
        self.rules = rules.of_kind("step_friction")
        self._keep = max((r.trigger.window for r in self.rules), default=0)

    def snapshot(self) -> dict[str, Any]:
        """Plain data for recovery."""
        def row(v: VisitDone) -> list[Any]:
            return [v.module, v.step, v.customer_id, v.enter_ts, v.leave_ts, v.subscribed]

        return {
            "last_alert": self.last_alert,
            "progress": {str(k): v for k, v in self.progress.items()},
            "visits": [row(v) for dq in self.windows.values() for v in dq],
            "buffer": [row(b[-1]) for b in self.buffer],
        }

    def _window(self, module: str, step: str) -> deque[VisitDone]:
        dq = self.windows.get((module, step))
        if dq is None:
            dq = self.windows[module, step] = deque()
        return dq

    def _count(self, v: VisitDone, sign: int) -> None:
        key = (v.module, v.step)
        self._dwell_sum[key] = self._dwell_sum.get(key, 0) + sign * v.dwell_ms
        who = self._who.get(key)
        if who is None:
            who = self._who[key] = Counter()
        who[v.customer_id] += sign
        if who[v.customer_id] <= 0:
            del who[v.customer_id]

    def _buffer(self, v: VisitDone) -> None:
        heapq.heappush(self.buffer,
                       (v.leave_ts, v.module, v.step, v.customer_id, v.enter_ts, v))

    def on_visit(self, v: VisitDone, out: list[Any]) -> None:
        """A finished visit arrived from a shard.

        Its dwell also goes to the stats, as one count in the module's dwell histogram
        (``("dwell", module, "<bucket>")``, see :func:`dwell_bucket`), for the median
        time per module of the stats windows.
        """
        if not self.rules:
            return
        out.append(StatDelta({("dwell", v.module, str(dwell_bucket(v.dwell_ms))): 1}))
        if self.live:
            self._evaluate(v, out)
        else:
            self._buffer(v)

    def on_progress(self, p: Progress, out: list[Any]) -> None:
        """Replay: a shard reached ``p.wm``; evaluate what every shard has passed."""
        self.progress[p.shard] = max(self.progress.get(p.shard, 0), p.wm)
        if len(self.progress) < self.shards:
            return
        wm = min(self.progress.values())
        buf = self.buffer
        while buf and buf[0][0] <= wm:
            self._evaluate(heapq.heappop(buf)[-1], out)

    def flush(self, out: list[Any]) -> None:
        """End of input: evaluate everything still buffered."""
        buf = self.buffer
        while buf:
            self._evaluate(heapq.heappop(buf)[-1], out)

    def _sweep(self) -> None:
        """Forget the steps and last alerts that no later visit can need (see the class)."""
        horizon = self.high - 2 * self._keep - self._margin
        for key in [k for k, dq in self.windows.items() if not dq or dq[-1].leave_ts < horizon]:
            del self.windows[key]
            self._dwell_sum.pop(key, None)
            self._who.pop(key, None)
        once = max((r.once_ms for r in self.rules), default=0)
        cutoff = self.high - once - self._keep - self._margin
        self.last_alert = {k: t for k, t in self.last_alert.items() if t >= cutoff}
        self._next_sweep = self.high + max(self._keep // 2, SWEEP_EVERY_MS)

    def _evaluate(self, v: VisitDone, out: list[Any]) -> None:
        dq = self._window(v.module, v.step)
        # Live, visits of different customers arrive out of order: keep the window
        # sorted and judge it at the latest leave time known for the step.
        insort(dq, v, key=_visit_order)
        self._count(v, 1)
        t = dq[-1].leave_ts
        while dq and dq[0].leave_ts < t - self._keep:
            self._count(dq.popleft(), -1)
        if t > self.high:
            self.high = t
            if t >= self._next_sweep:
                self._sweep()
        key2 = (v.module, v.step)
        for rule in self.rules:
            tr = rule.trigger
            if tr.modules and v.module not in tr.modules:
                continue
            key = f"{rule.id}|{v.module}|{v.step}"
            last = self.last_alert.get(key)
            if last is not None and t - last < rule.once_ms:
                continue  # alerted on this step lately
            if tr.window >= self._keep:
                # The whole window (every visit left by t): decide from the totals.
                if (len(self._who[key2]) < tr.min_customers
                        or self._dwell_sum[key2] < tr.mean_dwell * len(dq)):
                    continue
            start = t - tr.window
            visits = [x for x in dq if start <= x.leave_ts <= t]
            longest: dict[str, VisitDone] = {}
            for x in visits:
                cur = longest.get(x.customer_id)
                if cur is None or x.dwell_ms > cur.dwell_ms:
                    longest[x.customer_id] = x
            n = len(longest)
            if n < tr.min_customers:
                continue
            dwells = sorted(x.dwell_ms for x in visits)
            mean = sum(dwells) / len(dwells)
            if mean < tr.mean_dwell:
                continue
            self.last_alert[key] = t
            p90 = dwells[max(0, -(-9 * len(dwells) // 10) - 1)]
            subscribed = {x.customer_id for x in visits if x.subscribed}
            samples = sorted(longest.values(), key=lambda x: (-x.dwell_ms, x.customer_id))
            assert rule.alert is not None
            data = {
                "rule_id": rule.id,
                "rule_version": rule.version,
                "module": v.module,
                "step": v.step,
                "n": n,
                "visits": len(visits),
                "mean_s": round(mean / 1000, 1),
                "p90_s": round(p90 / 1000, 1),
                "share_subscribed": round(len(subscribed) / n, 3),
                "window_s": tr.window // 1000,
                "threshold_mean_s": tr.mean_dwell // 1000,
                "min_customers": tr.min_customers,
                "samples": [
                    {"customer_id": x.customer_id, "dwell_s": round(x.dwell_ms / 1000, 1),
                     "subscribed": x.customer_id in subscribed}
                    for x in samples[: tr.samples]
                ],
            }
            out.append(Alert(
                id=stable_id(rule.id, v.module, v.step, t),  # t: when the condition held
                type=rule.alert.type,
                source=f"/touchstream/rules/{rule.id}",
                time_ms=t,
                subject=f"{v.module}/{v.step}",
                data=data,
            ))
            out.append(StatDelta({("alerts", rule.alert.type): 1,
                                  ("rule", rule.id, "alerts"): 1}))


@dataclass
class Sequencer:
    """Replay: the event-time watermark of one ordered source, and lateness.

    The watermark is the greatest event time seen minus the allowed lateness. An
    event older than the watermark is late (a dead letter); every other event goes
    to its shard, and a :class:`Tick` goes to every shard whenever the watermark
    moves on by ``tick_ms``. At end of input, a final tick at the greatest event time
    fires every timer due by then.
    """

    shards: int
    lateness_ms: int
    tick_ms: int
    max_ts: int | None = None
    last_tick: int = 0

    def on_event(self, env: Envelope, out: list[tuple[str, Any]]) -> DeadLetter | None:
        """Route one event (as ``(shard_key, item)`` into ``out``) or return it as late."""
        ts = env.event.ts
        if self.max_ts is not None and ts < self.max_ts - self.lateness_ms:
            return DeadLetter("late", f"event time is more than {self.lateness_ms // 1000} s "
                              "behind the latest event time", env.raw, env.source, env.pos)
        out.append((shard_key(shard_of(env.event.customer_id, self.shards)), env))
        if self.max_ts is None or ts > self.max_ts:
            self.max_ts = ts
            wm = ts - self.lateness_ms
            if wm - self.last_tick >= self.tick_ms:
                self.last_tick = wm
                self._tick(wm, False, out)
        return None

    def on_eof(self, out: list[tuple[str, Any]]) -> None:
        """End of input: the final tick."""
        if self.max_ts is not None:
            self._tick(self.max_ts, True, out)

    def _tick(self, wm: int, final: bool, out: list[tuple[str, Any]]) -> None:
        for s in range(self.shards):
            out.append((shard_key(s), Tick(wm, s, final)))


def shard_key(shard: int) -> str:
    """The Bytewax key of a shard."""
    return f"shard-{shard:04d}"


WINDOW_SIZES_MS: Final = (60_000, 3_600_000, 86_400_000)
"""The tumbling stats windows: 1 minute, 1 hour, 1 day (aligned to the UTC epoch)."""

# Terminals name halls, modules and steps: the stats keep at most this many distinct names
# of each kind (a real estate has hundreds of modules, thousands of steps) and count the
# rest under OTHER_NAME, so a terminal that sends a new name per click cannot grow them
# without bound.
DEFAULT_MAX_NAMES: Final = 10_000
OTHER_NAME: Final = "(other)"
# Counter key kinds whose second part a terminal chooses, and the kind of name it is.
_NAMED: Final = {"hall": "hall", "module": "module", "step": "step", "dwell": "module"}

_EXACT_S: Final = 120
_RATIO: Final = 1.05
MAX_DWELL_BUCKET: Final = _EXACT_S + math.ceil(math.log(86_400 / _EXACT_S) / math.log(_RATIO))


def dwell_bucket(dwell_ms: int) -> int:
    """The histogram bucket of a dwell: whole seconds below 120 s (buckets 0-119), then
    buckets 5 % wide up to one day (the last bucket takes anything longer), so a
    module's histogram never has more than :data:`MAX_DWELL_BUCKET` + 1 buckets."""
    sec = max(0, dwell_ms) / 1000
    if sec < _EXACT_S:
        return int(sec)
    return min(MAX_DWELL_BUCKET, _EXACT_S + int(math.log(sec / _EXACT_S) / math.log(_RATIO)))


def bucket_seconds(bucket: int) -> float:
    """A bucket's representative dwell in seconds: its whole second below 120 s, else
    the geometric middle of the 5 % bucket (within 2.5 % of any dwell in it)."""
    if bucket < _EXACT_S:
        return float(bucket)
    return round(float(_EXACT_S * _RATIO ** (bucket - _EXACT_S + 0.5)), 1)


class DwellHistogram:
    """Bounded dwell histogram of one module (at most ~260 buckets) with its median."""

    __slots__ = ("buckets", "n")

    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        self.n = 0

    def add(self, bucket: int, n: int = 1) -> None:
        """Count ``n`` visits in ``bucket``."""
        self.buckets[bucket] += n
        self.n += n

    def median_s(self) -> float | None:
        """The (lower) median in seconds: exact to the second below 120 s."""
        if self.n <= 0:
            return None
        need = (self.n + 1) // 2
        seen = 0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen >= need:
                return bucket_seconds(b)
        return None  # pragma: no cover - unreachable: the counts sum to n


def _group(counts: Mapping[tuple[str, ...], int], doc: dict[str, Any]) -> None:
    """Fold ``(section, name, counter)`` keys into ``doc``'s sections (``blocked:x``
    under ``blocked``) and ``(section, name)`` keys into flat sections."""
    groups = {"hall": "halls", "module": "modules", "rule": "rules", "step": "steps"}
    for key, n in sorted(counts.items()):
        if key[0] in groups and len(key) == 3:
            d = doc[groups[key[0]]].setdefault(key[1], {})
            name = key[2]
            if name.startswith("blocked:"):
                d.setdefault("blocked", {})[name[8:]] = n
            else:
                d[name] = n
        elif len(key) == 2 and key[0] in doc:
            doc[key[0]][key[1]] = n


def _rates(doc: dict[str, Any], sections: tuple[str, ...]) -> None:
    """Conversion rates; where a control group held customers out (``holdouts``), also
    ``control_conversions``, ``control_conversion_rate`` and ``uplift`` (the pushed
    customers' order rate minus the held-out customers'; null without pushes)."""
    for section in sections:
        for d in doc[section].values():
            pushes = d.get("pushes", 0)
            rate = None
            if pushes:
                rate = d["conversion_rate"] = round(d.get("conversions", 0) / pushes, 4)
            holdouts = d.get("holdouts", 0)
            if holdouts:
                control = d.setdefault("control_conversions", 0)
                d["control_conversion_rate"] = round(control / holdouts, 4)
                d["uplift"] = None if rate is None else round(
                    d.get("conversions", 0) / pushes - control / holdouts, 4)


class _Window:
    __slots__ = ("counts", "dwell")

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, ...]] = Counter()
        self.dwell: dict[str, DwellHistogram] = {}


class TumblingWindows:
    """Stats counters in tumbling windows of each size in ``sizes_ms``.

    Counts are stamped with a time (``add(at_ms, counts)``) and land in the window of
    each size that holds that time; ``close(now_ms)`` returns the document of every
    window that ended at or before ``now_ms`` and forgets it. Memory is bounded: per
    size, the open windows (normally one), each with one counter per (hall | module |
    rule | step, counter name) seen and one bounded :class:`DwellHistogram` per module.
    A count stamped before a window already closed goes to the oldest open window of
    that size (never dropped; counted as ``late`` in the window's document).
    """

    def __init__(self, sizes_ms: tuple[int, ...] = WINDOW_SIZES_MS,
                 campaigns: Mapping[str, str] | None = None,
                 state: dict[str, Any] | None = None) -> None:
        if any(s <= 0 for s in sizes_ms):
            raise ValueError("window sizes must be > 0")
        self.sizes = tuple(sizes_ms)
        self.campaigns = dict(campaigns or {})
        self.open: dict[int, dict[int, _Window]] = {s: {} for s in self.sizes}
        self.closed_until: dict[int, int] = {s: 0 for s in self.sizes}
        if state is not None:
            for size, starts in state["open"]:
                if size not in self.open:
                    continue
                for start, counts, dwell in starts:
                    w = self.open[size][start] = _Window()
                    w.counts = Counter({tuple(k): v for k, v in counts})
                    for module, buckets in dwell:
                        h = w.dwell[module] = DwellHistogram()
                        for b, n in buckets:
                            h.add(b, n)
            for size, until in state["closed_until"]:
                if size in self.closed_until:
                    self.closed_until[size] = until

    def snapshot(self) -> dict[str, Any]:
        """Plain data for recovery."""
        return {
            "open": [[size, [[start, [[list(k), v] for k, v in w.counts.items()],
                              [[m, sorted(h.buckets.items())] for m, h in w.dwell.items()]]
                             for start, w in wins.items()]]
                     for size, wins in self.open.items()],
            "closed_until": [[s, t] for s, t in self.closed_until.items()],
        }

    def add(self, at_ms: int, counts: Mapping[tuple[str, ...], int]) -> None:
        """Add counts stamped ``at_ms`` (``("dwell", module, bucket)`` keys feed the
        module's dwell histogram)."""
        if not counts:
            return
        for size, wins in self.open.items():
            start = at_ms - at_ms % size
            late = start < self.closed_until[size]
            if late:
                start = min(wins) if wins else self.closed_until[size]
            w = wins.get(start)
            if w is None:
                w = wins[start] = _Window()
            for key, n in counts.items():
                if key[0] == "dwell" and len(key) == 3:
                    h = w.dwell.get(key[1])
                    if h is None:
                        h = w.dwell[key[1]] = DwellHistogram()
                    h.add(int(key[2]), n)
                else:
                    w.counts[key] += n
            if late:
                w.counts["engine", "late"] += 1

    def close(self, now_ms: int) -> list[dict[str, Any]]:
        """Documents of the windows that ended by ``now_ms`` (oldest first, smallest
        size first), now forgotten."""
        docs: list[dict[str, Any]] = []
        for size, wins in self.open.items():
            for start in sorted(wins):
                if start + size > now_ms:
                    break
                docs.append(self._doc(size, start, wins.pop(start)))
                self.closed_until[size] = max(self.closed_until[size], start + size)
        return docs

    def _doc(self, size: int, start: int, w: _Window) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": "window", "size_s": size // 1000, "start_ms": start,
            "end_ms": start + size, "halls": {}, "modules": {}, "steps": {}, "rules": {},
            "events": {}, "alerts": {}, "dead_letters": {}, "engine": {},
        }
        _group(w.counts, doc)
        for module, h in sorted(w.dwell.items()):
            d = doc["modules"].setdefault(module, {})
            d["step_visits"] = h.n
            d["median_step_s"] = h.median_s()
        if self.campaigns:
            doc["campaigns"] = _campaigns(doc["rules"], self.campaigns)
        _rates(doc, ("halls", "modules", "rules") + (("campaigns",) if self.campaigns else ()))
        return doc

    def due(self, now_ms: int) -> bool:
        """Whether a window has ended by ``now_ms`` (:meth:`close` would return it)."""
        return any(start + size <= now_ms
                   for size, wins in self.open.items() for start in wins)


def rule_campaigns(rules: RuleSet) -> dict[str, str]:
    """Rule id -> campaign name, for the rules that have campaign fields (for
    :class:`StatsEngine`'s ``campaigns``)."""
    return {r.id: r.campaign.campaign for r in rules.rules if r.campaign is not None}


def _campaigns(rules: Mapping[str, Mapping[str, Any]],
               campaigns: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The rules' counters summed per campaign (a rule without one is its own)."""
    camps: dict[str, dict[str, Any]] = {}
    for rid, counters in rules.items():
        c = camps.setdefault(campaigns.get(rid, rid), {})
        for name, n in counters.items():
            if name == "blocked":
                b = c.setdefault("blocked", {})
                for g, m in n.items():
                    b[g] = b.get(g, 0) + m
            else:
                c[name] = c.get(name, 0) + n
    return camps


class StatsEngine:
    """Sums :class:`StatDelta` counters and dead letters into the stats document, and
    into tumbling windows (:class:`TumblingWindows`: 1 min, 1 h, 1 day).

    The cumulative document (:meth:`render`) is unchanged by the windows. Live (a
    render with ``as_of_ms``), the counts that arrived since the last render (or were
    added with ``at_ms``) are stamped with that time, and the windows that have ended
    are returned in the document's ``windows`` list, each once. Deltas carry no event
    time, so windows are by arrival time: a count lands up to about two
    ``stats_interval_s`` after the events behind it. A replay's single document has no
    ``windows``.

    ``campaigns`` maps rule ids to campaign names: with it, the documents (cumulative
    and windows) also sum the rules' counters per campaign (``campaigns``).
    At most ``max_names`` distinct hall, module and step names each are kept (the first
    ones seen, remembered in snapshots); counts of further names go to
    :data:`OTHER_NAME`, and ``engine.stats_names_folded`` counts those increments.
    :meth:`set_campaigns` adds the rules of a new rule set; the mapping is snapshotted.
    Where a rule's control group held customers out, its entry (and its campaign's,
    hall's and module's) has ``holdouts``, ``control_conversions`` and ``uplift``.
    """

    def __init__(self, conversion_window_ms: int, state: dict[str, Any] | None = None, *,
                 window_sizes_ms: tuple[int, ...] = WINDOW_SIZES_MS,
                 campaigns: Mapping[str, str] | None = None,
                 max_names: int = DEFAULT_MAX_NAMES) -> None:
        if max_names < 1:
            raise ValueError("max_names must be >= 1")
        self.window_ms = conversion_window_ms
        self.max_names = max_names
        self.names: dict[str, set[str]] = {"hall": set(), "module": set(), "step": set()}
        self._warned: set[str] = set()
        self.counts: Counter[tuple[str, ...]] = Counter()
        self.dirty = False
        self.pending: Counter[tuple[str, ...]] = Counter()
        camps = dict(campaigns or {})
        wstate = None
        if state is not None:
            self.counts = Counter({tuple(k): v for k, v in state["counts"]})
            self.pending = Counter({tuple(k): v for k, v in state.get("pending", ())})
            wstate = state.get("windows")
            camps.update({str(k): str(v) for k, v in state.get("campaigns", ())})
        self.windows = TumblingWindows(window_sizes_ms, camps, wstate)
        for key in (*self.counts, *self.pending):  # the names kept before the snapshot
            kind = _NAMED.get(key[0])
            if kind is not None and len(key) == 3 and key[1] != OTHER_NAME:
                self.names[kind].add(key[1])

    @property
    def campaigns(self) -> Mapping[str, str]:
        """Rule id -> campaign name."""
        return self.windows.campaigns

    def set_campaigns(self, campaigns: Mapping[str, str]) -> None:
        """Add (or move) rules' campaigns, e.g. from a rule set applied while running;
        rules no longer in force keep theirs, for the counts they already have."""
        self.windows.campaigns.update(campaigns)

    def snapshot(self) -> dict[str, Any]:
        """Plain data for recovery."""
        return {"counts": [[list(k), v] for k, v in self.counts.items()],
                "pending": [[list(k), v] for k, v in self.pending.items()],
                "windows": self.windows.snapshot(),
                "campaigns": sorted(self.windows.campaigns.items())}

    def _fold(self, counts: Mapping[tuple[str, ...], int]) -> Mapping[tuple[str, ...], int]:
        """``counts`` with names past ``max_names`` of their kind as :data:`OTHER_NAME`."""
        names = self.names
        for key in counts:
            kind = _NAMED.get(key[0])
            if kind is not None and len(key) == 3 and key[1] not in names[kind]:
                break
        else:
            return counts  # every name already kept: the usual case
        out: Counter[tuple[str, ...]] = Counter()
        folded = 0
        for key, n in counts.items():
            kind = _NAMED.get(key[0])
            if kind is not None and len(key) == 3 and key[1] not in names[kind]:
                kept = names[kind]
                if len(kept) < self.max_names:
                    kept.add(key[1])
                elif key[1] != OTHER_NAME:
                    if kind not in self._warned:
                        self._warned.add(kind)
                        log.warning("stats: more than %d distinct %s names; counting "
                                       "further ones as %r", self.max_names, kind, OTHER_NAME)
                    out[key[0], OTHER_NAME, key[2]] += n
                    folded += n
                    continue
            out[key] += n
        if folded:
            out["engine", "stats_names_folded"] += folded
        return out

    def add(self, delta: StatDelta, at_ms: int | None = None) -> None:
        """Add a delta (``at_ms``: when it arrived; else stamped at the next render)."""
        counts = self._fold(delta.counts)
        if any(k[0] == "dwell" for k in counts):
            self.counts.update({k: n for k, n in counts.items() if k[0] != "dwell"})
        else:
            self.counts.update(counts)
        if at_ms is None:
            self.pending.update(counts)
        else:
            self.windows.add(at_ms, counts)
        self.dirty = True

    def dead_letter(self, reason: str) -> None:
        """Count a dead letter."""
        self.counts["dead_letters", reason] += 1
        self.pending["dead_letters", reason] += 1
        self.dirty = True

    def due(self, now_ms: int) -> bool:
        """Whether a render at ``now_ms`` would close a window (or has counts to stamp
        into one): live, a window still closes while no delta arrives."""
        return bool(self.pending) or self.windows.due(now_ms)

    def render(self, as_of_ms: int | None = None) -> dict[str, Any]:
        """The stats document: per hall, module, rule (and campaign); events, alerts,
        dead letters;
        with ``as_of_ms``, also ``windows``: the windows that ended by then."""
        doc: dict[str, Any] = {
            "halls": {}, "modules": {}, "steps": {}, "rules": {}, "events": {}, "alerts": {},
            "dead_letters": {}, "engine": {}, "clicks": {},
            "conversion_window_s": self.window_ms // 1000,
        }
        if as_of_ms is not None:
            doc["as_of_ms"] = as_of_ms
        _group(self.counts, doc)
        sections: tuple[str, ...] = ("halls", "modules", "rules")
        if self.campaigns:
            doc["campaigns"] = _campaigns(doc["rules"], self.campaigns)
            sections += ("campaigns",)
        _rates(doc, sections)
        doc["dead_letters_total"] = sum(doc["dead_letters"].values())
        if as_of_ms is not None:
            if self.pending:
                self.windows.add(as_of_ms, self.pending)
                self.pending.clear()
            doc["windows"] = self.windows.close(as_of_ms)
        return doc
