"""Logic across customers: step friction, the replay sequencer, and stats. Plain Python."""

from __future__ import annotations

import heapq
from bisect import insort
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from flows.engine import Progress, StatDelta, Tick, VisitDone, shard_of
from flows.model import Alert, DeadLetter, Envelope, stable_id
from flows.rules import RuleSet

__all__ = ["FrictionEngine", "Sequencer", "StatsEngine"]


def _visit_order(v: VisitDone) -> tuple[int, str, int]:
    return (v.leave_ts, v.customer_id, v.enter_ts)


class FrictionEngine:
    """Step friction: many customers slow on one (module, step) in a trailing window.

    Live, visits are evaluated as they arrive. In replay, they are buffered and
    evaluated in ``(leave_ts, module, step, customer, enter_ts)`` order once every
    shard's :class:`Progress` has passed them, so the alerts do not depend on how
    the shards' outputs interleave.
    """

    def __init__(self, rules: RuleSet, shards: int, live: bool,
                 state: dict[str, Any] | None = None) -> None:
        self.rules = rules.of_kind("step_friction")
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
        if state is not None:
            self.last_alert = dict(state["last_alert"])
            self.progress = {int(k): v for k, v in state["progress"].items()}
            for v in state["visits"]:
                visit = VisitDone(*v)
                self._window(v[0], v[1]).append(visit)
                self._count(visit, 1)
            for v in state["buffer"]:
                self._buffer(VisitDone(*v))

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
        """A finished visit arrived from a shard."""
        if not self.rules:
            return
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

    def _evaluate(self, v: VisitDone, out: list[Any]) -> None:
        dq = self._window(v.module, v.step)
        # Live, visits of different customers arrive out of order: keep the window
        # sorted and judge it at the latest leave time known for the step.
        insort(dq, v, key=_visit_order)
        self._count(v, 1)
        t = dq[-1].leave_ts
        while dq and dq[0].leave_ts < t - self._keep:
            self._count(dq.popleft(), -1)
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


class StatsEngine:
    """Sums :class:`StatDelta` counters and dead letters into the stats document."""

    def __init__(self, conversion_window_ms: int, state: dict[str, Any] | None = None) -> None:
        self.window_ms = conversion_window_ms
        self.counts: Counter[tuple[str, ...]] = Counter()
        self.dirty = False
        if state is not None:
            self.counts = Counter({tuple(k): v for k, v in state["counts"]})

    def snapshot(self) -> dict[str, Any]:
        """Plain data for recovery."""
        return {"counts": [[list(k), v] for k, v in self.counts.items()]}

    def add(self, delta: StatDelta) -> None:
        """Add a delta."""
        self.counts.update(delta.counts)
        self.dirty = True

    def dead_letter(self, reason: str) -> None:
        """Count a dead letter."""
        self.counts["dead_letters", reason] += 1
        self.dirty = True

    def render(self, as_of_ms: int | None = None) -> dict[str, Any]:
        """The stats document: per hall, module, rule; events, alerts, dead letters."""
        doc: dict[str, Any] = {
            "halls": {}, "modules": {}, "steps": {}, "rules": {}, "events": {}, "alerts": {},
            "dead_letters": {}, "engine": {}, "clicks": {},
            "conversion_window_s": self.window_ms // 1000,
        }
        if as_of_ms is not None:
            doc["as_of_ms"] = as_of_ms
        groups = {"hall": "halls", "module": "modules", "rule": "rules", "step": "steps"}
        for key, n in sorted(self.counts.items()):
            if key[0] in groups and len(key) == 3:
                d = doc[groups[key[0]]].setdefault(key[1], {})
                name = key[2]
                if name.startswith("blocked:"):
                    d.setdefault("blocked", {})[name[8:]] = n
                else:
                    d[name] = n
            elif len(key) == 2 and key[0] in doc:
                doc[key[0]][key[1]] = n
        for section in ("halls", "modules", "rules"):
            for d in doc[section].values():
                pushes = d.get("pushes", 0)
                if pushes:
                    d["conversion_rate"] = round(d.get("conversions", 0) / pushes, 4)
        doc["dead_letters_total"] = sum(doc["dead_letters"].values())
        return doc
