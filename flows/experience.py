"""The experience dataflow: three customer streams in, pushes, alerts, dead letters and
stats out. Built from settings by :func:`build_flow`; reads top to bottom.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import FixedPartitionedSink, Sink

from connectors.wrapped import with_partitions_of
from flows import metrics
from flows.aggregates import FrictionEngine, Sequencer, StatsEngine, rule_campaigns, shard_key
from flows.codec import json_dumps, pack, unpack
from flows.control import RulesStatus, RulesUpdate, compile_update
from flows.engine import (
    NO_PROFILES,
    EngineConfig,
    Holdout,
    Progress,
    ShardEngine,
    StatDelta,
    Tick,
    VisitDone,
)
from flows.model import (
    Alert,
    DeadLetter,
    Envelope,
    Limits,
    Profile,
    Push,
    RawRecord,
    decode_record,
)
from flows.rules import RulesError, RuleSet
from flows.settings import Settings
from state.guards import InMemoryQuotaStore, QuotaStore
from state.profiles import ProfileStore

__all__ = ["ClusterTerms", "ClusterTermsError", "LiveIntake", "Outputs", "RulesApplied",
           "ShardBatch", "ShardCountError", "ShardRouter", "build_flow", "live_time_check",
           "system_now_ms"]

RETAIN = False

log = logging.getLogger(__name__)


def system_now_ms() -> int:
    """The wall clock in epoch milliseconds (the live default clock)."""
    return time.time_ns() // 1_000_000


@dataclass
class Outputs:
    """Where each kind of output goes; any list may hold several sinks, or none."""

    pushes: list[Sink[Any]] = field(default_factory=list)
    alerts: list[Sink[Any]] = field(default_factory=list)
    dead_letters: list[Sink[Any]] = field(default_factory=list)
    stats: list[Sink[Any]] = field(default_factory=list)
    holdouts: list[Sink[Any]] = field(default_factory=list)
    """:class:`flows.engine.Holdout`: control-group customers a rule held out."""
    rules_status: list[Sink[Any]] = field(default_factory=list)
    """Rule change decisions (:class:`flows.control.RulesStatus`), with a control source."""
    rules_applied: list[Sink[Any]] = field(default_factory=list)
    """``(shard key, RulesApplied)``: each shard (and ``friction``) taking a new rule set."""


@dataclass(frozen=True, slots=True)
class RulesApplied:
    """A stateful key switched to rule set ``version`` (emitted once per key and version)."""

    version: int
    digest: str


def _update_state(u: RulesUpdate) -> list[Any]:
    return [u.version, u.doc, u.digest, u.origin]


def _compiled(u: RulesUpdate) -> RuleSet | None:
    """An update's rule set; None (logged) if it no longer compiles here (it was
    validated before the broadcast, so only a different code version can refuse it)."""
    try:
        return compile_update(u.version, u.doc, u.digest, u.origin)
    except RulesError as exc:
        log.error("rules: version %d does not compile here; keeping the current set: %s",
                  u.version, "; ".join(exc.errors))
        return None


def _restore_rules(st: dict[str, Any] | None, rules: RuleSet) -> tuple[RuleSet, RulesUpdate | None]:
    """The rule set a snapshot was taken with (its ``ruleset`` entry), else ``rules``."""
    if st is None or "ruleset" not in st:
        return rules, None
    v, doc, digest, origin = st.pop("ruleset")
    u = RulesUpdate(int(v), dict(doc), str(digest), str(origin))
    return compile_update(u.version, u.doc, u.digest, u.origin), u


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


# --- the three-line shims around the plain-Python logic ------------------------------


class _ShardLogic(StatefulBatchLogic[Any, Any, bytes]):
    """Bytewax shim over :class:`ShardEngine` (one per shard key).

    Live, each value is a :class:`ShardBatch` of this shard (see :class:`ShardRouter`):
    its raw records are decoded here, after the exchange, so only bytes cross between
    workers, with the profiles the router already read for them.
    """

    def __init__(self, engine: ShardEngine, intake: LiveIntake | None,
                 now_ms: Callable[[], int], stats_every_ms: int, recovery: bool,
                 applied: RulesUpdate | None = None, terms: ClusterTerms | None = None) -> None:
        self.engine = engine
        self.shards = engine.config.shards
        # what the routers of every process must agree with (None: only shards checked)
        self.terms = terms
        self.terms_digest = terms.digest if terms is not None else 0
        self.applied = applied  # the last rule change this shard took (None: the start set)
        self.version = engine.rules.version
        self.recovery = recovery
        self.intake = intake
        self.live = intake is not None
        self.now_ms = now_ms
        self.stats_every_ms = stats_every_ms
        self.next_stats = now_ms() + stats_every_ms if self.live else 0

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Any], bool]:
        out: list[Any] = []
        eng = self.engine
        if self.intake is not None:
            shards, digest = self.shards, self.terms_digest
            update = False
            for v in values:  # per group, not per record
                t = type(v)
                if t is ShardBatch:
                    if v.shards != shards or v.terms != digest:
                        self._refuse(v)
                elif t is RulesUpdate:
                    update = True
            now = self.now_ms()
            if update:
                self._live_with_updates(values, now, out)
            else:
                eng.on_live_batch(self.intake([b.records for b in values], now, out), now, out,
                                  _profiles_of(values))
            self._live_stats(now, out)
            return out, RETAIN
        for v in values:
            if type(v) is Tick:
                eng.advance(v.wm, out)
                out.append(Progress(v.shard, v.wm, v.final))
                if v.final:
                    self._take_stats(out)
            else:
                eng.buffer_event(v)
        return out, RETAIN

    def _refuse(self, batch: ShardBatch) -> NoReturn:
        """A batch routed by a process that does not share this one's cluster terms."""
        if batch.shards != self.shards:
            _shard_count_differs(self.shards, batch.shards)
        _terms_differ(self.terms, self.terms_digest, batch.terms)

    def _live_with_updates(self, values: list[Any], now: int, out: list[Any]) -> None:
        """Groups before a rule change run with the old set, groups after with the new."""
        intake = self.intake
        assert intake is not None
        run: list[ShardBatch] = []
        for v in values:
            if type(v) is RulesUpdate:
                if run:
                    self.engine.on_live_batch(intake([b.records for b in run], now, out), now,
                                              out, _profiles_of(run))
                    run = []
                self._apply(v, out)
            else:
                run.append(v)
        if run:
            self.engine.on_live_batch(intake([b.records for b in run], now, out), now, out,
                                      _profiles_of(run))

    def _apply(self, u: RulesUpdate, out: list[Any]) -> None:
        if u.version <= self.version:
            return  # already in force here (a duplicate never applies twice)
        rules = _compiled(u)
        if rules is None:
            return
        self.engine.set_rules(rules)  # all per-customer state stays
        self.version = u.version
        self.applied = u
        out.append(RulesApplied(u.version, u.digest))

    def on_notify(self) -> tuple[Iterable[Any], bool]:
        out: list[Any] = []
        now = self.now_ms()
        self.engine.fire_due(now, out)
        self._live_stats(now, out)
        return out, RETAIN

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        out: list[Any] = []
        self._take_stats(out)
        return out, RETAIN

    def notify_at(self) -> datetime | None:
        if not self.live:
            return None
        nd = self.engine.next_deadline()
        at = self.next_stats if nd is None else min(nd, self.next_stats)
        return _dt(at)

    def snapshot(self) -> bytes:
        # Bytewax 0.21.1 asks every key that woke up for a snapshot at each epoch end,
        # even when no recovery store keeps it; a whole shard is not packed for nothing.
        if not self.recovery:
            return b""
        snap = self.engine.snapshot()
        if self.applied is not None:
            snap["ruleset"] = _update_state(self.applied)
        return pack(snap)

    def _live_stats(self, now: int, out: list[Any]) -> None:
        if now >= self.next_stats:
            self.next_stats = now + self.stats_every_ms
            self._take_stats(out)

    def _take_stats(self, out: list[Any]) -> None:
        d = self.engine.take_stats()
        if d is not None:
            out.append(d)


