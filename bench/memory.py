"""Memory part: resident memory of the live flow per customer, and after idle eviction.

Each run is a fresh interpreter (``python -m bench.memory --child``), so its RSS is
clean. The child builds the real live dataflow (:func:`flows.experience.build_flow`,
default rules, outputs that discard, profiles computed on demand so that no profile
is held in memory: in production they live in Redis) and runs it under
``bytewax.testing.run_main`` with a generator source of realistic events and a
clock it controls:

* the population is introduced in blocks of 1,000 customers; every customer is seen
  (1 to 3 network events, 2 on average, half location with a point of interest, half
  call intervals), and one in 15 also plays a terminal session (session start,
  module, steps, sometimes help, a demo, an order, the end), so clicks are about
  20 % of the events, as in :mod:`bench.workload`;
* event times follow a simulated clock (86.4 ms per customer: 2 million customers
  arrive over two days of event time, about 0.8 terminal sessions a second); the
  flow's ``now_ms`` is that clock. (Squeezed into two hours, the step-friction
  window would hold thousands of visits per step, and ``FrictionEngine`` re-reads
  its whole window for every visit: that, not the customers, would be measured);
* baseline: after a handful of warm-up events have gone through the built flow, the
  process's VmRSS (``/proc/self/status``) is the baseline; at each checkpoint
  (100k, 1M, 2M customers; quick: 10k) the source stops until the shards have
  applied every event sent, then reads VmRSS and the customers the engines hold;
  per customer = (RSS - baseline) / customers;
* eviction: the clock jumps past ``idle_ttl_s`` (3 days here, longer than the load's
  event-time span) plus the sweep interval, one event per shard is sent so every
  shard sweeps on the live path, and RSS and the customers left are read again
  (also after ``malloc_trim(0)``). RSS does not follow the state down: freed objects
  go back to CPython's pymalloc pools, an arena (1 MiB) returns to the OS only once
  every object in it is gone, and a shard's dict keeps its table at its largest size;
  so the state size is also measured directly;
* state size measured directly: msgpack snapshot bytes per customer (every shard's
  ``ShardEngine.snapshot()``), a ``sys.getsizeof``-based deep size on a sample of
  customers broken down by ``Customer`` attribute, and (``tracemalloc``, exact bytes
  retained) what one customer costs in given situations: no state, a place visit,
  call history, an open session, an open step with its timer, after pushes.

Full mode runs the three checkpoints in one child, ``ctx.runs`` times if they fit
in about four minutes in total (judged after the first run), else as many as fit.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import random
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import run_main

from bench.core import BenchContext, PartResult
from bench.workload import session_script
from flows import experience, runner
from flows.codec import json_dumps, pack
from flows.engine import Customer, EngineConfig, ShardEngine
from flows.experience import Outputs, build_flow
from flows.model import Envelope, Profile, RawRecord, decode_record
from flows.rules import load_default_rules
from flows.settings import Settings, load_settings
from state.profiles import InMemoryProfileStore

__all__ = ["FULL", "QUICK", "run"]

PART = "memory"
QUICK: tuple[int, ...] = (10_000,)
FULL: tuple[int, ...] = (100_000, 1_000_000, 2_000_000)
TARGET_BYTES = 1024
TARGET = "≤ 1 KB per active customer"
CHILD_TIMEOUT_S = 900.0
ROOT = Path(__file__).resolve().parents[1]

BLOCK = 1000  # customers introduced together (their events interleaved)
BATCH = 2000  # records per next_batch()
SIM_MS_PER_CUSTOMER = 86.4  # event time per customer: 2M customers over 48 h
SESSION_SHARE = 1 / 15
IDLE_TTL_S = 3 * 86_400.0
SWEEP_S = 12 * 3600.0
"""``engine.sweep_interval_s`` here. The load squeezes two days of event time into a few
minutes, so the default (10 min of event time) would sweep every shard 288 times, each
sweep reading all of the shard's customers: a quarter of the load at 1M customers (103 s
with them, 78 s without), spent evicting nothing (the load spans less than
``IDLE_TTL_S``). Every 12 h, four times."""
WARMUP_EVENTS = 200
SAMPLE = 20_000  # customers in the deep-size sample
COMPONENT_N = 2000  # customers per tracemalloc scenario
SHARDS = 64

POIS = ("mall", "stadium", "office", "cinema", "home", None)
STEPS = ("intro", "pair", "door_sensor_setup", "confirm")
HALLS = ("H01", "H02", "H03")
MODULES = ("music", "mobile_pay", "mobile_paper", "call_reminder", "care_link", "remote_cam")


def customer_id(i: int) -> str:
    """The i-th memory-bench customer (11 digits, like a phone number)."""
    return f"135{i:08d}"


# --- the child: the flow under measurement ---------------------------------------------


class SimClock:
    """The flow's ``now_ms``: simulated event time, moved only by the source."""

    def __init__(self, start_ms: int) -> None:
        self.t = start_ms

    def __call__(self) -> int:
        return self.t


