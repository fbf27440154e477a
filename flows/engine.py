"""The experience logic per shard of customers: plain Python, no Bytewax, clock injected.

Customers are hashed into a fixed number of shards; one :class:`ShardEngine` owns the
contexts of its customers (open session, current step, recent place visits, call
baseline, what was already pushed). Bytewax calls it through a three-line shim in
``flows/experience.py``. Sharding (rather than one Bytewax key per customer) lets the
event-time watermark reach every customer, so a timer fires at its deadline even if
that customer sends nothing more, and lets one call handle a whole batch.

Two clocks drive it:

* **replay** (event time only): envelopes are buffered and applied in ``(ts, source,
  pos)`` order once a :class:`Tick` says the watermark passed them; timers fire in
  that same order (a timer due at ``d`` fires before an event at ``ts >= d``). The
  output is a pure function of the input.
* **live**: envelopes are applied as they arrive; timers fire when the wall clock
  (``now`` passed in by the shim) reaches their deadline.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import zlib
from array import array
from bisect import insort
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from sys import intern
from types import MappingProxyType
from typing import Any, Final

from flows.cel import ConditionError, DwellEvent
from flows.codec import pack, unpack
from flows.model import (
    Alert,
    CallsEvent,
    ClickEvent,
    Envelope,
    LocationEvent,
    Profile,
    Push,
    PushGuard,
    stable_id,
)
from flows.rules import Campaign, Rule, RuleSet
from state.guards import PROCESS_QUOTA, QuotaStore
from state.profiles import ProfileStore

NO_PROFILES: Final[Mapping[str, Profile]] = MappingProxyType({})
"""An empty, read-only map of profiles by customer id: what a shard holds between live
batches, and what a router hands a shard none of whose clicks it read."""

__all__ = [
    "NO_PROFILES",
    "EngineConfig",
    "Holdout",
    "Progress",
    "ShardEngine",
    "StatDelta",
    "Tick",
    "VisitDone",
    "shard_of",
    "shard_of_key",
    "unit_draw",
]

log = logging.getLogger(__name__)

FOREVER: Final = 2**62
MAX_PLACE_EVENTS: Final = 256
MAX_HELD: Final = 64
"""Most pushes, and most control-group hold-outs, a customer keeps for conversions
(within the conversion window; the oldest go first)."""


def shard_of(customer_id: str, shards: int) -> int:
    """The shard a customer belongs to: stable across runs, processes and hosts."""
    return zlib.crc32(customer_id.encode("utf-8")) % shards


def shard_of_key(key: bytes, shards: int) -> int:
    """:func:`shard_of` for a customer id still in bytes (a Kafka message key)."""
    return zlib.crc32(key) % shards


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine parameters that are not rules (from settings)."""

    shards: int = 64
    idle_ttl_ms: int = 8 * 86_400_000
    session_idle_ms: int = 30 * 60_000
    conversion_window_ms: int = 30 * 60_000
    sweep_interval_ms: int = 10 * 60_000


@dataclass(frozen=True, slots=True)
class Tick:
    """Replay: the event-time watermark passed ``wm``; ``final`` at end of input.

    One tick is sent to every shard; ``shard`` says which (a Bytewax logic is not told
    its key).
    """

    wm: int
    shard: int
    final: bool = False


@dataclass(frozen=True, slots=True)
class Progress:
    """A shard has applied everything up to ``wm`` (feeds step-friction's watermark)."""

    shard: int
    wm: int
    final: bool = False


@dataclass(frozen=True, slots=True)
class VisitDone:
    """A customer finished a visit to one step (left by exit, help, next step or end)."""

    module: str
    step: str
    customer_id: str
    enter_ts: int
    leave_ts: int
    subscribed: bool

    @property
    def dwell_ms(self) -> int:
        """How long the customer stayed."""
        return self.leave_ts - self.enter_ts


def unit_draw(*parts: str) -> float:
    """A number in [0, 1) from a hash of ``parts``: the same parts draw the same number
    in every run, process and host (the lottery and the control group)."""
    h = hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


@dataclass(frozen=True, slots=True)
class Holdout:
    """A customer of a rule's control group: the rule would have pushed, and held out.

    Emitted where the push would have been (same ``push_id`` it would have had), once
    per the rule's ``once_per`` like the push; for uplift against the pushed customers.
    ``hall`` is ``"-"`` outside a session.
    """

    push_id: str
    rule_id: str
    rule_version: int
    campaign: str
    customer_id: str
    ts: int
    hall: str
    module: str


@dataclass(frozen=True, slots=True)
class StatDelta:
    """Counter increments since the last delta: keys like ``("hall", "H1", "tries")``."""

    counts: dict[tuple[str, ...], int]


class _Session:
    __slots__ = ("done", "hall_id", "key", "last_ts", "module", "start_ts", "terminal_id")

    def __init__(self, terminal_id: str, hall_id: str, start_ts: int, key: str) -> None:
        # Terminal, hall, module and step names repeat across customers: interned,
        # millions of contexts share one copy of each.
        self.terminal_id = intern(terminal_id)
        self.hall_id = intern(hall_id)
        self.start_ts = start_ts
        self.last_ts = start_ts
        self.key = key
        self.module: str | None = None
        self.done: set[str] | None = None  # once-per-session keys, made on first use


class _Step:
    __slots__ = ("enter_ts", "fired", "key", "module", "step")

    def __init__(self, module: str, step: str, enter_ts: int, key: str) -> None:
        self.module = intern(module)
        self.step = intern(step)
        self.enter_ts = enter_ts
        self.key = key
        self.fired: set[str] | None = None  # dwell rules already fired, made on first use