class _SequencerLogic(StatefulBatchLogic[Envelope, Any, bytes]):
    """Bytewax shim over :class:`Sequencer` (replay only; one key per source)."""

    def __init__(self, seq: Sequencer) -> None:
        self.seq = seq

    def on_batch(self, values: list[Envelope]) -> tuple[Iterable[Any], bool]:
        out: list[Any] = []
        for env in values:
            late = self.seq.on_event(env, out)
            if late is not None:
                out.append(late)
        return out, RETAIN

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        out: list[Any] = []
        self.seq.on_eof(out)
        return out, RETAIN

    def snapshot(self) -> bytes:
        return pack([self.seq.max_ts, self.seq.last_tick])


class _FrictionLogic(StatefulBatchLogic[Any, Any, bytes]):
    """Bytewax shim over :class:`FrictionEngine` (one key)."""

    def __init__(self, engine: FrictionEngine, version: int,
                 applied: RulesUpdate | None = None) -> None:
        self.engine = engine
        self.version = version
        self.applied = applied

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Any], bool]:
        out: list[Any] = []
        for v in values:
            if type(v) is VisitDone:
                self.engine.on_visit(v, out)
            elif type(v) is RulesUpdate:
                rules = _compiled(v) if v.version > self.version else None
                if rules is not None:
                    self.engine.set_rules(rules)
                    self.version = v.version
                    self.applied = v
                    out.append(RulesApplied(v.version, v.digest))
            else:
                self.engine.on_progress(v, out)
        return out, RETAIN

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        out: list[Any] = []
        self.engine.flush(out)
        return out, RETAIN

    def snapshot(self) -> bytes:
        snap = self.engine.snapshot()
        if self.applied is not None:
            snap["ruleset"] = _update_state(self.applied)
        return pack(snap)