def rss_bytes() -> int:
    """VmRSS of this process."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def malloc_trim() -> bool:
    """glibc ``malloc_trim(0)``: give free heap pages back to the OS (False if absent)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.malloc_trim(0)
    return True


class SyntheticProfiles:
    """Profiles computed from the customer id on every ``get``: nothing is held.

    About 15 % subscribe to each service, half of those configured it, 20 % have a
    music preference, like :func:`bench.workload.profiles`.
    """

    def get(self, customer_id: str) -> Profile:
        """The customer's profile (a new object each time)."""
        h = zlib.crc32(customer_id.encode())
        subs = frozenset(m for k, m in enumerate(MODULES) if (h >> (2 * k)) % 7 == 0)
        configured = frozenset(m for k, m in enumerate(sorted(subs)) if (h >> (20 + k)) & 1)
        prefs: dict[str, tuple[str, ...]] = {"music": ("jazz",)} if (h >> 28) % 5 == 0 else {}
        return Profile(customer_id, subscriptions=subs, configured=configured, prefs=prefs)

    def get_many(self, customer_ids: Iterable[str]) -> dict[str, Profile]:
        """Profiles by customer id."""
        return {c: self.get(c) for c in customer_ids}

    def prefetch(self, customer_ids: Iterable[str]) -> Mapping[str, Profile]:
        """Nothing to fetch (an empty map: the engine calls :meth:`get`)."""
        return {}

    def remember(self, profiles: Mapping[str, Profile]) -> None:
        """Nothing is kept."""

    def put_many(self, profiles: Iterable[Profile]) -> int:
        """Nothing is stored."""
        return sum(1 for _ in profiles)


def customer_events(rng: random.Random, cid: str) -> list[tuple[str, dict[str, Any]]]:
    """One customer's events in order, as ``(topic, event without ts)``."""
    out: list[tuple[str, dict[str, Any]]] = []
    n_net = 1 + (rng.random() < 0.6) + (rng.random() < 0.4)
    for _ in range(n_net):
        if rng.random() < 0.5:
            poi = rng.choice(POIS)
            doc: dict[str, Any] = {"type": "location", "customer_id": cid,
                                   "cell_id": f"cell-{rng.randrange(500)}"}
            if poi is not None:
                doc["poi"] = poi
                doc["poi_id"] = f"{poi}-{rng.randrange(20)}"
            out.append(("net.location", doc))
        else:
            total = rng.randrange(12, 20) if rng.random() < 0.02 else rng.randrange(0, 5)
            out.append(("net.calls", {"type": "calls", "customer_id": cid, "interval_s": 300,
                                      "calls_in": total - total // 3, "calls_out": total // 3,
                                      "missed": rng.randrange(0, 2)}))
    if rng.random() < SESSION_SHARE:
        at = rng.randrange(len(out) + 1)
        out[at:at] = [("touch.clicks", ev) for ev in session_script(rng, cid)]
    return out


def population(n: int, seed: int) -> Iterator[tuple[int, list[tuple[str, dict[str, Any]]]]]:
    """Blocks of customers: ``(customers seen after the block, events interleaved)``.

    Within a block, customers take turns (the r-th event of every customer that has
    one, then the next round), so each customer's events stay in order.
    """
    rng = random.Random(seed)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        per = [customer_events(rng, customer_id(i)) for i in range(start, stop)]
        longest = max(len(p) for p in per)
        block = [p[r] for r in range(longest) for p in per if r < len(p)]
        yield stop, block


@dataclass
class Probe:
    """What the child measures; written as JSON at the end."""

    checkpoints: list[int]
    baseline: dict[str, Any] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    eviction: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    components: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


class _Registry:
    engines: list[Any] = []
    applied = 0