class Customer:
    """One customer's context; bounded: old visits, intervals and pushes are trimmed.

    Built for millions of customers: containers are made on first use (most customers
    never get a push, many never click), and event times are kept in ``array('q')``
    (8 bytes each instead of a boxed int): ``places`` maps a place to its sorted visit
    times, ``calls`` is one array of ``ts, total`` pairs sorted by ts.
    """

    __slots__ = ("calls", "held", "last_ts", "once", "places", "push_times", "recent", "session",
                 "step")

    def __init__(self) -> None:
        self.last_ts = 0
        self.session: _Session | None = None
        self.step: _Step | None = None
        self.places: dict[str, array[int]] | None = None
        self.calls: array[int] | None = None
        self.push_times: list[int] | None = None
        self.once: dict[str, int] | None = None
        self.recent: list[tuple[int, str, str, str]] | None = None  # ts, module, rule, hall
        # control-group hold-outs that may still convert (live uplift): as ``recent``
        self.held: list[tuple[int, str, str, str]] | None = None

    def to_state(self) -> list[Any]:
        """Plain data for a snapshot (MessagePack-able)."""
        s = self.session
        st = self.step
        return [
            self.last_ts,
            [s.terminal_id, s.hall_id, s.start_ts, s.last_ts, s.key, s.module, sorted(s.done or ())]
            if s
            else None,
            [st.module, st.step, st.enter_ts, st.key, sorted(st.fired or ())] if st else None,
            {k: v.tolist() for k, v in self.places.items()} if self.places else {},
            _pairs(self.calls) if self.calls else [],
            self.push_times or [],
            self.once or {},
            [list(x) for x in self.recent] if self.recent else [],
            [list(x) for x in self.held] if self.held else [],
        ]

    @classmethod
    def from_state(cls, d: list[Any]) -> Customer:
        """Inverse of :meth:`to_state`."""
        c = cls()
        c.last_ts = d[0]
        if d[1] is not None:
            t, h, start, last, key, module, done = d[1]
            c.session = _Session(t, h, start, key)
            c.session.last_ts = last
            c.session.module = module
            c.session.done = set(done) or None
        if d[2] is not None:
            m, step, enter, key, fired = d[2]
            c.step = _Step(m, step, enter, key)
            c.step.fired = set(fired) or None
        c.places = {k: array("q", v) for k, v in d[3].items()} or None
        c.calls = array("q", [x for pair in d[4] for x in pair]) if d[4] else None
        c.push_times = list(d[5]) or None
        c.once = dict(d[6]) or None
        c.recent = [(a, b, r, h) for a, b, r, h in d[7]] or None
        # d[8] (hold-outs) is absent from snapshots written before live uplift
        c.held = [(a, b, r, h) for a, b, r, h in d[8]] or None if len(d) > 8 else None
        return c


Out = list[Any]