class _StatsLogic(StatefulBatchLogic[Any, dict[str, Any], bytes]):
    """Bytewax shim over :class:`StatsEngine` (one key): emits the document periodically
    (live) or once at the end (replay).

    Live, deltas are stamped with their arrival time (for the tumbling windows), and
    the document is emitted when counts arrived or a window ended (so the last window
    closes while idle, once). A :class:`flows.control.RulesUpdate` adds its rules'
    campaigns."""

    def __init__(self, engine: StatsEngine, live: bool, now_ms: Callable[[], int],
                 every_ms: int) -> None:
        self.engine = engine
        self.live = live
        self.now_ms = now_ms
        self.every_ms = every_ms
        self.next_emit = now_ms() + every_ms
        self.version = -1

    def on_batch(self, values: list[Any]) -> tuple[Iterable[dict[str, Any]], bool]:
        # Prometheus counters move here, per delta / per batch: never per event.
        reasons: dict[str, int] = {}
        now = self.now_ms() if self.live else None
        for v in values:
            if type(v) is StatDelta:
                self.engine.add(v, at_ms=now)
                metrics.count_stat_delta(v.counts)
            elif type(v) is RulesUpdate:
                if v.version > self.version:
                    rules = _compiled(v)
                    if rules is not None:
                        self.version = v.version
                        self.engine.set_campaigns(rule_campaigns(rules))
            else:
                self.engine.dead_letter(v)
                reasons[v] = reasons.get(v, 0) + 1
        if reasons:
            metrics.count_dead_letters(reasons)
        return (), RETAIN

    def on_notify(self) -> tuple[Iterable[dict[str, Any]], bool]:
        now = self.now_ms()
        self.next_emit = now + self.every_ms
        if not self.engine.dirty and not self.engine.due(now):
            return (), RETAIN
        self.engine.dirty = False
        return [self.engine.render(now)], RETAIN

    def on_eof(self) -> tuple[Iterable[dict[str, Any]], bool]:
        return [self.engine.render()], RETAIN

    def notify_at(self) -> datetime | None:
        return _dt(self.next_emit) if self.live else None

    def snapshot(self) -> bytes:
        return pack(self.engine.snapshot())


# --- live intake: route raw records to shards, decode them there --------------------


@dataclass(frozen=True, slots=True)
class ShardBatch:
    """What a live router sends one shard: raw records of that shard in arrival order,
    and the profiles it read for the customers of their clicks (by customer id).

    The shard decodes the records and reads its rules' profiles from ``profiles``
    instead of reading Redis again: on a multi-process cluster a shard may run in
    another process than the router, whose profile cache the router's read warmed
    (on 2 processes, about half of them do).

    ``shards`` is the router's ``engine.shards`` and ``terms`` the digest of its
    process's :class:`ClusterTerms`: the shard checks both against its own, since a
    cluster whose processes disagree would split customers' state (shards) or decide
    for them by different settings and rules depending on where their shard runs.
    """

    records: list[RawRecord]
    profiles: Mapping[str, Profile]
    shards: int
    terms: int = 0

    def __reduce__(self) -> tuple[type[ShardBatch],
                                  tuple[list[RawRecord], dict[str, Profile], int, int]]:
        # Pickled when the shard runs in another process (the empty map is a proxy,
        # which does not pickle; a dict does).
        return (ShardBatch, (self.records, dict(self.profiles), self.shards, self.terms))