class ProbedShardEngine(ShardEngine):
    """A :class:`ShardEngine` that registers itself and counts the events it applies
    (no state of its own besides)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        _Registry.engines.append(self)

    def apply(self, env: Envelope, out: list[Any]) -> None:
        """Count, then apply."""
        _Registry.applied += 1
        super().apply(env, out)


def _install_engine_probe() -> None:
    """``build_flow`` makes its engines by the global name ``ShardEngine``."""
    setattr(experience, "ShardEngine", ProbedShardEngine)  # noqa: B010


def _held() -> int:
    return sum(len(e.customers) for e in _Registry.engines)


class _Phase:
    WARMUP, LOAD, CHECKPOINT, EVICT, DONE = range(5)


def _make_source(probe: Probe, clock: SimClock, seed: int,
                 settings: Settings) -> FixedPartitionedSource[RawRecord, None]:
    total = probe.checkpoints[-1]
    events_per_customer = 2.5
    step_ms = SIM_MS_PER_CUSTOMER / events_per_customer
    sweep_ms = int(settings.engine.sweep_interval_s * 1000)
    idle_ms = int(settings.engine.idle_ttl_s * 1000)

    class Part(StatefulSourcePartition[RawRecord, None]):
        def __init__(self) -> None:
            self.phase = _Phase.WARMUP
            self.sent = 0
            self.pos = 0
            self.t0 = clock.t
            self.sim = float(clock.t)
            self.blocks = population(total, seed)
            self.pending: deque[tuple[str, dict[str, Any]]] = deque()
            self.seen = 0
            self.next_ck = 0
            self.wait_since = 0.0
            self.started = time.monotonic()
            self.load_started = 0.0
            self.jump_to = 0
            self.extra_sweepers = 0
            self.sweepers: list[RawRecord] = []

        # -- emitting --
        def _record(self, topic: str, doc: dict[str, Any]) -> RawRecord:
            self.sim += step_ms
            clock.t = max(clock.t, int(self.sim))
            doc["ts"] = clock.t
            self.pos += 1
            self.sent += 1
            cid = doc["customer_id"]
            return RawRecord(f"{topic}/0", self.pos, json_dumps(doc), cid.encode())

        def _warmup(self) -> list[RawRecord]:
            rng = random.Random(seed + 1)
            out: list[RawRecord] = []
            i = 0
            while len(out) < WARMUP_EVENTS:
                for topic, doc in customer_events(rng, f"134{i:08d}"):
                    out.append(self._record(topic, doc))
                i += 1
            return out

        def _load(self) -> list[RawRecord]:
            out: list[RawRecord] = []
            target = probe.checkpoints[self.next_ck]
            while len(out) < BATCH:
                if not self.pending:
                    if self.seen >= target:
                        break
                    self.seen, block = next(self.blocks)
                    self.pending.extend(block)
                topic, doc = self.pending.popleft()
                out.append(self._record(topic, doc))
            if not self.pending and self.seen >= target:
                self.phase = _Phase.CHECKPOINT
                self.wait_since = time.monotonic()
            return out

        def _sweepers(self, salt: int) -> list[RawRecord]:
            """One location event (no point of interest) for a customer of each shard.

            Ids are picked by the live router's hash (crc32 of the key); should the
            router hash differently, later rounds (other salts) reach the rest.
            """
            shards = settings.engine.shards
            out: list[RawRecord] = []
            hit: set[int] = set()
            k = 0
            while len(hit) < shards and k < 100_000:
                cid = f"133{salt:03d}{k:05d}"
                k += 1
                s = zlib.crc32(cid.encode()) % shards
                if s not in hit:
                    hit.add(s)
                    out.append(self._record("net.location", {
                        "type": "location", "customer_id": cid, "cell_id": "cell-sweep"}))
            return out

        def _waited(self, what: str) -> None:
            if time.monotonic() - self.wait_since > 120:
                raise RuntimeError(f"memory bench: the flow did not catch up at {what} "
                                   f"(sent {self.sent}, applied {_Registry.applied})")

        # -- the partition --
        def next_batch(self) -> list[RawRecord]:
            ph = self.phase
            if ph == _Phase.WARMUP:
                if self.sent == 0:
                    self.wait_since = time.monotonic()
                    return self._warmup()
                if _Registry.applied < self.sent:
                    self._waited("warm-up")
                    return []
                gc.collect()
                probe.baseline = {"rss": rss_bytes(), "held": _held(), "events": self.sent,
                                  "engines": len(_Registry.engines)}
                self.phase = _Phase.LOAD
                self.load_started = time.monotonic()
                return []
            if ph == _Phase.LOAD:
                return self._load()
            if ph == _Phase.CHECKPOINT:
                if _Registry.applied < self.sent:
                    self._waited(f"{probe.checkpoints[self.next_ck]} customers")
                    return []
                self._checkpoint()
                return []
            if ph == _Phase.EVICT:
                if self.sweepers:
                    out, self.sweepers = self.sweepers, []
                    return out
                engines = _Registry.engines
                if all(e.next_sweep >= self.jump_to + sweep_ms for e in engines) and \
                        _Registry.applied >= self.sent:
                    self._evicted()
                    return []
                if time.monotonic() - self.wait_since > 2:
                    # Some shards have not swept yet: another round of sweepers.
                    self.wait_since = time.monotonic()
                    self.extra_sweepers += 1
                    if self.extra_sweepers > 30:
                        raise RuntimeError("memory bench: the shards did not sweep")
                    return self._sweepers(self.extra_sweepers)
                return []
            raise StopIteration

        def _checkpoint(self) -> None:
            gc.collect()
            n = probe.checkpoints[self.next_ck]
            rss = rss_bytes()
            held = _held()
            probe.points.append({
                "customers": n, "held": held, "rss": rss, "events": self.sent,
                "seconds": round(time.monotonic() - self.load_started, 3),
                "per_customer": (rss - probe.baseline["rss"]) / n,
                "sim_span_s": round((clock.t - self.t0) / 1000, 1),
                "timers": sum(len(e.timers) for e in _Registry.engines),
            })
            print(f"memory: {n} customers: RSS {rss / 2**20:.1f} MiB, "
                  f"{(rss - probe.baseline['rss']) / n:.0f} B/customer, "
                  f"{self.sent} events in {time.monotonic() - self.load_started:.1f} s",
                  file=sys.stderr, flush=True)
            self.next_ck += 1
            if self.next_ck < len(probe.checkpoints):
                self.phase = _Phase.LOAD
                return
            probe.state = measure_state(_Registry.engines, held)
            gc.collect()
            probe.eviction["rss_before"] = rss_bytes()
            probe.eviction["held_before"] = _held()
            # Jump past the idle TTL and a sweep interval; one event per shard sweeps it.
            self.jump_to = clock.t + idle_ms + sweep_ms + 60_000
            clock.t = self.jump_to
            self.sim = float(clock.t)
            self.phase = _Phase.EVICT
            self.wait_since = time.monotonic()
            self.sweepers = self._sweepers(0)

        def _evicted(self) -> None:
            gc.collect()
            ev = probe.eviction
            ev["rss_after"] = rss_bytes()
            ev["held_after"] = _held()
            ev["trimmed"] = malloc_trim()
            ev["rss_after_trim"] = rss_bytes()
            ev["events"] = self.sent
            self.phase = _Phase.DONE

        def next_awake(self) -> datetime | None:
            if self.phase in (_Phase.LOAD, _Phase.DONE):
                return None
            return datetime.now(UTC) + timedelta(milliseconds=1)

        def snapshot(self) -> None:
            return None

    class Source(FixedPartitionedSource[RawRecord, None]):
        def list_parts(self) -> list[str]:
            return ["memory-bench"]

        def build_part(self, step_id: str, for_part: str, resume_state: None) -> Part:
            return Part()

    return Source()


class _Drop(StatelessSinkPartition[Any]):
    def write_batch(self, items: list[Any]) -> None:
        pass


class Discard(DynamicSink[Any]):
    """An output that drops everything."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Drop:
        """A partition that drops everything."""
        return _Drop()


