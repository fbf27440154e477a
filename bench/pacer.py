"""Paced, traceable live traffic for the latency bench.

:class:`Traffic` makes the events: 80 % network signals (location and call volumes of
a large population), 20 % terminal clicks. Every event carries an ``event_id``
(``<tag>-<seq>``) and ``ts`` = the wall clock at the moment it is sent, so every push
can be traced back, through ``reason.trigger_event``, to the send time of the event
that caused it. Pushes are made to land on streams a reader knows in advance:

* **clicks** come from a fixed set of demo-hall terminals (``H01-T00`` ...), one
  session at a time per terminal, each session by a fresh customer of the click
  population; session pushes (``setup-first``, ``music-pref``, ``trial-ending``) go to
  ``push:terminal:<terminal_id>``;
* a small share of the **network** events belong to scripted customers of a numbered
  set (:meth:`Traffic.net_customer`): a cinema visit three hours ago and three ordinary
  call intervals arrive late (history, trigger nothing), then a cinema location and a
  call burst arrive fresh: ``cinema-pay`` and ``call-spike`` push to
  ``push:customer:<customer_id>``;
* the rest of the network traffic (random customers, ordinary call volumes, a
  single fresh visit to a place) triggers nothing;
* **stuck** customers (:meth:`Traffic.add_stuck`) start a session on one of the
  ``H04`` terminals, enter a step and send nothing more: ``help-sprite`` fires at the
  dwell mark (timer lateness).

:class:`Pacer` sends :class:`Traffic` to Kafka at a fixed rate and records the wall
clock (``time.time_ns()``) of every send, indexed by ``seq``.
"""

from __future__ import annotations

import random
import time
from array import array
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer

from bench.workload import customer_id, session_script
from connectors.demo import HALLS, MODULES
from flows.codec import json_dumps
from flows.model import Profile

__all__ = [
    "CLICK_CUSTOMERS",
    "NET_BASE",
    "PRODUCER_CONFIG",
    "STUCK_BASE",
    "STUCK_HALL",
    "Pacer",
    "PhaseRecord",
    "Traffic",
    "click_profiles",
    "parse_event_id",
]

CLICK_CUSTOMERS = 100_000
"""Size of the click population (customers ``customer_id(0 .. n-1)``, with profiles)."""
BACKGROUND_CUSTOMERS = 1_000_000
"""Network background traffic is spread over this many customers."""
NET_BASE = 2_000_000
"""Scripted network customers are ``customer_id(NET_BASE + k)`` (no profile)."""
STUCK_BASE = 3_000_000
"""Stuck customers are ``customer_id(STUCK_BASE + k)`` (no profile)."""
STUCK_HALL = "H04"
STEPS = ("intro", "pair", "door_sensor_setup", "confirm")
POIS = ("mall", "stadium", "office", "cinema", "home", None)
HOUR_MS = 3_600_000
PRODUCER_CONFIG: dict[str, Any] = {"linger.ms": 5}
"""The load producer's settings: librdkafka's default ``linger.ms`` (what an upstream
producer would use). It is part of the measured path (a send waits up to 5 ms)."""


def parse_event_id(event_id: str) -> tuple[str, int] | None:
    """``"<tag>-<seq>"`` -> ``(tag, seq)``; None for anything else (probes included)."""
    tag, sep, seq = event_id.rpartition("-")
    if not sep or not seq.isdigit():
        return None
    return tag, int(seq)


def click_profiles(n: int = CLICK_CUSTOMERS, seed: int = 1,
                   now_ms: int | None = None) -> list[Profile]:
    """Profiles of the click population: many subscribers who never set their service
    up (``setup-first``), some music lovers (``music-pref``), some trials ending within
    a day (``trial-ending``). Trials end 24 h after ``now_ms``."""
    rng = random.Random(seed)
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    out: list[Profile] = []
    for i in range(n):
        subs = {m for m in ("care_link", "remote_cam") if rng.random() < 0.5}
        subs |= {m for m in MODULES if m not in subs and rng.random() < 0.1}
        configured = frozenset(m for m in sorted(subs) if rng.random() < 0.3)
        trials = {"mobile_paper": now + 24 * HOUR_MS} if rng.random() < 0.2 else {}
        out.append(Profile(
            customer_id(i),
            subscriptions=frozenset(subs),
            configured=configured,
            segment=rng.choice(("youth", "family", "senior", None)),
            prefs={"music": ("jazz",)} if rng.random() < 0.3 else {},
            trials=trials,
        ))
    return out