@dataclass(frozen=True, slots=True)
class ClusterTerms:
    """What every process of a cluster must agree on: the settings its shards and
    router decide with, and the rule set it starts with (its version and document
    digest; rule changes while running reach every shard through the routers, in order).

    ``digest`` (CRC-32 of the sorted-key JSON of ``values``, the same in every process)
    travels with each :class:`ShardBatch`; ``str()`` is the line each process logs at
    start, to compare.
    """

    values: Mapping[str, Any]
    digest: int

    @classmethod
    def of(cls, settings: Settings, rules: RuleSet) -> ClusterTerms:
        """The terms of a process with these settings, starting with ``rules``."""
        es = settings.engine
        values: dict[str, Any] = {
            "engine.shards": es.shards,
            "engine.allowed_lateness_s": es.allowed_lateness_s,
            "engine.history_horizon_s": es.history_horizon_s,
            "engine.max_clock_skew_s": es.max_clock_skew_s,
            "engine.max_message_bytes": es.max_message_bytes,
            "engine.max_attrs_bytes": es.max_attrs_bytes,
            "engine.idle_ttl_s": es.idle_ttl_s,
            "engine.session_idle_s": es.session_idle_s,
            "engine.conversion_window_s": es.conversion_window_s,
            "engine.sweep_interval_s": es.sweep_interval_s,
            "rules": f"version {rules.version}, digest {rules.digest or '-'}",
        }
        return cls(values, zlib.crc32(json_dumps(values)))

    def __str__(self) -> str:
        listed = ", ".join(f"{k} = {v}" for k, v in self.values.items())
        return f"{self.digest:08x} ({listed})"


class ClusterTermsError(RuntimeError):
    """A shard received records routed by a process with other :class:`ClusterTerms`:
    the processes of a cluster were started with different settings or rules."""


class ShardCountError(ClusterTermsError):
    """A shard received records routed with another ``engine.shards`` than its own:
    the processes of a cluster were started with different settings."""


def _terms_differ(here: ClusterTerms | None, digest: int, routed: int) -> NoReturn:
    msg = (f"a shard got records routed by a process with other cluster terms ({routed:08x} "
           f"there, {digest:08x} here): every process of a cluster must run with the same "
           "engine settings and rules file, or a customer's pushes would depend on which "
           "process holds their shard; this process has "
           f"{here if here is not None else 'no terms'}; compare the 'cluster terms' line "
           "each process logs at start, then start every process with the same values")
    log.error("%s", msg)  # logged as well as raised: see _shard_count_differs
    raise ClusterTermsError(msg)


def _shard_count_differs(here: int, routed: int) -> NoReturn:
    msg = (f"a shard with engine.shards = {here} got records routed with engine.shards = "
           f"{routed}: every process of a cluster needs the same engine.shards (a "
           "customer's shard is crc32(id) % shards, so with two counts one customer's "
           "state splits in two); stop the cluster and start every process with the same "
           "value")
    # Logged as well as raised: in a multi-process cluster Bytewax 0.21.1 ends every
    # process with "Send thread panic" and prints no Python exception (bytewax#318),
    # and this error cannot be seen on one process.
    log.error("%s", msg)
    raise ShardCountError(msg)


def _profiles_of(batches: list[ShardBatch]) -> Mapping[str, Profile]:
    """The profiles the router read for these batches of one shard (a later batch's
    read wins: it is the fresher)."""
    if len(batches) == 1:
        return batches[0].profiles
    merged: dict[str, Profile] = {}
    for b in batches:
        merged.update(b.profiles)
    return merged


CONTROL_PARTS = "control:"
"""The prefix of the rule-change partitions in the one input step."""
CONTROL_KEY = "control"
"""The router's key for rule changes and decisions (never a shard key)."""
_CONTROL_TYPES = (RulesUpdate, RulesStatus)