def child(checkpoints: list[int], out: Path, seed: int) -> None:
    """Run the flow over the population and write the :class:`Probe` as JSON."""
    _install_engine_probe()
    settings = load_settings(mode="live", engine={"idle_ttl_s": IDLE_TTL_S,
                                                  "sweep_interval_s": SWEEP_S,
                                                  "shards": SHARDS, "workers": 1})
    clock = SimClock(time.time_ns() // 1_000_000)
    probe = Probe(checkpoints=checkpoints)
    probe.config = {"shards": SHARDS, "idle_ttl_s": IDLE_TTL_S, "sweep_interval_s": SWEEP_S,
                    "block": BLOCK,
                    "sim_ms_per_customer": SIM_MS_PER_CUSTOMER, "seed": seed,
                    "python": sys.version.split()[0]}
    flow = build_flow(
        settings,
        source=_make_source(probe, clock, seed, settings),
        outputs=Outputs(pushes=[Discard()], alerts=[Discard()], dead_letters=[Discard()],
                        stats=[Discard()]),
        rules=load_default_rules(),
        profiles=SyntheticProfiles(),
        now_ms=clock,
    )
    # As `touchstream run` does (when this version of the runner has it).
    tune_gc: Callable[[int], None] | None = getattr(runner, "tune_gc", None)
    threshold = getattr(settings.engine, "gc_threshold", 0)
    if tune_gc is not None:
        tune_gc(threshold)
    probe.config["gc_threshold"] = threshold if tune_gc is not None else "python default"
    run_main(flow)  # type: ignore[no-untyped-call]
    if not probe.eviction.get("rss_after"):
        raise RuntimeError("memory bench: the flow ended before the eviction was measured")
    probe.components = measure_components()
    out.write_text(json.dumps(probe.__dict__, indent=1))


# --- direct state size ------------------------------------------------------------------


def deep_size(obj: Any, seen: set[int]) -> int:
    """``sys.getsizeof`` of ``obj`` and everything it holds, each object once.

    Singletons (None, booleans, the cached small ints) cost nothing. Strings count in
    full even when another customer holds the same object (interned names).
    """
    if obj is None or obj is True or obj is False:
        return 0
    if type(obj) is int and -5 <= obj <= 256:
        return 0
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        for k, v in obj.items():
            size += deep_size(k, seen) + deep_size(v, seen)
    elif isinstance(obj, list | tuple | set | frozenset | deque):
        for x in obj:
            size += deep_size(x, seen)
    elif not isinstance(obj, str | bytes | int | float):
        for name in _slot_names(type(obj)):
            if hasattr(obj, name):
                size += deep_size(getattr(obj, name), seen)
        d = getattr(obj, "__dict__", None)
        if d is not None:
            size += deep_size(d, seen)
    return size


def _slot_names(cls: type) -> list[str]:
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.extend([slots] if isinstance(slots, str) else slots)
    return names


def measure_state(engines: list[Any], held: int) -> dict[str, Any]:
    """Snapshot bytes and deep sizes of the customers the engines hold."""
    t = time.monotonic()
    snap = 0
    for e in engines:  # one shard at a time: little extra memory at once
        snap += len(pack({k: c.to_state() for k, c in e.customers.items()}))
    snap_s = time.monotonic() - t
    # Deep size on a sample spread over every shard.
    per_engine = max(1, SAMPLE // max(1, len(engines)))
    total = 0
    n = 0
    attrs: dict[str, int] = {}
    strings: dict[str, list[int]] = {}
    str_bytes = 0
    for e in engines:
        for k, c in list(e.customers.items())[:per_engine]:
            seen: set[int] = set()
            size = sys.getsizeof(c)
            seen.add(id(c))
            for name in _slot_names(type(c)):
                a = deep_size(getattr(c, name, None), seen)
                attrs[name] = attrs.get(name, 0) + a
                size += a
            key = deep_size(k, seen)
            attrs["(dict key: customer id)"] = attrs.get("(dict key: customer id)", 0) + key
            total += size + key
            n += 1
            _collect_strings(c, strings)
    for objs in strings.values():
        if len(objs) > 1:
            str_bytes += sum(objs[1:])
    dict_bytes = sum(sys.getsizeof(e.customers) for e in engines)
    base = sys.getsizeof(Customer())
    return {
        "held": held,
        "snapshot_bytes": snap,
        "snapshot_bytes_per_customer": snap / held if held else 0.0,
        "snapshot_seconds": round(snap_s, 2),
        "sample": n,
        "deep_bytes_per_customer": total / n if n else 0.0,
        "customers_dict_bytes_per_customer": dict_bytes / held if held else 0.0,
        "customer_object_bytes": base,
        "deep_bytes_by_attr": {k: round(v / n, 1) for k, v in sorted(attrs.items())} if n else {},
        "duplicate_string_bytes_per_customer": str_bytes / n if n else 0.0,
    }


def _collect_strings(c: Any, strings: dict[str, list[int]]) -> None:
    """Strings held in the customer's session and step (module, step, terminal, hall,
    event keys): value -> sizes of the distinct objects holding it."""
    for part in (getattr(c, "session", None), getattr(c, "step", None)):
        if part is None:
            continue
        for name in _slot_names(type(part)):
            v = getattr(part, name, None)
            if type(v) is str and name != "key":
                ids = strings.setdefault(f"{name}={v}", [])
                ids.append(sys.getsizeof(v))


# --- what one customer costs, by situation ---------------------------------------------


def measure_components(n: int = COMPONENT_N) -> dict[str, Any]:
    """Bytes retained per customer (tracemalloc) for customers in given situations.

    Each situation gets a fresh :class:`ShardEngine` and ``n`` customers; events are
    decoded inside the measured window and dropped after, so the figure is what the
    engine keeps (customer object, containers, strings it references, its entry in
    the shard's dict, timers).
    """
    rules = load_default_rules()
    t0 = 1_800_000_000_000
    H = 3_600_000

    def loc(cid: str, ts: int, poi: str | None) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "location", "customer_id": cid, "ts": ts, "cell_id": "c-1"}
        if poi:
            d["poi"] = poi
            d["poi_id"] = f"{poi}-1"
        return d

    def calls(cid: str, ts: int, total: int) -> dict[str, Any]:
        return {"type": "calls", "customer_id": cid, "ts": ts, "interval_s": 300,
                "calls_in": total, "calls_out": 0, "missed": 0}

    def click(cid: str, ts: int, action: str, module: str | None = None,
              step: str | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "click", "customer_id": cid, "ts": ts, "action": action,
                             "terminal_id": f"H01-T{int(cid[-2:]):02d}", "hall_id": "H01"}
        if module:
            d["module"] = module
        if step:
            d["step"] = step
        return d

    scenarios: dict[str, Callable[[str], list[dict[str, Any]]]] = {
        "no state (one location, no point of interest)": lambda c: [loc(c, t0, None)],
        "one place visit (cinema)": lambda c: [loc(c, t0, "cinema")],
        "call history, 1 interval": lambda c: [calls(c, t0, 2)],
        "call history, 12 intervals": lambda c: [calls(c, t0 + k * 300_000, 2)
                                                 for k in range(12)],
        "open session (session_start)": lambda c: [click(c, t0, "session_start")],
        "open session + open step (+ its help timer)": lambda c: [
            click(c, t0, "session_start"), click(c, t0 + 1000, "module_enter", "remote_cam"),
            click(c, t0 + 2000, "step_enter", "remote_cam", "pair")],
        "closed session (session_end)": lambda c: [
            click(c, t0, "session_start"), click(c, t0 + 1000, "module_enter", "remote_cam"),
            click(c, t0 + 2000, "step_enter", "remote_cam", "pair"),
            click(c, t0 + 3000, "step_exit", "remote_cam", "pair"),
            click(c, t0 + 4000, "session_end")],
        "after a cinema-pay push (2 visits)": lambda c: [loc(c, t0, "cinema"),
                                                        loc(c, t0 + 2 * H, "cinema")],
        "after 3 pushes in a session (cap reached)": lambda c: [
            loc(c, t0, "cinema"), loc(c, t0 + 2 * H, "cinema"),
            click(c, t0 + 2 * H + 1000, "session_start"),
            click(c, t0 + 2 * H + 2000, "module_enter", "music")],
    }
    profile_of = {
        "after 3 pushes in a session (cap reached)": lambda c: Profile(
            c, subscriptions=frozenset({"care_link", "music"}), prefs={"music": ("jazz",)}),
    }
    out: dict[str, Any] = {"n": n, "bytes_per_customer": {}, "pushes_per_customer": {}}
    for name, make in scenarios.items():
        cids = [f"132{k:08d}" for k in range(n)]
        pf = profile_of.get(name)
        store = InMemoryProfileStore([pf(c) for c in cids] if pf else ())
        eng = ShardEngine(0, rules, store, EngineConfig(shards=SHARDS))
        docs = [[json_dumps(d) for d in make(c)] for c in cids]
        sink: list[Any] = []
        pushes = 0
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for c, raws in zip(cids, docs, strict=True):
            for pos, raw in enumerate(raws):
                env = decode_record(RawRecord("t/0", pos, raw, c.encode()))
                assert type(env) is Envelope
                eng.apply(env, sink)
            pushes += sum(1 for x in sink if type(x).__name__ == "Push")
            sink.clear()
            del env
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        out["bytes_per_customer"][name] = round((after - before) / n, 1)
        out["pushes_per_customer"][name] = round(pushes / n, 2)
        del eng, docs, store
    return out


# --- the parent: runs, figures, plot ----------------------------------------------------


def run_child(ctx: BenchContext, checkpoints: tuple[int, ...], index: int) -> dict[str, Any]:
    """One fresh interpreter over ``checkpoints``; its :class:`Probe` as a dict."""
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    out = ctx.work_dir / f"memory-run{index}.json"
    log = ctx.work_dir / f"memory-run{index}.log"
    out.unlink(missing_ok=True)
    t = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--child",
             "--checkpoints", ",".join(map(str, checkpoints)), "--out", str(out),
             "--seed", str(index + 1)],
            cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=CHILD_TIMEOUT_S,
            check=False,
        )
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"memory child exited {proc.returncode}:\n{tail}")
    doc: dict[str, Any] = json.loads(out.read_text())
    doc["wall_s"] = round(time.monotonic() - t, 1)
    return doc


