"""Decode part: what decoding one input record costs, next to its floor, in one run.

Run when named (``python -m bench decode``); no broker or Redis is used. Each run takes
the seeded workload's records (80 % location and calls, 20 % clicks, as the throughput
part produces them) and times, per record, in the same process and run:

* ``orjson.loads`` alone: the floor of any JSON decoder in Python;
* ``decode_record``: the engine's decoding (parse, validate every field, build the
  frozen event and its envelope);
* event construction: as decoding builds it (``flows.model._location``: a plain draft
  of the same slots, fields stored, then its class set), as a call of the class
  (``LocationEvent(...)``, which uses the same builder), as the engine built it before
  (``__init__`` writing each field through its slot descriptor's ``__set__``), and as
  ``@dataclass(frozen=True, slots=True)`` would generate it for the same fields; the
  ratio is decoding's builder against the generated one;
* unpickling a record, as a process does with each record another process's router
  sent to its shards (lists of 1,000 records, as an input batch);
* ``blake2b`` of the record's bytes: the idempotency key of a record without an
  ``event_id``, which decoding no longer pays (:attr:`flows.model.Envelope.key` hashes
  when a push, an alert, a session or a step asks for it).

It also runs the whole live flow in-process (``bytewax.testing.run_main``, in-memory
profiles, every default rule) over the same records, next to the throughput part's
bare Bytewax keyed count on an in-memory source over them: the engine's events/s and
its ratio to the runtime's, without a broker in the way.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from bench.contenders.bytewax_count import count_flow
from bench.core import BenchContext, PartResult
from bench.workload import Workload, profiles
from flows.experience import Outputs, build_flow
from flows.model import DEFAULT_LIMITS, LocationEvent, RawRecord, decode_record
from flows.model import _location as build_location  # decoding's builder, measured
from flows.rules import load_default_rules
from flows.settings import load_settings
from state.profiles import InMemoryProfileStore

__all__ = ["FULL", "QUICK", "run"]

PART = "decode"
FULL = {"records": 200_000, "customers": 100_000, "flow_events": 200_000}
QUICK = {"records": 2_000, "customers": 1_000, "flow_events": 2_000}
BATCH = 1_000  # records per source batch, as the Kafka input's consume batch
_TOPICS = {"clicks": "touch.clicks", "location": "net.location", "calls": "net.calls"}

# LocationEvent's fields, for the two baselines built from them below.
_LOCATION_FIELDS: list[Any] = [
    (f.name, f.type) if f.default is dataclasses.MISSING
    else (f.name, f.type, dataclasses.field(default=f.default, init=f.init))
    for f in dataclasses.fields(LocationEvent)
]

# LocationEvent as the dataclass decorator would build it (the generated __init__).
GeneratedLocation = dataclasses.make_dataclass(
    "GeneratedLocation", _LOCATION_FIELDS, frozen=True, slots=True)

# LocationEvent as the engine built it before 09254e8: its own __init__ writing each
# field through the slot descriptor's __set__.
SlotSetterLocation = dataclasses.make_dataclass(
    "SlotSetterLocation", _LOCATION_FIELDS, frozen=True, slots=True, init=False)
_SLOT_SETTERS = tuple(SlotSetterLocation.__dict__[f.name].__set__
                      for f in dataclasses.fields(SlotSetterLocation))


def _slot_setter_init(self: Any, customer_id: str, ts: int, event_id: str | None,
                      cell_id: str, poi: str | None, poi_id: str | None = None) -> None:
    s_cid, s_ts, s_eid, s_cell, s_poi, s_poi_id, s_type = _SLOT_SETTERS
    s_cid(self, customer_id)
    s_ts(self, ts)
    s_eid(self, event_id)
    s_cell(self, cell_id)
    s_poi(self, poi)
    s_poi_id(self, poi_id)
    s_type(self, "location")


SlotSetterLocation.__init__ = _slot_setter_init  # type: ignore[misc]


def records(n: int, customers: int, now_ms: int) -> list[RawRecord]:
    """``n`` workload records (event times in the last minute), keyed by customer."""
    wl = Workload(customers=customers)
    return [RawRecord(f"{_TOPICS[kind]}/0", i, body, cid.encode())
            for i, (kind, cid, body) in enumerate(wl.events(n, now_ms - 60_000, 60_000))]


def _per_item_ns(fn: Callable[[Any], object], items: list[Any]) -> float:
    gc.collect()
    t = time.perf_counter_ns()
    for x in items:
        fn(x)
    return (time.perf_counter_ns() - t) / len(items)


def _unpickle_ns(items: list[Any]) -> float:
    """Unpickling ``items`` in batches of :data:`BATCH`, as the exchange between processes."""
    batches = [pickle.dumps(items[i:i + BATCH], protocol=pickle.HIGHEST_PROTOCOL)
               for i in range(0, len(items), BATCH)]
    gc.collect()
    t = time.perf_counter_ns()
    for data in batches:
        pickle.loads(data)
    return (time.perf_counter_ns() - t) / len(items)


def _construct_ns(cls: Callable[..., object], n: int) -> float:
    args = [(f"137{i:08d}", 1_795_000_000_000 + i, None, f"cell-{i % 500}", "cinema",
             f"cinema-{i % 20}") for i in range(n)]
    gc.collect()
    t = time.perf_counter_ns()
    for a in args:
        cls(*a)
    return (time.perf_counter_ns() - t) / n


def _flow_rate(flow: Dataflow, n: int) -> float:
    gc.collect()
    t = time.perf_counter()
    run_main(flow)  # type: ignore[no-untyped-call]
    return n / (time.perf_counter() - t)


def _engine(recs: list[RawRecord], store: InMemoryProfileStore,
            pushes: list[Any]) -> Dataflow:
    settings = load_settings(mode="live")
    return build_flow(settings, source=TestingSource(recs, batch_size=BATCH),
                      outputs=Outputs(pushes=[TestingSink(pushes)]),
                      rules=load_default_rules(), profiles=store)


def _plot(result: PartResult, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = ["orjson.loads (floor)", "decode_record", "blake2b key (deferred)",
             "event init: generated", "event init: slot setters (before)",
             "event init: class call", "event init: engine's"]
    meds = [result.figure(f"{n}, per record", "ns").median for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(names[::-1], meds[::-1], color="#4c72b0")
    for y, v in enumerate(meds[::-1]):
        ax.text(v, y, f" {v:,.0f} ns", va="center")
    ax.set_xlabel("ns per record (median of runs)")
    ax.set_title("Decoding one record, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx: BenchContext) -> PartResult:
    """Time decoding and the in-process flow ``ctx.runs`` times."""
    size = QUICK if ctx.quick else FULL
    result = PartResult(PART)
    now = time.time_ns() // 1_000_000
    recs = records(size["records"], size["customers"], now)
    store = InMemoryProfileStore(profiles(size["customers"]))
    flow_recs = recs[: size["flow_events"]]
    limits = DEFAULT_LIMITS
    for _ in range(ctx.runs):
        result.figure("orjson.loads (floor), per record", "ns", higher_is_better=False) \
            .values.append(_per_item_ns(lambda r: orjson.loads(r.value), recs))
        result.figure("decode_record, per record", "ns", higher_is_better=False) \
            .values.append(_per_item_ns(lambda r: decode_record(r, limits), recs))
        result.figure("blake2b key (deferred), per record", "ns", higher_is_better=False) \
            .values.append(_per_item_ns(
                lambda r: hashlib.blake2b(r.value, digest_size=12).hexdigest(), recs))
        result.figure("RawRecord unpickled (routed to another process), per record", "ns",
                      higher_is_better=False).values.append(_unpickle_ns(recs))
        gen = _construct_ns(GeneratedLocation, len(recs))
        setters = _construct_ns(SlotSetterLocation, len(recs))
        call = _construct_ns(LocationEvent, len(recs))
        own = _construct_ns(build_location, len(recs))
        result.figure("event init: generated, per record", "ns", higher_is_better=False) \
            .values.append(gen)
        result.figure("event init: slot setters (before), per record", "ns",
                      higher_is_better=False).values.append(setters)
        result.figure("event init: class call, per record", "ns", higher_is_better=False) \
            .values.append(call)
        result.figure("event init: engine's, per record", "ns", higher_is_better=False) \
            .values.append(own)
        result.figure("event init: engine's/generated", "ratio", higher_is_better=False) \
            .values.append(own / gen)
        bare = _flow_rate(count_flow(TestingSource(flow_recs, batch_size=BATCH)),
                          len(flow_recs))
        pushes: list[Any] = []
        eng = _flow_rate(_engine(flow_recs, store, pushes), len(flow_recs))
        result.figure("in-process bytewax count events/s", "events/s").values.append(bare)
        result.figure("in-process touchstream events/s", "events/s").values.append(eng)
        result.figure("in-process touchstream/bytewax", "ratio").values.append(eng / bare)
        result.extra.setdefault("pushes per run", []).append(len(pushes))
    plot = ctx.results_path(PART, "-per-record.png")
    _plot(result, plot)
    result.plots.append(plot)
    result.notes.append(
        f"{len(recs):,} workload records per run (20 % clicks); in-process flows over "
        f"{len(flow_recs):,} of them in batches of {BATCH:,}, no broker: the engine with "
        "every default rule and in-memory profiles, next to a bare Bytewax keyed count")
    return result