@dataclass(frozen=True)
class ShardRouter:
    """Live: group a batch of raw records by customer shard, without decoding them.

    The shard comes from the message key (the customer id, on Kafka); a record without
    a key is decoded here once to find its customer (and routed to shard 0 if it cannot
    be, where decoding dead-letters it). A key that disagrees with the body is routed
    by the key and dead-lettered by :class:`LiveIntake`.

    Clicks are what needs profiles: the customers of the records from the source
    ``clicks_source`` (``"topic/"`` prefix) get their profiles fetched here in one
    round trip for the whole batch (``profiles.prefetch``), rather than one per shard,
    and each shard's :class:`ShardBatch` carries what was read for its customers.

    With ``control``, a :class:`flows.control.RulesUpdate` in the batch (the accepted
    rule changes, read by the same input step) is sent to *every* shard key, in its
    place: each shard gets the records the router saw before it, then the update, then
    the records after it. Each update, and each :class:`flows.control.RulesStatus`, also
    comes out once as ``(CONTROL_KEY, item)``, for the steps after the shards and the
    rule-status output.
    """

    shards: int
    limits: Limits
    profiles: ProfileStore | None = None
    clicks_source: str | None = None
    control: bool = False
    terms: int = 0
    """The digest of this process's :class:`ClusterTerms`, carried by every batch."""

    def __call__(self, records: list[Any]) -> list[tuple[str, Any]]:
        """``[(shard key, ShardBatch | RulesUpdate), ...]``, and with ``control``
        ``(CONTROL_KEY, RulesUpdate | RulesStatus)``."""
        if self.control and any(type(r) in _CONTROL_TYPES for r in records):
            out: list[tuple[str, Any]] = []
            seg: list[RawRecord] = []
            for r in records:
                if type(r) in _CONTROL_TYPES:
                    if seg:
                        out.extend(self.route(seg))
                        seg = []
                    if type(r) is RulesUpdate:
                        out.extend((shard_key(s), r) for s in range(self.shards))
                    out.append((CONTROL_KEY, r))
                else:
                    seg.append(r)
            if seg:
                out.extend(self.route(seg))
            return out
        return self.route(records)

    def route(self, records: list[RawRecord]) -> list[tuple[str, Any]]:
        """Raw records only: ``[(shard key, ShardBatch of that shard), ...]``."""
        shards, terms = self.shards, self.terms
        groups: dict[int, list[RawRecord]] = {}
        crc32 = zlib.crc32
        clicks = self.clicks_source if self.profiles is not None else None
        # a key that cannot be a customer id (empty, or longer than the longest id in
        # UTF-8) costs no lookup: decoding will dead-letter its record
        longest = 4 * self.limits.max_customer_id_len
        wanted: list[tuple[int, str]] = []  # (shard, customer id) of each keyed click
        for rec in records:
            key = rec.key
            if key is None:
                env = decode_record(rec, self.limits)
                s = crc32(env.event.customer_id.encode() if type(env) is Envelope
                          else b"") % shards
            else:
                s = crc32(key) % shards
                if clicks is not None and key and len(key) <= longest and (
                        rec.source.startswith(clicks)):
                    wanted.append((s, key.decode("utf-8", "replace")))
            g = groups.get(s)
            if g is None:
                groups[s] = [rec]
            else:
                g.append(rec)
        if not wanted:
            return [(shard_key(s), ShardBatch(g, NO_PROFILES, shards, terms))
                    for s, g in groups.items()]
        assert self.profiles is not None
        read = self.profiles.prefetch([cid for _, cid in wanted])
        held: dict[int, dict[str, Profile]] = {}
        for s, cid in wanted:
            p = read.get(cid)
            if p is not None:
                h = held.get(s)
                if h is None:
                    held[s] = {cid: p}
                else:
                    h[cid] = p
        return [(shard_key(s), ShardBatch(g, held.get(s, NO_PROFILES), shards, terms))
                for s, g in groups.items()]