def _k(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


MIB = 2**20


def add_figures(result: PartResult, doc: dict[str, Any]) -> None:
    """One value per figure from one run."""
    base = doc["baseline"]["rss"]
    result.figure("baseline RSS (flow built, warm-up done)", "MiB",
                  higher_is_better=False).values.append(round(base / MIB, 1))
    for p in doc["points"]:
        n = p["customers"]
        result.figure(f"RSS @ {_k(n)} customers", "MiB",
                      higher_is_better=False).values.append(round(p["rss"] / MIB, 1))
        result.figure(f"RSS per customer @ {_k(n)}", "B", target=TARGET,
                      higher_is_better=False).values.append(round(p["per_customer"], 1))
    ev = doc["eviction"]
    result.figure("RSS after eviction", "MiB", higher_is_better=False).values.append(
        round(ev["rss_after"] / MIB, 1))
    result.figure("RSS after eviction + malloc_trim", "MiB",
                  higher_is_better=False).values.append(round(ev["rss_after_trim"] / MIB, 1))
    result.figure("customers left after eviction", "customers",
                  higher_is_better=False).values.append(ev["held_after"])
    st = doc["state"]
    result.figure("snapshot (msgpack) per customer", "B", target=TARGET,
                  higher_is_better=False).values.append(
        round(st["snapshot_bytes_per_customer"], 1))
    result.figure("deep size per customer (getsizeof, sample)", "B", target=TARGET,
                  higher_is_better=False).values.append(round(st["deep_bytes_per_customer"], 1))
    last = doc["points"][-1]
    result.figure("load rate (events through the flow)", "events/s").values.append(
        round(last["events"] / last["seconds"], 0) if last["seconds"] else 0.0)
    for name, b in doc["components"]["bytes_per_customer"].items():
        result.figure(f"customer cost: {name}", "B", higher_is_better=False).values.append(b)


def plot(path: Path, docs: list[dict[str, Any]]) -> Path | None:
    """RSS against customers for every run, the 1 KB/customer line, and eviction."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import matplotlib.ticker  # noqa: PLC0415

    if not docs:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    top = 0
    for i, doc in enumerate(docs):
        xs = [0] + [p["customers"] for p in doc["points"]]
        ys = [doc["baseline"]["rss"] / MIB] + [p["rss"] / MIB for p in doc["points"]]
        ax.plot(xs, ys, marker="o", label=f"run {i + 1}: RSS")
        top = max(top, xs[-1])
        ev = doc["eviction"]
        ax.scatter([xs[-1]], [ev["rss_after"] / MIB], marker="v", color="red",
                   label="after eviction" if i == 0 else None, zorder=3)
        ax.scatter([xs[-1]], [ev["rss_after_trim"] / MIB], marker="x", color="black",
                   label="after eviction + malloc_trim" if i == 0 else None, zorder=3)
    base = docs[0]["baseline"]["rss"] / MIB
    ax.plot([0, top], [base, base + top * TARGET_BYTES / MIB], linestyle="--", color="grey",
            label="baseline + 1 KB per customer (target)")
    ax.xaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda x, _pos: f"{x / 1e6:g}M" if x else "0"))
    ax.set_xlabel("distinct customers seen")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("touchstream live flow: RSS vs customers held (one process, one worker)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(ctx: BenchContext) -> PartResult:
    """RSS per customer at 100k/1M/2M customers (quick: 10k) and after idle eviction."""
    checkpoints = QUICK if ctx.quick else FULL
    planned = ctx.run_count
    result = PartResult(PART)
    started = time.monotonic()
    # The runs go side by side, each in its own interpreter: resident memory is per
    # process and does not depend on sharing the CPUs, and three sequential runs of
    # 2M customers would not fit the suite's 15 minutes.
    with ThreadPoolExecutor(max_workers=planned) as pool:
        docs = list(pool.map(lambda i: run_child(ctx, checkpoints, i), range(planned)))
    for doc in docs:
        add_figures(result, doc)
    if planned > 1:
        result.notes.append(f"{planned} runs side by side, one interpreter each (seeds 1.."
                            f"{planned}); wall time is not a figure of this part")
    total_s = time.monotonic() - started
    p = plot(ctx.results_path(PART, "-rss.png"), docs)
    if p:
        result.plots.append(p)
    result.extra["runs"] = docs
    result.extra["seconds"] = round(total_s, 1)
    result.notes.extend(notes(docs))
    return result


def notes(docs: list[dict[str, Any]]) -> list[str]:
    """What the reader needs to read the figures (from run 1)."""
    if not docs:
        return []
    d = docs[0]
    st = d["state"]
    ev = d["eviction"]
    base = d["baseline"]["rss"]
    comps = d["components"]["bytes_per_customer"]
    attrs = ", ".join(f"{k} {v:.0f} B" for k, v in st["deep_bytes_by_attr"].items())
    grown = ev["rss_before"] - base
    returned = (ev["rss_before"] - ev["rss_after"]) / grown if grown > 0 else 0.0
    last = d["points"][-1]
    return [
        "Each run is a fresh interpreter running the live flow (run_main, one worker, "
        f"{SHARDS} shards, default rules, outputs discarded, profiles computed on demand so "
        "none are held); per customer = (RSS - baseline) / customers, baseline = RSS after "
        "the flow was built and ran a few hundred warm-up events. The mix: every customer "
        "1-3 network events (2 on average), one in 15 a terminal session (~20 % clicks), "
        f"{last['events'] / last['customers']:.2f} events per customer, event time "
        f"{SIM_MS_PER_CUSTOMER} ms per customer.",
        f"Eviction (clock moved past the {IDLE_TTL_S / 86400:g}-day idle TTL, one event per "
        f"shard): {ev['held_before']} -> {ev['held_after']} customers; RSS "
        f"{ev['rss_before'] / MIB:.0f} -> {ev['rss_after'] / MIB:.0f} MiB "
        f"({ev['rss_after_trim'] / MIB:.0f} MiB after malloc_trim), i.e. "
        f"{returned:.0%} of what the customers took went back to the OS. RSS does not "
        "follow the state down: freed objects return to CPython's pymalloc pools, an arena "
        "goes back to the OS only when every object in it is gone (here customers were "
        "made in order and all evicted, the best case), and each shard's dict keeps its "
        f"table at its largest ({st['customers_dict_bytes_per_customer']:.0f} B per "
        "customer held at the peak). Hence the direct measures: snapshot and deep size.",
        f"Deep size by Customer attribute (average over {st['sample']} customers): "
        f"object {st['customer_object_bytes']} B, {attrs}; the shards' dicts add "
        f"{st['customers_dict_bytes_per_customer']:.0f} B per customer.",
        "Retained bytes per customer by situation (tracemalloc, incl. dict entry and key): "
        + "; ".join(f"{k}: {v:.0f} B" for k, v in comps.items()) + ".",
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.memory --child ...`` (one measured run), or the part alone."""
    p = argparse.ArgumentParser(prog="python -m bench.memory")
    p.add_argument("--child", action="store_true", help="run one measured flow (internal)")
    p.add_argument("--checkpoints", default=",".join(map(str, FULL)))
    p.add_argument("--out", type=Path)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    if args.child:
        if args.out is None:
            p.error("--child needs --out")
        child([int(x) for x in args.checkpoints.split(",")], args.out, args.seed)
        return 0
    root = ROOT / "bench" / "results"
    ctx = BenchContext(brokers="", redis_url="", quick=args.quick, runs=args.runs,
                       results_dir=root, work_dir=root / "work",
                       date=datetime.now(UTC).strftime("%Y-%m-%d"))
    result = run(ctx)
    path = ctx.results_path(PART)
    path.write_text(json.dumps(result.to_json(), indent=1))
    for f in result.figures:
        print(f"{f.name:60} {f.median:12.1f} {f.unit:10} {f.target}")
    for n in result.notes:
        print("-", n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