@dataclass
class Traffic:
    """The event generator (deterministic for a seed, apart from the timestamps).

    ``next_event()`` returns ``(kind, customer_id, document)`` with ``kind`` one of
    ``clicks``, ``location``, ``calls``; the caller sets ``ts`` and ``event_id``.
    """

    seed: int = 1
    click_share: float = 0.2
    net_share: float = 0.02
    """Share of the network events that belong to scripted (pushing) customers."""
    terminals_per_hall: int = 40
    net_customers: int = 2000
    """How many scripted network customers may be used (the reader XREADs their streams)."""
    net_offset: int = 0
    """First scripted customer index (different per run)."""
    stuck_offset: int = 0
    click_customers: int = CLICK_CUSTOMERS

    rng: random.Random = field(init=False)
    terminals: list[tuple[str, str]] = field(init=False)
    _sessions: list[list[dict[str, Any]]] = field(init=False)
    _busy: set[str] = field(init=False)
    _net_pool: list[list[tuple[str, dict[str, Any]]]] = field(init=False)
    _net_used: int = field(init=False, default=0)
    _stuck: deque[dict[str, Any]] = field(init=False)
    _stuck_made: int = field(init=False, default=0)
    stuck_allowed: int = 0
    """How many stuck clicks may go out so far (the pacer raises it over time)."""
    net_pool_size: int = 10
    net_exhausted: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.terminals = [(h, f"{h}-T{t:02d}") for h in HALLS
                          for t in range(self.terminals_per_hall)]
        self._sessions = [[] for _ in self.terminals]
        self._busy = set()
        self._net_pool = []
        self._stuck = deque()

    # --- who the reader has to watch ----------------------------------------------------

    def terminal_ids(self) -> list[str]:
        """Every terminal this traffic clicks on (session and stuck terminals)."""
        return [t for _, t in self.terminals] + self.stuck_terminal_ids()

    def stuck_terminal_ids(self) -> list[str]:
        """The terminals stuck customers use."""
        return [f"{STUCK_HALL}-T{t:02d}" for t in range(self.terminals_per_hall)]

    def net_customer(self, k: int) -> str:
        """The k-th scripted network customer of this traffic."""
        return customer_id(NET_BASE + self.net_offset + k)

    def net_customer_ids(self) -> list[str]:
        """Every scripted network customer this traffic may use."""
        return [self.net_customer(k) for k in range(self.net_customers)]

    @property
    def net_used(self) -> int:
        """Scripted network customers started so far."""
        return self._net_used

    # --- stuck customers --------------------------------------------------------------

    def add_stuck(self, n: int, module: str = "remote_cam",
                  step: str = "door_sensor_setup") -> int:
        """Queue ``n`` customers who start a session, enter a step and stay there.

        Returns the number of clicks queued (3 per customer); they go out as the
        pacer raises :attr:`stuck_allowed`.
        """
        stuck_terms = self.stuck_terminal_ids()
        for _ in range(n):
            k = self._stuck_made
            self._stuck_made += 1
            cid = customer_id(STUCK_BASE + self.stuck_offset + k)
            term = stuck_terms[k % len(stuck_terms)]
            base = {"type": "click", "customer_id": cid, "terminal_id": term,
                    "hall_id": STUCK_HALL}
            self._stuck.append({**base, "action": "session_start"})
            self._stuck.append({**base, "action": "module_enter", "module": module})
            self._stuck.append({**base, "action": "step_enter", "module": module,
                                "step": step})
        return 3 * n

    # --- events -----------------------------------------------------------------------

    def next_event(self, now_ms: int) -> tuple[str, str, dict[str, Any]]:
        """The next event (``ts`` is set to ``now_ms``; history records get older ones)."""
        rng = self.rng
        if rng.random() < self.click_share:
            if self._stuck and self.stuck_allowed > 0:
                self.stuck_allowed -= 1
                ev = self._stuck.popleft()
            else:
                ev = self._click()
            ev["ts"] = now_ms
            return "clicks", ev["customer_id"], ev
        if rng.random() < self.net_share:
            scripted = self._net_event(now_ms)
            if scripted is not None:
                return scripted
        return self._background(now_ms)

    def _click(self) -> dict[str, Any]:
        rng = self.rng
        i = rng.randrange(len(self.terminals))
        script = self._sessions[i]
        if not script:
            hall, term = self.terminals[i]
            while True:
                cid = customer_id(rng.randrange(self.click_customers))
                if cid not in self._busy:
                    break
            self._busy.add(cid)
            script = self._sessions[i] = session_script(rng, cid, hall, term)
        ev = script.pop(0)
        if not script:
            self._busy.discard(ev["customer_id"])
        return ev

    def _background(self, now_ms: int) -> tuple[str, str, dict[str, Any]]:
        rng = self.rng
        cid = customer_id(rng.randrange(BACKGROUND_CUSTOMERS))
        # Network records arrive somewhat late; all are within the allowed lateness.
        ts = now_ms - rng.randrange(0, 30_000)
        if rng.random() < 0.5:
            doc: dict[str, Any] = {"type": "location", "customer_id": cid, "ts": ts,
                                   "cell_id": f"cell-{rng.randrange(500)}"}
            poi = rng.choice(POIS)
            if poi is not None:
                doc["poi"] = poi
                doc["poi_id"] = f"{poi}-{rng.randrange(20)}"
            return "location", cid, doc
        total = rng.randrange(0, 10)  # ordinary volumes: below call-spike's min_total
        return "calls", cid, {"type": "calls", "customer_id": cid, "ts": ts,
                              "interval_s": 300, "calls_in": total - total // 3,
                              "calls_out": total // 3, "missed": rng.randrange(0, 2)}

    def _net_event(self, now_ms: int) -> tuple[str, str, dict[str, Any]] | None:
        pool = self._net_pool
        while len(pool) < self.net_pool_size:
            if self._net_used >= self.net_customers:
                break
            pool.append(self._net_script(self.net_customer(self._net_used)))
            self._net_used += 1
        if not pool:
            self.net_exhausted += 1
            return None
        i = self.rng.randrange(len(pool))
        kind, doc = pool[i].pop(0)
        if not pool[i]:
            pool[i] = pool[-1]
            pool.pop()
        ago = doc.pop("ago_ms", 0)
        doc["ts"] = now_ms - ago
        return kind, doc["customer_id"], doc

    @staticmethod
    def _net_script(cid: str) -> list[tuple[str, dict[str, Any]]]:
        def loc(ago: int) -> tuple[str, dict[str, Any]]:
            return "location", {"type": "location", "customer_id": cid, "ago_ms": ago,
                                "cell_id": "cell-cinema-1", "poi": "cinema",
                                "poi_id": "cinema-1"}

        def calls(ago: int, total: int) -> tuple[str, dict[str, Any]]:
            return "calls", {"type": "calls", "customer_id": cid, "ago_ms": ago,
                             "interval_s": 300, "calls_in": total - total // 3,
                             "calls_out": total // 3, "missed": total // 4}

        # History first (late records: they update history and trigger nothing), then
        # the two fresh records that push: cinema-pay (2 visits) and call-spike (15 >= 3x).
        return [loc(3 * HOUR_MS), calls(3 * HOUR_MS, 2), calls(2 * HOUR_MS, 3),
                calls(HOUR_MS, 2), loc(0), calls(0, 15)]


@dataclass
class PhaseRecord:
    """What one paced phase sent: ``seq`` range, wall-clock span, stuck step entries."""

    name: str
    rate: float
    duration_s: float
    first_seq: int
    end_seq: int = 0
    start_ns: int = 0
    end_ns: int = 0
    measure: bool = True
    stuck_steps: list[int] = field(default_factory=list)
    late_sends: int = 0
    """Times the pacer found itself more than 5 ms behind schedule."""
    mark_seq: int | None = None
    """First ``seq`` sent after the mark (``run_phase(mark_s=...)``), if there was one."""
    mark_ns: int | None = None
    """Wall clock at the mark."""

    @property
    def measured_end_seq(self) -> int:
        """End of the measured events: the mark if there was one, else the phase's end."""
        return self.end_seq if self.mark_seq is None else self.mark_seq

    @property
    def measured_end_ns(self) -> int:
        """Wall clock at the end of the measured events."""
        return self.end_ns if self.mark_ns is None else self.mark_ns

    @property
    def sent(self) -> int:
        """Events sent in this phase."""
        return self.end_seq - self.first_seq

    @property
    def achieved_rate(self) -> float:
        """Events per second actually sent."""
        span = (self.end_ns - self.start_ns) / 1e9
        return self.sent / span if span > 0 else float("nan")


class Pacer:
    """Sends :class:`Traffic` to Kafka at a fixed rate; remembers every send time.

    ``send_ns[seq]`` is the wall clock (``time.time_ns()``) just before ``produce()``
    of the event ``<tag>-<seq>``; the event's ``ts`` is the same instant in ms.
    """

    def __init__(self, brokers: str, topics: Mapping[str, str], traffic: Traffic, tag: str,
                 producer_config: Mapping[str, Any] | None = None) -> None:
        self.topics = dict(topics)
        self.traffic = traffic
        self.tag = tag
        self.producer = Producer({"bootstrap.servers": brokers, **PRODUCER_CONFIG,
                                  **(producer_config or {})})
        self.send_ns = array("q")
        self.phases: list[PhaseRecord] = []

    def run_phase(self, name: str, rate: float, duration_s: float, *, measure: bool = True,
                  stuck: int = 0, stuck_window_s: float = 10.0,
                  on_tick: Callable[[], None] | None = None,
                  tick_s: float = 10.0, mark_s: float | None = None,
                  on_mark: Callable[[], None] | None = None) -> PhaseRecord:
        """Send ``rate`` events/s for ``duration_s`` seconds (``stuck`` customers get stuck
        in a step during the first ``stuck_window_s`` seconds); call ``on_tick`` at the
        start, every ``tick_s`` seconds and at the end. At ``mark_s`` seconds into the
        phase, note the mark (:attr:`PhaseRecord.mark_seq`) and call ``on_mark`` (it may
        send with :meth:`send_raw`: same thread)."""
        traffic = self.traffic
        topics = self.topics
        produce = self.producer.produce
        poll = self.producer.poll
        send_ns = self.send_ns
        tag = self.tag
        rec = PhaseRecord(name, rate, duration_s, len(send_ns), measure=measure)
        stuck_clicks = traffic.add_stuck(stuck) if stuck else 0
        stuck_released = 0
        total = round(rate * duration_s)
        period_ns = 1e9 / rate
        t0 = time.perf_counter_ns()
        rec.start_ns = time.time_ns()
        sent = 0
        late = 0
        next_tick = 0.0
        while sent < total:
            now = time.perf_counter_ns()
            elapsed = now - t0
            if on_tick is not None and elapsed >= next_tick:
                on_tick()
                next_tick += tick_s * 1e9
            if mark_s is not None and rec.mark_seq is None and elapsed >= mark_s * 1e9:
                rec.mark_seq = len(send_ns)
                rec.mark_ns = time.time_ns()
                if on_mark is not None:
                    on_mark()
            if stuck_clicks:
                want = min(stuck_clicks,
                           int(stuck_clicks * elapsed / (stuck_window_s * 1e9)) + 1)
                if want > stuck_released:
                    traffic.stuck_allowed += want - stuck_released
                    stuck_released = want
            due = min(total, int(elapsed / period_ns) + 1)
            if due - sent > rate * 0.005:
                late += 1
            while sent < due:
                wall = time.time_ns()
                kind, key, doc = traffic.next_event(wall // 1_000_000)
                seq = len(send_ns)
                doc["event_id"] = f"{tag}-{seq}"
                if (kind == "clicks" and doc.get("action") == "step_enter"
                        and doc["hall_id"] == STUCK_HALL):
                    rec.stuck_steps.append(seq)
                value = json_dumps(doc)
                while True:
                    try:
                        produce(topics[kind], value, key.encode())
                        break
                    except BufferError:
                        poll(0.005)
                send_ns.append(wall)
                sent += 1
            poll(0)
            delay = t0 + sent * period_ns - time.perf_counter_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
        rec.end_ns = time.time_ns()
        if on_tick is not None:
            on_tick()
        rec.end_seq = len(send_ns)
        rec.late_sends = late
        self.phases.append(rec)
        return rec

    def send_raw(self, kind: str, key: str, doc: dict[str, Any],
                 partition: int | None = None) -> None:
        """Send one document as is (probes); not recorded in ``send_ns``."""
        extra = {} if partition is None else {"partition": partition}
        deadline = time.monotonic() + 60
        while True:
            try:
                self.producer.produce(self.topics[kind], json_dumps(doc), key.encode(),
                                      **extra)
                break
            except BufferError:  # the broker is behind: wait for room
                if time.monotonic() > deadline:
                    raise
                self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Deliver what is queued (waits up to ``timeout_s``)."""
        self.producer.flush(timeout_s)

    def close(self) -> None:
        """Deliver what is still queued."""
        self.producer.flush(30)