@dataclass(frozen=True)
class LiveIntake:
    """Live: decode raw records and check their event time against the wall clock.

    Returns the usable envelopes in order; dead letters (undecodable, key mismatch,
    too old, from the future) are appended to ``out``.
    """

    limits: Limits
    lateness_ms: int
    horizon_ms: int
    skew_ms: int

    def __call__(self, groups: Iterable[list[RawRecord]], now: int,
                 out: list[Any]) -> list[Envelope]:
        """Decode every record of every group."""
        envs: list[Envelope] = []
        limits = self.limits
        stale = now - self.lateness_ms
        for group in groups:
            for rec in group:
                env = decode_record(rec, limits)
                if type(env) is not Envelope:
                    out.append(env)
                elif env.event.ts >= stale and env.event.ts <= now + self.skew_ms:
                    envs.append(env)  # the common case: fresh
                else:
                    checked = live_time_check(env, now, self.lateness_ms, self.horizon_ms,
                                              self.skew_ms)
                    if type(checked) is Envelope:
                        envs.append(checked)
                    else:
                        out.append(checked)
        return envs


# --- small named steps ----------------------------------------------------------------


def _is_envelope(x: Envelope | DeadLetter) -> bool:
    return type(x) is Envelope


def _of_type(t: type) -> Callable[[Any], Any | None]:
    def pick(kv: tuple[str, Any]) -> Any | None:
        return kv[1] if type(kv[1]) is t else None

    pick.__name__ = f"pick_{t.__name__}"
    return pick


def _unwrap(kv: tuple[str, Any]) -> Any:
    return kv[1]


def _for_friction(kv: tuple[str, Any]) -> tuple[str, Any] | None:
    return ("friction", kv[1]) if type(kv[1]) in (VisitDone, Progress) else None


def _stat_or_none(kv: tuple[str, Any]) -> tuple[str, Any] | None:
    return ("stats", kv[1]) if type(kv[1]) is StatDelta else None


def _dead_letter_reason(d: DeadLetter) -> tuple[str, str]:
    return ("stats", d.reason)


def _emit(step_id: str, stream: Stream[Any], sinks: list[Sink[Any]]) -> None:
    for i, sink in enumerate(sinks):
        s = stream
        if isinstance(sink, FixedPartitionedSink):
            s = op.key_on(f"{step_id}_key_{i}", s, lambda _x: "all")
        op.output(f"{step_id}_{i}", s, sink)


# --- the flow -------------------------------------------------------------------------


def engine_config(settings: Settings) -> EngineConfig:
    """The shard engines' parameters from ``settings.engine`` (seconds become ms)."""
    es = settings.engine
    return EngineConfig(shards=es.shards,
                        idle_ttl_ms=int(es.idle_ttl_s * 1000),
                        session_idle_ms=int(es.session_idle_s * 1000),
                        conversion_window_ms=int(es.conversion_window_s * 1000),
                        sweep_interval_ms=int(es.sweep_interval_s * 1000))