class ShardEngine:
    """All customers of one shard, their timers, and (in replay) the reorder buffer.

    ``incremental`` (a flow with a recovery store) makes :meth:`snapshot` pack only the
    customers changed since the last snapshot and keep every customer's packed bytes
    in between (about 90 B per customer; ``python -m bench snapshot``).
    """

    def __init__(
        self,
        shard: int,
        rules: RuleSet,
        profiles: ProfileStore,
        config: EngineConfig,
        state: dict[str, Any] | None = None,
        quota: QuotaStore | None = None,
        *,
        incremental: bool = False,
    ) -> None:
        self.shard = shard
        # Campaign quotas are shared by all workers: by default every engine of this
        # process (state.guards.PROCESS_QUOTA); across processes, a Redis store.
        self.quota: QuotaStore = quota if quota is not None else PROCESS_QUOTA
        self.rules = rules
        self.profiles = profiles
        # The profiles the current live batch prefetched, read before the store's cache
        # (a dict lookup instead of a locked cache lookup per rule; empty between batches).
        self._held: Mapping[str, Profile] = NO_PROFILES
        self.config = config
        self.customers: dict[str, Customer] = {}
        # Incremental snapshots (a flow with a recovery store): each customer's state as
        # packed by the last snapshot, and the customers changed (or evicted) since, so a
        # snapshot packs only those instead of every customer of the shard.
        self._packed: dict[str, bytes] = {}
        self._changed: set[str] | None = set() if incremental else None
        self.timers: list[tuple[int, str, str, str]] = []  # deadline, customer, visit, rule
        self.buffer: list[tuple[int, str, int, Envelope]] = []
        self.wm = 0
        self.next_sweep = 0
        self.counts: Counter[tuple[str, ...]] = Counter()
        # Events per type, folded into ``counts`` when stats or a snapshot are taken
        # (one string-keyed increment per event instead of a tuple-keyed one).
        self._typed: dict[str, int] = {}
        self._index_rules(rules)
        self._when_errors: dict[str, int] = {}  # per rule, to thin out the log
        # The quota places this shard took, per campaign: in its snapshot, and put back
        # into the store on restore (an in-memory store does not outlive the process).
        self.taken: dict[str, set[str]] = {}
        if state is not None:
            self._restore(state)

    def _index_rules(self, rules: RuleSet) -> None:
        """Derive the per-kind indexes the hot paths use from ``rules``."""
        self.rules = rules
        self._dwell_rules = rules.of_kind("step_dwell")
        place_window: dict[str, int] = {}
        for r in rules.of_kind("location_frequency"):
            place_window[r.trigger.poi] = max(place_window.get(r.trigger.poi, 0),
                                              r.trigger.window)
        self._place_window = place_window
        self._call_rules = rules.of_kind("call_spike")
        self._call_keep = max((r.trigger.max_history for r in self._call_rules), default=0)
        self._call_min_history = min((r.trigger.min_history for r in self._call_rules),
                                     default=0)
        self._event_rules = rules.of_kind("event")

    def set_rules(self, rules: RuleSet) -> None:
        """Swap the rule set of a running shard, keeping every customer's state.

        Contexts, once-per marks, the cap's push times, timers and the reorder buffer
        all stay. A timer of a removed dwell rule fires as a no-op; a timer whose
        deadline no longer matches its rule's dwell (the dwell changed) is dropped,
        and a new or changed dwell rule gets a timer for every customer now in a step,
        due at the step's entry plus the new dwell (a deadline already past fires at
        the next event or tick). Place windows and the call history length follow the
        new rules from the next event on (history a shorter window trimmed is not
        restored).
        """
        old = {r.id: r.trigger.dwell for r in self._dwell_rules}
        self._index_rules(rules)
        fresh = [r for r in self._dwell_rules if old.get(r.id) != r.trigger.dwell]
        if not fresh:
            return
        timers = self.timers
        for cid, c in self.customers.items():
            st = c.step
            if st is None:
                continue
            for r in fresh:
                if st.fired is None or r.id not in st.fired:
                    heapq.heappush(timers, (st.enter_ts + r.trigger.dwell, cid, st.key, r.id))

    # --- snapshots -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The whole shard as plain data (customers, timers, buffer, pending counts).

        Customers are under ``customers`` (each one's :meth:`Customer.to_state`) or, when
        the engine was made ``incremental``, under ``packed``: each one's state as
        MessagePack bytes, re-packed only for customers changed since the last snapshot
        (``python -m bench snapshot``). That map is the engine's own and changes with the
        next event: encode the snapshot before applying more.
        """
        self._fold_counts()
        snap: dict[str, Any] = {
            "wm": self.wm,
            "next_sweep": self.next_sweep,
            "timers": [list(t) for t in self.timers],
            "buffer": [
                [ts, src, pos, _env_to_state(env)] for ts, src, pos, env in self.buffer
            ],
            "counts": [[list(k), v] for k, v in self.counts.items()],
            "quota": {k: sorted(v) for k, v in self.taken.items()},
        }
        changed = self._changed
        if changed is None:
            snap["customers"] = {k: c.to_state() for k, c in self.customers.items()}
            return snap
        packed = self._packed
        customers = self.customers
        for cid in changed:
            c = customers.get(cid)
            if c is None:
                packed.pop(cid, None)  # evicted
            else:
                packed[cid] = pack(c.to_state())
        changed.clear()
        snap["packed"] = packed
        return snap

    def _restore(self, state: dict[str, Any]) -> None:
        self.wm = state["wm"]
        self.next_sweep = state["next_sweep"]
        if "packed" in state:
            packed: dict[str, bytes] = state["packed"]
            self.customers = {k: Customer.from_state(unpack(v)) for k, v in packed.items()}
        else:  # a full snapshot, or one written before incremental snapshots
            self.customers = {k: Customer.from_state(v) for k, v in state["customers"].items()}
            packed = {}
        if self._changed is not None:
            # What the snapshot held packed is current; anything else is packed next time.
            self._packed = dict(packed)  # never another engine's map
            self._changed.update(k for k in self.customers if k not in packed)
        self.timers = [(a, b, c, d) for a, b, c, d in state["timers"]]
        heapq.heapify(self.timers)
        self.buffer = [(ts, src, pos, _env_from_state(e)) for ts, src, pos, e in state["buffer"]]
        heapq.heapify(self.buffer)
        self.counts = Counter({tuple(k): v for k, v in state["counts"]})
        self.taken = {k: set(v) for k, v in state.get("quota", {}).items()}
        for campaign, tokens in self.taken.items():
            try:
                self.quota.restore(campaign, sorted(tokens))
            except Exception as exc:  # a shared store keeps them anyway; do not crash
                log.warning("shard %d: could not put back %d quota place(s) of a campaign "
                            "(%s)", self.shard, len(tokens), type(exc).__name__)

    # --- driving ---------------------------------------------------------------

    def buffer_event(self, env: Envelope) -> None:
        """Replay: hold an event until the watermark passes it."""
        heapq.heappush(self.buffer, (env.event.ts, env.source, env.pos, env))

    def advance(self, wm: int, out: Out) -> None:
        """Replay: apply buffered events and due timers up to ``wm``, in event-time order."""
        buf = self.buffer
        timers = self.timers
        while True:
            ne = buf[0][0] if buf and buf[0][0] <= wm else None
            nt = timers[0][0] if timers and timers[0][0] <= wm else None
            if ne is None and nt is None:
                break
            if nt is not None and (ne is None or nt <= ne):
                self._fire(heapq.heappop(timers), out)
            else:
                self.apply(heapq.heappop(buf)[3], out)
        self.wm = max(self.wm, wm)
        self._maybe_sweep(self.wm)

    def on_live_event(self, env: Envelope, now: int, out: Out) -> None:
        """Live: fire timers due by ``now``, then apply the event as it arrives."""
        self.fire_due(now, out)
        self.apply(env, out)

    def on_live_batch(self, envs: Iterable[Envelope], now: int, out: Out,
                      profiles: Mapping[str, Profile] = NO_PROFILES) -> None:
        """Live: fire timers due by ``now``, then apply a batch of events in order.

        ``profiles`` are profiles already read for this batch (by the router, which
        reads a whole input batch's in one round trip). The profiles clicks may need
        beyond those are fetched first, in one round trip, and the batch's rules read
        them from what the two returned.
        """
        self.fire_due(now, out)
        if not isinstance(envs, list):
            envs = list(envs)
        clicks = [e.event.customer_id for e in envs if type(e.event) is ClickEvent]
        held = profiles
        if profiles:
            self.profiles.remember(profiles)  # last known here, for an outage
            clicks = [cid for cid in clicks if cid not in profiles]
        if clicks:
            fetched = self.profiles.prefetch(clicks)
            if fetched:
                held = {**profiles, **fetched} if profiles else fetched
        apply = self.apply
        self._held = held
        try:
            for env in envs:
                apply(env, out)
        finally:
            self._held = NO_PROFILES

    def _profile(self, customer_id: str) -> Profile:
        """The customer's profile: the one this batch prefetched, else the store's."""
        p = self._held.get(customer_id)
        return p if p is not None else self.profiles.get(customer_id)

    def fire_due(self, now: int, out: Out) -> None:
        """Live: fire every timer whose deadline is at or before ``now``, in deadline order.

        The profiles of the customers whose timers will fire are read first, in one
        round trip. A dwell timer fires long after the click that set it (90 s for
        ``help-sprite``, against a profile cache of seconds), so each one used to cost a
        round trip of its own, one after the other: after a pause (a restart, a stalled
        worker) every timer that came due in it did. Timers that no longer apply (the
        customer moved on) read nothing, as before.
        """
        timers = self.timers
        if timers and timers[0][0] <= now:
            due: list[tuple[int, str, str, str]] = []
            while timers and timers[0][0] <= now:
                due.append(heapq.heappop(timers))  # firing one never schedules another
            held = self._held
            need = {t[1] for t in due
                    if t[1] not in held and self._timer_target(t) is not None}
            if need:
                fetched = self.profiles.prefetch(need)
                self._held = {**held, **fetched} if held else fetched
            try:
                for timer in due:
                    self._fire(timer, out)
            finally:
                self._held = held
        self.wm = max(self.wm, now)
        self._maybe_sweep(now)

    def next_deadline(self) -> int | None:
        """The earliest pending timer (epoch ms), if any."""
        return self.timers[0][0] if self.timers else None

    def take_stats(self) -> StatDelta | None:
        """Counter increments since the last call, or None if nothing moved."""
        self._fold_counts()
        if not self.counts:
            return None
        delta = StatDelta(dict(self.counts))
        self.counts.clear()
        return delta

    def _fold_counts(self) -> None:
        if self._typed:
            counts = self.counts
            for typ, n in self._typed.items():
                counts["events", typ] += n
            self._typed.clear()

    # --- events ----------------------------------------------------------------

    def apply(self, env: Envelope, out: Out) -> None:
        """Apply one event to its customer's context; append what it triggers to ``out``."""
        ev = env.event
        cid = ev.customer_id
        c = self.customers.get(cid)
        if c is None:
            c = self.customers[cid] = Customer()
        changed = self._changed
        if changed is not None:
            changed.add(cid)
        c.last_ts = max(c.last_ts, ev.ts)
        typed = self._typed
        typ = ev.type
        typed[typ] = typed.get(typ, 0) + 1
        cls = type(ev)
        if cls is LocationEvent:
            self._location(c, ev, env, out)  # type: ignore[arg-type]
        elif cls is CallsEvent:
            self._calls(c, ev, env, out)  # type: ignore[arg-type]
        elif cls is ClickEvent:
            self._click(c, ev, env, out)  # type: ignore[arg-type]
        if self._event_rules and env.fresh:
            self._any_event(c, ev, env, out)

    def _any_event(self, c: Customer, ev: Any, env: Envelope, out: Out) -> None:
        typ = ev.type
        for r in self._event_rules:
            t = r.trigger
            if t.type != typ:
                continue
            if typ == "click":
                if ((t.action is not None and ev.action != t.action)
                        or (t.module is not None and ev.module != t.module)
                        or (t.modules and ev.module not in t.modules)
                        or (t.step is not None and ev.step != t.step)):
                    continue
            elif typ == "location" and t.poi is not None and ev.poi != t.poi:
                continue
            module = ((r.push.module if r.push is not None else None) or t.module
                      or (ev.module if t.modules else None))
            reason: dict[str, Any] = {"event_type": typ}
            if typ == "click":
                reason["action"] = ev.action
            elif typ == "location" and ev.poi is not None:
                reason["poi"] = ev.poi
            self._push(c, r, env, ev.ts, module, {}, reason, out)

    def _session_open(self, c: Customer, ts: int) -> _Session | None:
        s = c.session
        if s is not None and ts - s.last_ts > self.config.session_idle_ms:
            # The customer walked away: the session ends, and a step still open is
            # abandoned (not a finished visit: nobody knows when they left it).
            c.session = None
            c.step = None
            return None
        return s

    def _click(self, c: Customer, ev: ClickEvent, env: Envelope, out: Out) -> None:
        ts = ev.ts
        action = ev.action
        counts = self.counts
        s = self._session_open(c, ts)
        if action == "session_start":
            if s is not None:
                self._leave_step(c, ev.customer_id, ts, out)
            s = c.session = _Session(ev.terminal_id, ev.hall_id, ts, env.key)
            counts["hall", ev.hall_id, "sessions"] += 1
        elif s is None or s.terminal_id != ev.terminal_id:
            # A click with no open session on this terminal opens one implicitly.
            if s is not None:
                self._leave_step(c, ev.customer_id, ts, out)
            s = c.session = _Session(ev.terminal_id, ev.hall_id, ts, env.key)
        s.last_ts = max(s.last_ts, ts)
        module = ev.module
        if module is not None:
            s.module = intern(module)

        if action == "session_start":
            self._setup_first(c, ev, env, out)
            self._trial_ending(c, ev, env, out, "session_start")
        elif action == "module_enter":
            assert module is not None
            counts["hall", ev.hall_id, "tries"] += 1
            counts["module", module, "tries"] += 1
            self._module_enter(c, ev, env, out)
            self._trial_ending(c, ev, env, out, "module_enter")
        elif action == "step_enter":
            assert module is not None and ev.step is not None
            self._leave_step(c, ev.customer_id, ts, out)
            key = env.key  # a hash when the click has no event_id: taken once
            c.step = _Step(module, ev.step, ts, key)
            for r in self._dwell_rules:
                heapq.heappush(self.timers, (ts + r.trigger.dwell, ev.customer_id, key, r.id))
        elif action == "step_exit":
            cur = c.step
            if cur is not None and cur.module == module and cur.step == ev.step:
                self._leave_step(c, ev.customer_id, ts, out)
            else:
                counts["clicks", "unmatched_step_exit"] += 1
        elif action == "help":
            counts["module", module or "-", "help"] += 1
            if ev.step is not None:
                counts["step", f"{module}/{ev.step}", "help"] += 1
            self._leave_step(c, ev.customer_id, ts, out)
        elif action == "session_end":
            self._leave_step(c, ev.customer_id, ts, out)
            c.session = None
        elif action == "order":
            assert module is not None
            counts["hall", ev.hall_id, "orders"] += 1
            counts["module", module, "orders"] += 1
            self._convert(c, module, ts)
        else:  # demo_play, rate
            counts["module", module or "-", action] += 1

    def _leave_step(self, c: Customer, cid: str, ts: int, out: Out) -> None:
        st = c.step
        if st is None:
            return
        c.step = None
        if ts < st.enter_ts:
            return
        if self.rules.of_kind("step_friction"):
            subscribed = st.module in self._profile(cid).subscriptions
            out.append(VisitDone(st.module, st.step, cid, st.enter_ts, ts, subscribed))

    # --- rules -----------------------------------------------------------------

    def _module_enter(self, c: Customer, ev: ClickEvent, env: Envelope, out: Out) -> None:
        for r in self.rules.of_kind("module_enter"):
            if r.trigger.module != ev.module:
                continue
            extra: dict[str, Any] = {}
            reason: dict[str, Any] = {"module": ev.module}
            if r.trigger.pref is not None:
                prefs = self._profile(ev.customer_id).prefs.get(r.trigger.pref)
                if not prefs:
                    continue
                extra["genres" if r.trigger.pref == "music" else "prefs"] = list(prefs)
                reason["pref"] = r.trigger.pref
            self._push(c, r, env, ev.ts, ev.module, extra, reason, out)

    def _setup_first(self, c: Customer, ev: ClickEvent, env: Envelope, out: Out) -> None:
        rules = self.rules.of_kind("session_start_unconfigured")
        if not rules:
            return
        p = self._profile(ev.customer_id)
        for r in rules:
            for svc in r.trigger.services:
                if svc in p.subscriptions and svc not in p.configured:
                    reason = {"subscribed": True, "configured": False, "service": svc}
                    self._push(c, r, env, ev.ts, svc, {}, reason, out, profile=p)

    def _trial_ending(
        self, c: Customer, ev: ClickEvent, env: Envelope, out: Out, action: str
    ) -> None:
        rules = self.rules.of_kind("trial_ending")
        if not rules:
            return
        p = self._profile(ev.customer_id)
        if not p.trials:
            return
        for r in rules:
            if action not in r.trigger.actions:
                continue
            for svc, end in sorted(p.trials.items()):
                left = end - ev.ts
                if 0 <= left <= r.trigger.within:
                    reason = {"trial_end": end, "hours_left": round(left / 3_600_000, 2),
                              "within_s": r.trigger.within // 1000}
                    self._push(c, r, env, ev.ts, svc, {"trial_end": end}, reason, out,
                               profile=p)

    def _location(self, c: Customer, ev: LocationEvent, env: Envelope, out: Out) -> None:
        poi = ev.poi
        if poi is None or poi not in self._place_window:
            return
        ts = ev.ts
        places = c.places
        if places is None:
            places = c.places = {}
        times = places.get(poi)
        if times is None:
            times = places[intern(poi)] = array("q")
        if ts not in times:
            insort(times, ts)
        horizon = times[-1] - self._place_window[poi]
        drop = 0
        while drop < len(times) and times[drop] < horizon:
            drop += 1
        if drop or len(times) > MAX_PLACE_EVENTS:
            del times[: max(drop, len(times) - MAX_PLACE_EVENTS)]
        if not env.fresh:
            return
        for r in self.rules.of_kind("location_frequency"):
            t = r.trigger
            if t.poi != poi:
                continue
            visits = count_visits(times, ts - t.window, ts, t.visit_gap)
            if visits >= t.min_visits:
                reason = {"poi": poi, "visits": visits, "min_visits": t.min_visits,
                          "window_s": t.window // 1000, "visit_gap_s": t.visit_gap // 1000}
                self._push(c, r, env, ts, None, {}, reason, out)

    def _calls(self, c: Customer, ev: CallsEvent, env: Envelope, out: Out) -> None:
        if not self._call_keep:
            return
        ts = ev.ts
        total = ev.calls_in + ev.calls_out
        hist = c.calls
        if hist is None:
            hist = c.calls = array("q")
        if env.fresh and len(hist) >= 2 * self._call_min_history:
            if hist[-2] < ts:
                prev = hist[1::2].tolist()
            else:
                prev = [hist[i + 1] for i in range(0, len(hist), 2) if hist[i] < ts]
            for r in self._call_rules:
                tr = r.trigger
                window = prev[-tr.max_history :]
                if len(window) < tr.min_history:
                    continue
                mean = sum(window) / len(window)
                if total >= tr.min_total and total >= tr.factor * mean:
                    reason = {"total": total, "baseline_mean": round(mean, 3),
                              "intervals": len(window), "factor": tr.factor,
                              "min_total": tr.min_total}
                    self._push(c, r, env, ts, None, {"missed": ev.missed}, reason, out)
        # record the interval (replacing a duplicate report of the same interval)
        j = len(hist)
        while j and hist[j - 2] > ts:
            j -= 2
        if j and hist[j - 2] == ts:
            hist[j - 1] = total
        else:
            hist[j:j] = array("q", (ts, total))
            keep = 2 * self._call_keep
            if len(hist) > keep:
                del hist[: len(hist) - keep]

    def _timer_target(self, timer: tuple[int, str, str, str]
                      ) -> tuple[Customer, _Step, Rule] | None:
        """What a due timer fires for (its customer, open step and rule), or None if it
        no longer applies: the customer left that step or was evicted, the rule already
        fired for this visit, or the rule was removed or its dwell changed (see
        :meth:`set_rules`)."""
        deadline, cid, visit_key, rule_id = timer
        c = self.customers.get(cid)
        if c is None:
            return None
        st = c.step
        if st is None or st.key != visit_key or (st.fired is not None and rule_id in st.fired):
            return None
        rule = next((r for r in self._dwell_rules if r.id == rule_id), None)
        if rule is None or deadline != st.enter_ts + rule.trigger.dwell:
            return None
        return c, st, rule

    def _fire(self, timer: tuple[int, str, str, str], out: Out) -> None:
        target = self._timer_target(timer)
        if target is None:
            return  # nothing changes: the customer is not marked for the next snapshot
        c, st, rule = target
        deadline, cid, visit_key, rule_id = timer
        if self._changed is not None:
            self._changed.add(cid)
        if st.fired is None:
            st.fired = set()
        st.fired.add(rule_id)
        p = self._profile(cid)
        s = self._session_open(c, deadline)
        if rule.campaign is not None and not self._targeted(rule, rule.campaign, s, None,
                                                            p, deadline):
            return
        if rule.when is not None:
            ev = DwellEvent(cid, st.enter_ts, s.terminal_id if s else "",
                            s.hall_id if s else "", st.module, st.step)
            if not self._when(rule, ev, p, s, st.module, deadline):
                return
        dwell_s = (deadline - st.enter_ts) // 1000
        if rule.alert is not None:
            data = {
                "rule_id": rule.id,
                "rule_version": rule.version,
                "customer_id": cid,
                "module": st.module,
                "step": st.step,
                "dwell_s": dwell_s,
                "threshold_s": rule.trigger.dwell // 1000,
                "entered_at_ms": st.enter_ts,
                "terminal_id": s.terminal_id if s else None,
                "hall_id": s.hall_id if s else None,
                "subscribed": st.module in p.subscriptions,
            }
            out.append(
                Alert(
                    id=stable_id(rule.id, cid, visit_key),
                    type=rule.alert.type,
                    source=f"/touchstream/rules/{rule.id}",
                    time_ms=deadline,
                    subject=cid,
                    data=data,
                )
            )
            self.counts["alerts", rule.alert.type] += 1
            self.counts["rule", rule.id, "alerts"] += 1
        if rule.push is not None:
            reason = {"dwell_s": dwell_s, "threshold_s": rule.trigger.dwell // 1000,
                      "trigger_event": visit_key}
            self._push_raw(c, cid, rule, visit_key, deadline, st.module, {"step": st.step},
                           reason, out, p, s)

    # --- guards and emission ---------------------------------------------------

    def _push(
        self,
        c: Customer,
        rule: Rule,
        env: Envelope,
        ts: int,
        module: str | None,
        extra: dict[str, Any],
        reason: dict[str, Any],
        out: Out,
        profile: Profile | None = None,
    ) -> None:
        key = reason["trigger_event"] = env.key
        s = self._session_open(c, ts)
        cid = env.event.customer_id
        camp = rule.campaign
        if camp is not None:
            if camp.segments and profile is None:
                profile = self._profile(cid)
            poi = env.event.poi if type(env.event) is LocationEvent else None
            if not self._targeted(rule, camp, s, poi, profile, ts):
                return
        if rule.when is not None:
            # The trigger fired: now (and only now) the rule's condition is evaluated.
            if profile is None:
                profile = self._profile(cid)
            about = module or (rule.push.module if rule.push is not None else None) or ""
            if not self._when(rule, env.event, profile, s, about, ts):
                return
        self._push_raw(c, cid, rule, key, ts, module, extra, reason, out, profile, s)

    def _targeted(
        self,
        rule: Rule,
        camp: Campaign,
        s: _Session | None,
        poi: str | None,
        profile: Profile | None,
        ts: int,
    ) -> bool:
        """The rule's validity window, scope, hours/days and quiet hours at ``ts``; count
        ``blocked:<guard>`` for the first that fails."""
        guard: str | None = None
        if camp.valid_from_ms is not None and ts < camp.valid_from_ms:
            guard = "not_yet_valid"
        elif camp.valid_until_ms is not None and ts >= camp.valid_until_ms:
            guard = "expired"
        elif camp.halls and (s is None or s.hall_id not in camp.halls):
            guard = "scope"
        elif camp.terminals and (s is None or s.terminal_id not in camp.terminals):
            guard = "scope"
        elif camp.pois and poi not in camp.pois:
            guard = "scope"
        elif camp.segments and (profile is None or profile.segment not in camp.segments):
            guard = "scope"
        elif camp.timed and not camp.in_hours(ts):
            guard = "hours"
        elif camp.timed and camp.in_quiet_hours(ts):
            guard = "quiet_hours"
        if guard is None:
            return True
        self.counts["rule", rule.id, "blocked:" + guard] += 1
        return False

    def _when(
        self,
        rule: Rule,
        event: Any,
        profile: Profile,
        s: _Session | None,
        module: str,
        ts: int,
    ) -> bool:
        """Whether a fired rule's ``when`` holds; count ``blocked:when`` if not, and
        ``blocked:when_error`` if it could not be evaluated (which counts as false)."""
        cond = rule.when
        assert cond is not None
        hall, terminal = (s.hall_id, s.terminal_id) if s is not None else ("", "")
        try:
            if cond.holds(event, profile, hall, terminal, module, ts):
                return True
            self.counts["rule", rule.id, "blocked:when"] += 1
        except ConditionError as exc:
            self.counts["rule", rule.id, "blocked:when_error"] += 1
            n = self._when_errors[rule.id] = self._when_errors.get(rule.id, 0) + 1
            if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th ... time per rule and shard
                log.warning("rule %r: its condition failed to evaluate (%s) and counts as "
                            "false; %d time(s) on shard %d", rule.id, exc, n, self.shard)
        return False

    def _push_raw(
        self,
        c: Customer,
        cid: str,
        rule: Rule,
        trigger_key: str,
        ts: int,
        module: str | None,
        extra: dict[str, Any],
        reason: dict[str, Any],
        out: Out,
        profile: Profile | None,
        s: _Session | None,
    ) -> None:
        """Apply the rule's frequency, opt-out and cap guards; emit the push if it passes.

        The push carries the same once-per and cap guards (``Push.guard``) for the
        delivery guard store, which holds them across workers and restarts; session
        scopes stay flow-only, a visit is covered by the push id.
        """
        assert rule.push is not None
        module = module or rule.push.module
        assert module is not None
        counts = self.counts
        # 1. the rule's own frequency
        scope = rule.once_scope
        once_key: str | None = None
        if scope == "period":
            once_key = rule.id
            if c.once is not None and c.once.get(once_key, 0) > ts:
                counts["rule", rule.id, "blocked:once_per"] += 1
                return
        elif scope == "service":
            once_key = f"{rule.id}:{module}"
            if c.once is not None and once_key in c.once:
                counts["rule", rule.id, "blocked:once_per"] += 1
                return
        elif scope in ("session", "session_service") and s is not None:
            session_key = rule.id if scope == "session" else f"{rule.id}:{module}"
            if s.done is not None and session_key in s.done:
                counts["rule", rule.id, "blocked:once_per"] += 1
                return
        # 2. opt-out
        guards = self.rules.guards
        p = profile if profile is not None else self._profile(cid)
        if guards.respect_opt_out and p.opt_out:
            counts["rule", rule.id, "blocked:opt_out"] += 1
            return
        hall = s.hall_id if s is not None else "-"
        push_id = stable_id(rule.id, cid, trigger_key, module)
        camp = rule.campaign
        if camp is not None:
            # 3. the control group: held out (and recorded) as if pushed
            if (camp.control_group is not None
                    and unit_draw("control", camp.campaign, cid) < camp.control_group):
                self._mark_once(c, s, rule, scope, once_key, module, ts)
                counts["rule", rule.id, "holdouts"] += 1
                counts["hall", hall, "holdouts"] += 1
                counts["module", module, "holdouts"] += 1
                out.append(Holdout(push_id, rule.id, rule.version, camp.campaign, cid, ts,
                                   hall, module))
                c.held = self._remember(c.held, ts, module, rule.id, hall)
                return
            # 4. the lottery: one draw per trigger event (a loss uses up once_per)
            if (camp.probability is not None
                    and unit_draw("lottery", rule.id, cid, trigger_key) >= camp.probability):
                self._mark_once(c, s, rule, scope, once_key, module, ts)
                counts["rule", rule.id, "blocked:lottery"] += 1
                return
        # 5. the per-customer cap across rules
        times = None
        if guards.max_pushes_per_customer > 0:
            since = ts - guards.cap_window_ms
            times = c.push_times
            if times is None:
                times = c.push_times = []
            while times and times[0] <= since:
                times.pop(0)
            if len(times) >= guards.max_pushes_per_customer:
                counts["rule", rule.id, "blocked:cap"] += 1
                return
        # 6. the campaign quota, shared by every worker (last: it uses up a prize)
        if camp is not None and camp.quota is not None:
            try:
                won = self.quota.take(camp.campaign, camp.quota, push_id)
            except Exception as exc:  # a store down must not crash the flow
                counts["rule", rule.id, "blocked:quota_unavailable"] += 1
                log.warning("rule %r: quota store unavailable (%s): push refused",
                            rule.id, type(exc).__name__)
                return
            if not won:
                counts["rule", rule.id, "blocked:quota"] += 1
                return
            self.taken.setdefault(camp.campaign, set()).add(push_id)
        if times is not None:
            insort(times, ts)
        self._mark_once(c, s, rule, scope, once_key, module, ts)
        channel = f"terminal:{s.terminal_id}" if s is not None else f"customer:{cid}"
        content: dict[str, Any] = {"module": module, "kind": rule.push.kind}
        if rule.push.text:
            content["text"] = rule.push.text
        content.update(extra)
        reason["rule_version"] = rule.version
        out.append(
            Push(
                push_id=push_id,
                customer_id=cid,
                channel=channel,
                rule_id=rule.id,
                rule_version=rule.version,
                content=content,
                event_ts=ts,
                reason=reason,
                guard=PushGuard(
                    once_key=once_key,
                    once_ttl_ms=rule.once_ms if scope == "period" else None,
                    cap=guards.max_pushes_per_customer,
                    cap_window_ms=guards.cap_window_ms,
                ),
            )
        )
        counts["rule", rule.id, "pushes"] += 1
        counts["hall", hall, "pushes"] += 1
        counts["module", module, "pushes"] += 1
        c.recent = self._remember(c.recent, ts, module, rule.id, hall)

    def _remember(self, log: list[tuple[int, str, str, str]] | None, ts: int, module: str,
                  rule_id: str, hall: str) -> list[tuple[int, str, str, str]]:
        """Append a push or hold-out that may convert; drop those past the window (and
        beyond :data:`MAX_HELD`, the oldest)."""
        window = self.config.conversion_window_ms
        if log is None:
            log = []
        elif log and ts - log[0][0] > window:
            log = [x for x in log if ts - x[0] <= window]
        log.append((ts, module, rule_id, hall))
        if len(log) > MAX_HELD:
            del log[: len(log) - MAX_HELD]
        return log

    @staticmethod
    def _mark_once(c: Customer, s: _Session | None, rule: Rule, scope: str,
                   once_key: str | None, module: str, ts: int) -> None:
        if once_key is not None:
            if c.once is None:
                c.once = {}
            c.once[once_key] = ts + rule.once_ms if scope == "period" else FOREVER
        elif scope in ("session", "session_service") and s is not None:
            if s.done is None:
                s.done = set()
            s.done.add(rule.id if scope == "session" else f"{rule.id}:{module}")

    def _convert(self, c: Customer, module: str, ts: int) -> None:
        """An order of ``module``: the earliest push of it within the conversion window
        converts (``conversions``), and so does the earliest control-group hold-out
        (``control_conversions``, the order rate without a push, for uplift)."""
        if c.recent:
            c.recent = self._match(c.recent, module, ts, "conversions")
        if c.held:
            c.held = self._match(c.held, module, ts, "control_conversions") or None

    def _match(self, log: list[tuple[int, str, str, str]], module: str, ts: int,
               counter: str) -> list[tuple[int, str, str, str]]:
        window = self.config.conversion_window_ms
        log = [x for x in log if ts - x[0] <= window or x[0] > ts]
        for i, (pts, pmod, rule_id, hall) in enumerate(log):
            if pmod == module and 0 <= ts - pts <= window:
                del log[i]
                self.counts["rule", rule_id, counter] += 1
                self.counts["hall", hall, counter] += 1
                self.counts["module", module, counter] += 1
                break
        return log

    # --- memory ----------------------------------------------------------------

    def _maybe_sweep(self, now: int) -> None:
        if now < self.next_sweep:
            return
        self.next_sweep = now + self.config.sweep_interval_ms
        cutoff = now - self.config.idle_ttl_ms
        max_dwell = max((r.trigger.dwell for r in self._dwell_rules), default=0)
        dead = [
            k
            for k, c in self.customers.items()
            if c.last_ts < cutoff and (c.step is None or c.step.enter_ts + max_dwell <= now)
        ]
        changed = self._changed
        for k in dead:
            del self.customers[k]
            if changed is not None:
                changed.add(k)
        if dead:
            self.counts["engine", "evicted"] += len(dead)


def _pairs(flat: array[int]) -> list[list[int]]:
    return [[flat[i], flat[i + 1]] for i in range(0, len(flat), 2)]


def count_visits(times: Sequence[int], start: int, end: int, gap: int) -> int:
    """Visits among sorted event times in ``[start, end]``: runs separated by >= ``gap``."""
    n = 0
    prev: int | None = None
    for t in times:
        if t < start:
            continue
        if t > end:
            break
        if prev is None or t - prev >= gap:
            n += 1
        prev = t
    return n


def _env_to_state(env: Envelope) -> list[Any]:
    ev = env.event
    return [ev.type, asdict(ev), env.key, env.source, env.pos, env.raw, env.fresh]


def _env_from_state(d: list[Any]) -> Envelope:
    # the key (third) is kept in the state for older readers; it is derived again here
    typ, fields, _key, source, pos, raw, fresh = d
    fields = {k: v for k, v in fields.items() if k != "type"}
    cls = {"click": ClickEvent, "location": LocationEvent, "calls": CallsEvent}[typ]
    return Envelope(cls(**fields), source, pos, raw, fresh)