def build_flow(
    settings: Settings,
    *,
    source: Source[RawRecord],
    outputs: Outputs,
    rules: RuleSet,
    profiles: ProfileStore,
    now_ms: Callable[[], int] = system_now_ms,
    recovery: bool = False,
    control: Source[Any] | None = None,
    quota: QuotaStore | None = None,
) -> Dataflow:
    """Build the experience dataflow.

    ``settings.mode`` picks the clock: ``replay`` orders events by event time behind a
    watermark and is deterministic; ``live`` applies events on arrival and fires
    timers on the wall clock given by ``now_ms``. ``recovery`` says whether the flow
    runs with a Bytewax recovery store: without one the per-customer shards are not
    serialised at every epoch (their snapshot would be thrown away).

    ``quota`` holds campaign quotas for every worker (a Redis store across processes);
    by default one in-memory store for this flow, shared by its workers.

    ``control`` (live only; see :class:`connectors.rules_sources.ControlSource`) is the
    rule-change input: it yields :class:`flows.control.RulesStatus` decisions (to
    ``outputs.rules_status``) and accepted :class:`flows.control.RulesUpdate` sets, which
    are merged into the event input ahead of the router, sent to every shard key and to
    the friction key, and applied there once (by version), keeping all per-customer
    state. ``rules`` is the set in force until then, and after a restart the set each
    key's snapshot names.
    """
    es = settings.engine
    live = settings.mode == "live"
    limits = Limits(max_message_bytes=es.max_message_bytes, max_attrs_bytes=es.max_attrs_bytes)
    config = engine_config(settings)
    lateness_ms = int(es.allowed_lateness_s * 1000)
    horizon_ms = int(es.history_horizon_s * 1000)
    skew_ms = int(es.max_clock_skew_s * 1000)
    stats_ms = int(es.stats_interval_s * 1000)

    intake = LiveIntake(limits, lateness_ms, horizon_ms, skew_ms) if live else None
    quotas: QuotaStore = quota if quota is not None else InMemoryQuotaStore()
    terms = ClusterTerms.of(settings, rules)
    if live and es.addresses:  # one line per process, to compare when they disagree
        log.info("cluster terms %s", terms)

    def decode(rec: RawRecord) -> Envelope | DeadLetter:
        return decode_record(rec, limits)

    def shard_builder(state: bytes | None) -> _ShardLogic:
        st = unpack(state) if state else None
        rs, applied = _restore_rules(st, rules)
        # with a recovery store, each epoch's snapshot re-packs only the changed customers
        eng = ShardEngine(-1, rs, profiles, config, st, quota=quotas, incremental=recovery)
        return _ShardLogic(eng, intake, now_ms, stats_ms, recovery, applied, terms)

    def friction_builder(state: bytes | None) -> _FrictionLogic:
        st = unpack(state) if state else None
        rs, applied = _restore_rules(st, rules)
        # a visit stamped up to the allowed clock skew ahead moves no step out of its window
        eng = FrictionEngine(rs, es.shards, live, st, forget_margin_ms=skew_ms)
        return _FrictionLogic(eng, rs.version, applied)

    if control is not None and not live:
        raise ValueError("rule changes while running (control) need live mode")
    flow = Dataflow("touchstream")
    if control is not None:
        # one input step, not two: two input steps' epochs drift apart in Bytewax 0.21.1
        # (connectors.wrapped.with_partitions_of says how)
        source = with_partitions_of(source, control, CONTROL_PARTS)
    raw: Stream[Any] = op.input("events_in", flow, source)
    # raw: RawRecord (bytes, where they came from, format); with control, also
    # RulesUpdate (an accepted rule set) | RulesStatus (every decision) from its partition
    updates: Stream[Any] | None = None
    dead: Stream[Any]
    if live:
        router = ShardRouter(es.shards, limits, profiles, f"{settings.kafka.clicks_topic}/",
                             control=control is not None, terms=terms.digest)
        keyed = op.flat_map_batch("route_to_shards", raw, router)
        # keyed: (shard key, [RawRecord, ...]): decoded by the shard, applied on arrival;
        # with control, each RulesUpdate to every shard key in its place in the batch,
        # and (CONTROL_KEY, RulesUpdate | RulesStatus) once
        if control is not None:
            ctl = op.filter_map("control_items", keyed, _control_item)
            # ctl: RulesUpdate | RulesStatus
            keyed = op.filter("shard_items", keyed, _is_shard_item)
            updates = op.filter("rule_updates", ctl, _is_update)
            _emit("rules_status_out", op.filter("rules_status", ctl, _is_status),
                  outputs.rules_status)
    else:
        decoded = op.map("decode", raw, decode)
        # decoded: Envelope | DeadLetter
        split = op.branch("split_bad", decoded, _is_envelope)
        events: Stream[Any] = split.trues
        dead = split.falses
        # events: Envelope; dead: DeadLetter (bad bytes, wrong fields, ...)
        seq_keyed = op.key_on("key_by_source", events, lambda _e: "input")
        routed = op.stateful_batch(
            "sequence", seq_keyed,
            lambda st: _SequencerLogic(_resume_sequencer(st, es.shards, lateness_ms,
                                                          int(es.tick_interval_s * 1000))),
        )
        # routed: ("input", (shard key, Envelope | Tick) | DeadLetter(late))
        late = op.filter_map("late_events", routed, _of_type(DeadLetter))
        dead = op.merge("dead_letters_all", dead, late)
        keyed = op.filter_map("to_shards", routed, _route_to_shard)
        # keyed: (shard key, Envelope | Tick), released in event-time order by ticks

    shard_out = op.stateful_batch("customers", keyed, shard_builder)
    # shard_out: (shard key, Push | Alert | VisitDone | Progress | StatDelta | DeadLetter)
    if live:
        dead = op.filter_map("dead_letters", shard_out, _of_type(DeadLetter))
        # dead: DeadLetter (bad bytes, wrong fields, key mismatch, too old, future)
    pushes = op.filter_map("pushes", shard_out, _of_type(Push))
    holdouts = op.filter_map("holdouts", shard_out, _of_type(Holdout))
    # holdouts: Holdout (a control-group customer a rule held out, for uplift)
    customer_alerts = op.filter_map("customer_alerts", shard_out, _of_type(Alert))

    friction_in = op.filter_map("visits", shard_out, _for_friction)
    if updates is not None:
        friction_in = op.merge("visits_and_rules", friction_in,
                               op.map("rules_to_friction", updates, _to_friction))
    friction_out = op.stateful_batch("step_friction", friction_in, friction_builder)
    # friction_out: ("friction", Alert | StatDelta)
    step_alerts = op.filter_map("step_alerts", friction_out, _of_type(Alert))
    alerts = op.merge("alerts", customer_alerts, step_alerts)

    stat_deltas = op.merge(
        "stat_deltas",
        op.filter_map("shard_stats", shard_out, _stat_or_none),
        op.filter_map("friction_stats", friction_out, _stat_or_none),
        op.map("dead_letter_reasons", dead, _dead_letter_reason),
    )
    if updates is not None:
        stat_deltas = op.merge("stats_and_rules", stat_deltas,
                               op.map("rules_to_stats", updates, _to_stats))
    # stat_deltas: ("stats", StatDelta | dead letter reason | RulesUpdate)
    campaigns = rule_campaigns(rules)
    stats = op.stateful_batch(
        "stats", stat_deltas,
        lambda st: _StatsLogic(StatsEngine(config.conversion_window_ms,
                                           unpack(st) if st else None, campaigns=campaigns,
                                           max_names=es.stats_max_names),
                               live, now_ms, stats_ms),
    )
    stats_docs = op.map("stats_docs", stats, _unwrap)
    # stats_docs: the stats document (periodically live, once at the end of a replay)

    _emit("pushes_out", pushes, outputs.pushes)
    _emit("alerts_out", alerts, outputs.alerts)
    _emit("dead_letters_out", dead, outputs.dead_letters)
    _emit("stats_out", stats_docs, outputs.stats)
    _emit("holdouts_out", holdouts, outputs.holdouts)
    if outputs.rules_applied:
        applied = op.merge("rules_applied",
                           op.filter("shard_rules_applied", shard_out, _is_applied),
                           op.filter("friction_rules_applied", friction_out, _is_applied))
        _emit("rules_applied_out", applied, outputs.rules_applied)
    return flow


def _control_item(kv: tuple[str, Any]) -> Any:
    return kv[1] if kv[0] == CONTROL_KEY else None


def _is_shard_item(kv: tuple[str, Any]) -> bool:
    return kv[0] != CONTROL_KEY


def _is_update(x: Any) -> bool:
    return type(x) is RulesUpdate


def _is_status(x: Any) -> bool:
    return type(x) is RulesStatus


def _is_applied(kv: tuple[str, Any]) -> bool:
    return type(kv[1]) is RulesApplied


def _to_friction(u: RulesUpdate) -> tuple[str, RulesUpdate]:
    return ("friction", u)


def _to_stats(u: RulesUpdate) -> tuple[str, RulesUpdate]:
    return ("stats", u)


def _route_to_shard(kv: tuple[str, Any]) -> tuple[str, Any] | None:
    v = kv[1]
    return v if type(v) is tuple else None


def _resume_sequencer(state: bytes | None, shards: int, lateness_ms: int,
                      tick_ms: int) -> Sequencer:
    seq = Sequencer(shards, lateness_ms, tick_ms)
    if state:
        seq.max_ts, seq.last_tick = unpack(state)
    return seq


def live_time_check(env: Envelope, now: int, lateness_ms: int, horizon_ms: int,
                    skew_ms: int) -> Envelope | DeadLetter:
    """Live: dead-letter events too old to matter or from the future; mark stale ones.

    An event older than ``lateness_ms`` still updates history (a late network record
    of a past cinema visit counts as a past visit) but triggers nothing.
    """
    ts = env.event.ts
    if ts > now + skew_ms:
        return DeadLetter("ts_in_future", f"event time is more than {skew_ms // 1000} s ahead",
                          env.raw, env.source, env.pos)
    if ts < now - horizon_ms:
        return DeadLetter("late", f"event time is more than {horizon_ms // 1000} s old",
                          env.raw, env.source, env.pos)
    if ts < now - lateness_ms:
        return Envelope(env.event, env.source, env.pos, env.raw, fresh=False)
    return env
