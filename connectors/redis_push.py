"""Push channels in Redis: a Bytewax sink that writes them and a reader for terminals.

Each push goes to its channel (``terminal:T1``, ``customer:C1``, ...) two ways:

* ``XADD push:<channel> MAXLEN ~ <stream_maxlen> * data <push JSON>`` -- the stream a
  terminal that was offline reads from its last id with :func:`read_channel`; the
  stream gets ``EXPIRE push:<channel> <stream_ttl_s>`` after each batch that wrote it;
* ``PUBLISH push:<channel> <push JSON>`` -- for live listeners (if ``publish``).

The push JSON is ``flows.codec.json_dumps(push.to_dict())`` (outside clients read it;
the push's internal ``guard`` is not in it).

**Exactly once.** With a guard store the sink first admits the batch (one request per
push: :meth:`state.guards.GuardRequest.for_push`, its ``push_id`` at its event time
plus the once-per key and per-customer cap its ``guard`` carries): workers or
processes sharing one guard store (a shared Redis) never exceed a customer's cap nor
repeat a once-per push, even when their flow states disagree. The pushes admitted
(``ok``) *and* those the guard calls ``duplicate`` then go to the append script, which
for each push, atomically, appends it only if its delivery marker
``guard:{<stream key>}:sent:<push_id>`` (same cluster slot as the stream; expires after
``marker_ttl_s``) does not exist, then sets the marker. So:

* a push replayed after a restart and already appended is not appended again;
* a push admitted and then not appended (the connection dropped between the two round
  trips, a pipeline ran half way, the process died) is appended when it comes again:
  the guard says ``duplicate`` (its cap slot is not taken twice), the marker is absent;
* redis-py re-sending a pipeline after a reconnect repeats nothing.

**Redis outages.** When a batch fails with a connection error (any of
:data:`state.redis_store.UNAVAILABLE`), ``write_batch`` does not raise: it *holds* the
batch's pushes (in order, at most ``max_held_effects`` per worker) and returns, so the
flow keeps reading. A retry thread of that worker sends the held pushes again, oldest
first, every ``retry_interval_s`` until Redis answers, so they are delivered soon after
Redis returns even if no new push arrives; while anything is held, new pushes queue
behind it (per-channel order is kept). When the hold is full, ``write_batch`` waits
until the retry thread makes room: back-pressure on the flow, never a drop. Redis
errors that are not an outage (a key of the wrong type, a script error) fail the flow
as before.

A hold in memory would be lost on SIGKILL: Bytewax commits the epoch once
``write_batch`` returns, so the input would not be read again. With ``spool_dir``,
``write_batch`` appends the pushes it holds to ``<spool_dir>/push-held-<worker>.jsonl``
and fsyncs before returning; the file is rewritten as held pushes are delivered and
read back by :meth:`RedisPushOutput.build` on the next start (a worker also adopts the
files of worker indexes that no longer exist). On ``close`` the sink keeps trying for
``close_timeout_s``; what is still held then stays in the spool (without a spool it is
lost, logged and counted as ``lost``).

:meth:`RedisPushOutput.stats` counts ``written``, the guard's refusals (``duplicate``,
``cap``, ``once``), ``redis_errors`` (failed attempts), ``held_total`` (pushes that
went through the hold), ``backpressure`` (``write_batch`` calls that waited for room)
with ``backpressure_ms``, ``restored`` (read back from the spool), ``lost``; and, once
anything was held, the gauges ``held`` (now, all workers) and ``held_max`` (the most
one worker held). Prometheus (:mod:`flows.metrics`): ``touchstream_redis_held_pushes``
per worker, ``touchstream_redis_unavailable_total{op="push"}`` per failed attempt,
``touchstream_push_sink_backpressure_seconds_total`` and the ``written``, ``duplicate``,
``cap``, ``once`` and ``lost`` outcomes of ``touchstream_push_sink_pushes_total``.

With ``cluster`` the sink uses redis-py's cluster client: the guard script runs per
customer slot, the append script per stream slot (a stream's marker shares its slot);
``PUBLISH`` from a script reaches every node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from hashlib import sha1
from pathlib import Path
from typing import Any, Final, TypeAlias

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.typing import EncodableT

from flows import metrics
from flows.codec import DecodeError, json_dumps, json_loads
from flows.model import Push, PushGuard
from flows.settings import RedisSettings
from state.guards import GuardRequest, GuardStore
from state.redis_store import (
    MISCONFIGURED,
    UNAVAILABLE,
    RedisClient,
    RedisGuardStore,
    connect,
    run_scripts,
)

__all__ = [
    "GuardSpec",
    "RedisPushConfig",
    "RedisPushOutput",
    "marker_key",
    "read_channel",
    "stream_key",
]

log = logging.getLogger(__name__)

GuardSpec: TypeAlias = GuardStore | Callable[[RedisClient], GuardStore] | None
"""A guard store, or a factory called in ``build()`` with that worker's client."""

DEFAULT_PREFIX = "push:"
DEFAULT_MARKER_PREFIX = "guard:"

_WRITE_RTT = metrics.REDIS_RTT.labels("push_write")
_UNAVAILABLE = metrics.REDIS_UNAVAILABLE.labels("push")

_APPEND_CHUNK: Final = 200
"""Pushes per append script call."""
_DRAIN_CHUNK: Final = 1000
"""Held pushes sent per retry attempt."""

# KEYS: (stream key, marker key) per push. ARGV[1] marker ttl ms, ARGV[2] maxlen,
# ARGV[3] '~' (approximate) or '=', ARGV[4] publish 0/1, ARGV[5] stream ttl s (0 =
# none), then the push JSON of each push. Returns 1 (appended) or 0 (marker present)
# per push. XADD is the one command that can fail (a key of the wrong type): it runs
# before the marker is set, so a failed push leaves no marker behind.
_APPEND_LUA: Final = """
local out = {}
local touched = {}
for i = 1, #KEYS / 2 do
  local stream, marker = KEYS[2*i-1], KEYS[2*i]
  local data = ARGV[5+i]
  if redis.call('EXISTS', marker) == 0 then
    redis.call('XADD', stream, 'MAXLEN', ARGV[3], ARGV[2], '*', 'data', data)
    redis.call('SET', marker, '1', 'PX', ARGV[1])
    if ARGV[4] == '1' then redis.call('PUBLISH', stream, data) end
    touched[stream] = true
    out[i] = 1
  else
    out[i] = 0
  end
end
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  for stream in pairs(touched) do redis.call('EXPIRE', stream, ttl) end
end
return out
"""

_APPEND_SHA: Final = sha1(_APPEND_LUA.encode("utf-8"), usedforsecurity=False).hexdigest()


def stream_key(channel: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The stream (and pub/sub channel) name of a push channel."""
    return prefix + channel


def _hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes, if it has a hash tag (Redis' rule)."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]


@cache
def _tag_of_slot(slot: int) -> str:
    """A short hash tag that lands in ``slot`` (only for keys with a stray ``}``)."""
    i = 0
    while key_slot(str(i).encode()) != slot:
        i += 1
    return str(i)


def marker_key(stream: str, push_id: str, prefix: str = DEFAULT_MARKER_PREFIX) -> str:
    """The delivery marker of ``push_id`` on ``stream``, in the stream's cluster slot.

    ``guard:{push:terminal:T1}:sent:<push_id>``: the stream key is the hash tag (or the
    stream's own hash tag if it has one), so the append script touches one slot.
    """
    tag = _hash_tag(stream)
    if tag is None:
        tag = stream if "}" not in stream else _tag_of_slot(key_slot(stream.encode()))
    return f"{prefix}{{{tag}}}:sent:{push_id}"


@dataclass(frozen=True, slots=True)
class RedisPushConfig:
    """Where and how pushes are written, and how a Redis outage is ridden out.

    ``stream_ttl_s`` None or 0 = streams never expire. ``approximate_trim`` uses
    ``MAXLEN ~`` (cheap; the stream may hold somewhat more than ``stream_maxlen``).
    ``cluster`` = ``url`` is a node of a Redis Cluster (redis-py's cluster client).
    ``marker_ttl_s``: how long a delivery marker lives (at least the guard's push-id
    window, 7 days, plus its 1 h slack: a replay the guard calls ``duplicate`` must
    find the marker). ``max_held_effects`` pushes per worker are held while Redis is
    unreachable, retried every ``retry_interval_s``; ``spool_dir`` makes the hold
    survive a crash; ``close_timeout_s`` is how long ``close`` keeps trying.
    """

    url: str = field(repr=False)  # may hold a password
    stream_maxlen: int = 1000
    stream_ttl_s: int | None = 7 * 24 * 3600
    publish: bool = True
    approximate_trim: bool = True
    prefix: str = DEFAULT_PREFIX
    cluster: bool = False
    marker_prefix: str = DEFAULT_MARKER_PREFIX
    marker_ttl_s: int = 7 * 24 * 3600 + 3600
    max_held_effects: int = 10_000
    retry_interval_s: float = 0.5
    spool_dir: Path | None = None
    close_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.stream_maxlen < 1:
            raise ValueError("stream_maxlen must be at least 1")
        if self.max_held_effects < 1:
            raise ValueError("max_held_effects must be at least 1")
        if self.retry_interval_s <= 0 or self.marker_ttl_s < 1 or self.close_timeout_s < 0:
            raise ValueError("retry_interval_s and marker_ttl_s must be positive, "
                             "close_timeout_s not negative")

    @classmethod
    def from_settings(cls, settings: RedisSettings, **overrides: Any) -> RedisPushConfig:
        """The config from the ``redis`` settings section (which must have a url)."""
        if settings.url is None:
            raise ValueError("redis.url is not set")
        kwargs: dict[str, Any] = {
            "url": settings.url.get_secret_value(),
            "stream_maxlen": settings.stream_maxlen,
            "stream_ttl_s": settings.stream_ttl_s,
            "cluster": settings.cluster,
            "max_held_effects": settings.max_held_effects,
            "retry_interval_s": settings.retry_interval_s,
        }
        return cls(**(kwargs | overrides))


class _Stats:
    """Counts and hold gauges shared by all partitions of one sink (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._held: dict[int, int] = {}
        self._held_max: dict[int, int] = {}

    def add(self, counts: Counter[str]) -> None:
        with self._lock:
            self._counts.update(counts)

    def set_held(self, worker: int, n: int) -> None:
        """Record how many pushes ``worker`` holds now (per batch or retry, not per push)."""
        with self._lock:
            self._held[worker] = n
            if n > self._held_max.get(worker, 0):
                self._held_max[worker] = n
        metrics.REDIS_HELD_PUSHES.labels(str(worker)).set(n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            out = {k: v for k, v in self._counts.items() if v}
            if self._held_max:
                out["held"] = sum(self._held.values())
                out["held_max"] = max(self._held_max.values())
            return out


# --- the spool: held pushes on disk ---------------------------------------------------------

_SPOOL_RE: Final = re.compile(r"push-held-(\d+)\.jsonl")


def _spool_path(directory: Path, worker_index: int) -> Path:
    return directory / f"push-held-{worker_index}.jsonl"


def _held_line(p: Push) -> bytes:
    guard = None if p.guard is None else dataclasses.asdict(p.guard)
    return json_dumps({"push": p.to_dict(), "guard": guard}) + b"\n"


def _push_of(doc: Any) -> Push:
    """A held push back from its spool record; raises on anything malformed."""
    if not isinstance(doc, dict) or not isinstance(doc.get("push"), dict):
        raise ValueError("not a held push record")
    g = doc.get("guard")
    guard = PushGuard(**g) if isinstance(g, dict) else None
    p = Push(**doc["push"], guard=guard)
    if not (isinstance(p.push_id, str) and isinstance(p.customer_id, str)
            and isinstance(p.channel, str) and isinstance(p.event_ts, int)):
        raise ValueError("a held push record has fields of the wrong type")
    return p


def _read_spool(path: Path) -> list[Push]:
    """The pushes in a spool file, in order. A torn or unreadable line (a crash in the
    middle of an append: that batch was never acknowledged, so the flow reads its
    input again) is skipped and logged."""
    out: list[Push] = []
    bad = 0
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            out.append(_push_of(json_loads(line)))
        except (DecodeError, TypeError, ValueError):
            bad += 1
    if bad:
        log.warning("push spool %s: %d unreadable record(s) skipped (a torn append)",
                    path.name, bad)
    return out


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Spool:
    """One worker's held pushes on disk: appended and fsync'd, rewritten as delivered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("ab")

    def append(self, pushes: Iterable[Push]) -> None:
        self._fh.write(b"".join(_held_line(p) for p in pushes))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def rewrite(self, pushes: Sequence[Push]) -> None:
        """Replace the file's content by ``pushes`` (atomically; empty = truncate)."""
        if not pushes:
            self._fh.truncate(0)
            os.fsync(self._fh.fileno())
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as fh:
            fh.write(b"".join(_held_line(p) for p in pushes))
            fh.flush()
            os.fsync(fh.fileno())
        self._fh.close()
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._fh = self.path.open("ab")

    def close(self) -> None:
        self._fh.close()


def _restore(directory: Path, worker_index: int, worker_count: int) -> tuple[_Spool, list[Push]]:
    """Open this worker's spool with what earlier runs left in it (and in the files of
    worker indexes ``i`` with ``i % worker_count == worker_index`` that no longer run)."""
    own = _spool_path(directory, worker_index)
    restored = _read_spool(own) if own.exists() else []
    adopted: list[Path] = []
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            m = _SPOOL_RE.fullmatch(path.name)
            if m is None:
                continue
            i = int(m.group(1))
            if i != worker_index and i >= worker_count and i % worker_count == worker_index:
                restored += _read_spool(path)
                adopted.append(path)
    spool = _Spool(own)
    spool.rewrite(restored)  # also drops a torn tail
    for path in adopted:
        path.unlink()
    if adopted:
        _fsync_dir(directory)
    return spool, restored


# --- the sink ------------------------------------------------------------------------------


class _RedisPushPartition(StatelessSinkPartition[Push]):
    def __init__(
        self,
        config: RedisPushConfig,
        client: RedisClient,
        guard: GuardStore | None,
        stats: _Stats,
        *,
        worker_index: int = 0,
        spool: _Spool | None = None,
        restored: Sequence[Push] = (),
    ) -> None:
        self._cfg = config
        self._client = client
        self._guard = guard
        self._stats = stats
        self._worker = worker_index
        self._spool = spool
        # only a shared Redis guard store is a round trip worth timing
        self._guard_rtt = (metrics.REDIS_RTT.labels("push_guard")
                           if isinstance(guard, RedisGuardStore) else None)
        self._cond = threading.Condition()
        self._held: deque[Push] = deque(restored)
        self._thread: threading.Thread | None = None
        self._fatal: BaseException | None = None
        self._closing = False
        self._since = 0.0
        # the series exists from the start (0 = nothing held) for dashboards and alerts
        metrics.REDIS_HELD_PUSHES.labels(str(worker_index)).set(len(restored))
        if restored:
            stats.add(Counter({"restored": len(restored)}))
            stats.set_held(worker_index, len(restored))
            log.warning("push sink worker %d: %d held push(es) from the spool to deliver",
                        worker_index, len(restored))
            with self._cond:
                self._since = time.monotonic()
                self._start_retry(wait_first=False)

    # -- delivery --------------------------------------------------------------------

    def _append(self, pushes: Sequence[Push]) -> list[bool]:
        """Run the append script for ``pushes``; whether each one was appended now."""
        cfg = self._cfg
        cluster = isinstance(self._client, RedisCluster)
        by_slot: dict[int, list[int]] = {}
        keys_of: list[str] = []
        for i, p in enumerate(pushes):
            key = stream_key(p.channel, cfg.prefix)
            keys_of.append(key)
            by_slot.setdefault(key_slot(key.encode()) if cluster else 0, []).append(i)
        head: list[EncodableT] = [cfg.marker_ttl_s * 1000, cfg.stream_maxlen,
                                  "~" if cfg.approximate_trim else "=",
                                  1 if cfg.publish else 0, cfg.stream_ttl_s or 0]
        parts: list[list[int]] = []
        calls: list[list[EncodableT]] = []
        for idx in by_slot.values():
            for start in range(0, len(idx), _APPEND_CHUNK):
                part = idx[start : start + _APPEND_CHUNK]
                keys: list[EncodableT] = []
                data: list[EncodableT] = []
                for i in part:
                    keys += [keys_of[i], marker_key(keys_of[i], pushes[i].push_id,
                                                    cfg.marker_prefix)]
                    data.append(json_dumps(pushes[i].to_dict()))
                parts.append(part)
                calls.append([len(keys), *keys, *head, *data])
        replies = run_scripts(self._client, _APPEND_LUA, _APPEND_SHA, calls)
        written = [False] * len(pushes)
        for part, reply in zip(parts, replies, strict=True):
            for i, flag in zip(part, reply, strict=True):
                written[i] = int(flag) == 1
        return written

    def _deliver(self, pushes: Sequence[Push]) -> None:
        """Guard, then append, ``pushes``; counts only once everything succeeded.

        Raises what Redis raised; running it again for the same pushes is safe.
        """
        counts: Counter[str] = Counter()
        candidates: Sequence[Push] = pushes
        if self._guard is not None:
            requests = [GuardRequest.for_push(p) for p in pushes]
            t0 = time.perf_counter()
            decisions = self._guard.admit(requests)
            if self._guard_rtt is not None:
                self._guard_rtt.observe(time.perf_counter() - t0)
            # "duplicate" too: admitted earlier but maybe never appended (the marker decides)
            candidates = [p for p, d in zip(pushes, decisions, strict=True)
                          if d in {"ok", "duplicate"}]
            counts.update(d for d in decisions if d in {"cap", "once"})
        if candidates:
            t0 = time.perf_counter()
            written = self._append(candidates)
            _WRITE_RTT.observe(time.perf_counter() - t0)
            # event -> push latency: delivered (in Redis) now, triggered at event_ts
            now_s = time.time()
            for p, w in zip(candidates, written, strict=True):
                if w:
                    metrics.observe_push_latency(p.rule_id, now_s - p.event_ts / 1000)
                    counts["written"] += 1
                else:
                    counts["duplicate"] += 1
        self._stats.add(counts)
        for outcome, n in counts.items():
            metrics.PUSH_SINK.labels(outcome).inc(n)

    def _error(self, exc: BaseException, first: bool) -> None:
        self._stats.add(Counter({"redis_errors": 1}))
        _UNAVAILABLE.inc()
        if first:
            log.warning("push sink worker %d: Redis unreachable (%s: %s): holding pushes "
                        "(at most %d), retrying every %.1f s", self._worker,
                        type(exc).__name__, exc, self._cfg.max_held_effects,
                        self._cfg.retry_interval_s)

    # -- the hold --------------------------------------------------------------------

    def _start_retry(self, *, wait_first: bool) -> None:
        """Start the retry thread if it is not running (caller holds the lock)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._retry_loop, args=(wait_first,), daemon=True,
                name=f"touchstream-push-retry-{self._worker}")
            self._thread.start()

    def _retry_loop(self, wait_first: bool) -> None:
        wait = wait_first
        while True:
            with self._cond:
                if wait:
                    self._cond.wait(self._cfg.retry_interval_s)
                if not self._held or self._fatal is not None or self._closing:
                    self._thread = None
                    self._cond.notify_all()
                    return
                chunk = [self._held[i] for i in range(min(_DRAIN_CHUNK, len(self._held)))]
            try:
                self._deliver(chunk)
                with self._cond:
                    for _ in chunk:
                        self._held.popleft()
                    if self._spool is not None:
                        self._spool.rewrite(self._held)
                    left = len(self._held)
                    self._stats.set_held(self._worker, left)
                    self._cond.notify_all()
            except BaseException as exc:
                # an outage: retry later; wrong credentials or ACL (MISCONFIGURED) and
                # anything else: the next write_batch raises it
                if isinstance(exc, UNAVAILABLE) and not isinstance(exc, MISCONFIGURED):
                    self._error(exc, first=False)
                    wait = True
                    continue
                with self._cond:
                    self._fatal = exc
                    self._thread = None
                    self._cond.notify_all()
                log.error("push sink worker %d: delivering held pushes failed: %s",
                          self._worker, type(exc).__name__)
                return
            wait = False
            if not left:
                log.warning("push sink worker %d: every held push delivered (%.1f s after "
                            "the first failure)", self._worker, time.monotonic() - self._since)

    def _hold(self, items: list[Push]) -> None:
        """Hold ``items`` behind what is held; wait for room when the hold is full."""
        cap = self._cfg.max_held_effects
        pending = items
        waited_since: float | None = None
        mark = 0.0  # the end of the back-pressure wait counted so far
        with self._cond:
            while True:
                if self._fatal is not None:
                    raise RuntimeError("delivering held pushes failed") from self._fatal
                room = cap - len(self._held)
                if room > 0 and pending:
                    take, pending = pending[:room], pending[room:]
                    if self._spool is not None:
                        self._spool.append(take)
                    self._held.extend(take)
                    self._stats.add(Counter({"held_total": len(take)}))
                    self._stats.set_held(self._worker, len(self._held))
                self._start_retry(wait_first=True)
                if not pending:
                    break
                if waited_since is None:
                    waited_since = mark = time.monotonic()
                    self._stats.add(Counter({"backpressure": 1}))
                    log.warning("push sink worker %d: %d pushes held, the limit: waiting "
                                "for Redis (back-pressure)", self._worker, len(self._held))
                self._cond.wait(self._cfg.retry_interval_s)
                # moved per wait (one retry interval), so it rises during a long outage
                now = time.monotonic()
                metrics.PUSH_SINK_BACKPRESSURE.inc(now - mark)
                mark = now
        if waited_since is not None:
            ms = int((time.monotonic() - waited_since) * 1000)
            self._stats.add(Counter({"backpressure_ms": ms}))

    def write_batch(self, items: list[Push]) -> None:
        """Deliver ``items``; while Redis is unreachable, hold them (see the module)."""
        if not items:
            return
        with self._cond:
            if self._fatal is not None:
                raise RuntimeError("delivering held pushes failed") from self._fatal
            holding = bool(self._held)
        if not holding:
            # nothing held, so the retry thread is not delivering: order is kept
            try:
                self._deliver(items)
                return
            except MISCONFIGURED:
                raise
            except UNAVAILABLE as exc:
                self._since = time.monotonic()
                self._error(exc, first=True)
        self._hold(items)

    def close(self) -> None:
        """Keep trying for ``close_timeout_s``; what is still held stays in the spool."""
        deadline = time.monotonic() + self._cfg.close_timeout_s
        with self._cond:
            while self._held and self._fatal is None and self._thread is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._closing = True  # the retry thread stops after its current attempt
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=max(10.0, self._cfg.close_timeout_s))
        with self._cond:
            left_held = len(self._held)
        if left_held:
            if self._spool is not None:
                log.warning("push sink worker %d: closing with %d held push(es) in %s; "
                            "they are delivered at the next start", self._worker,
                            left_held, self._spool.path)
            else:
                self._stats.add(Counter({"lost": left_held}))
                metrics.PUSH_SINK.labels("lost").inc(left_held)
                log.error("push sink worker %d: closing with %d held push(es) and no "
                          "spool_dir: they are lost", self._worker, left_held)
        if self._spool is not None:
            self._spool.close()
        with contextlib.suppress(Exception):
            self._client.close()


class RedisPushOutput(DynamicSink[Push]):
    """Write :class:`flows.model.Push` items to Redis streams (and pub/sub).

    Every worker makes its own client in :meth:`build`. ``guard`` is a shared
    :class:`state.guards.GuardStore`, or a factory such as
    ``state.redis_store.RedisGuardStore`` called with the worker's client.
    ``client_factory`` makes each worker's client (for instance
    ``lambda: make_client(settings.redis)``, with the AUTH and TLS options of the
    settings); by default ``connect(config.url, cluster=config.cluster)``. See the
    module for exactly-once delivery and what happens while Redis is unreachable.
    """

    def __init__(self, config: RedisPushConfig, guard: GuardSpec = None, *,
                 client_factory: Callable[[], RedisClient] | None = None) -> None:
        self.config = config
        self._guard = guard
        self._client_factory = client_factory
        self._stats = _Stats()

    def stats(self) -> dict[str, int]:
        """Counters that moved (``written``, ``duplicate``, ``redis_errors``, ...) and,
        once anything was held, the gauges ``held`` and ``held_max`` (see the module)."""
        return self._stats.snapshot()

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> _RedisPushPartition:
        client = (self._client_factory() if self._client_factory is not None
                  else connect(self.config.url, cluster=self.config.cluster))
        spec = self._guard
        guard: GuardStore | None
        if spec is None:
            guard = None
        elif isinstance(spec, type) or not isinstance(spec, GuardStore):
            # a factory (a store class has ``admit`` too, so test for classes first)
            guard = spec(client)
        else:
            guard = spec
        spool: _Spool | None = None
        restored: list[Push] = []
        if self.config.spool_dir is not None:
            spool, restored = _restore(Path(self.config.spool_dir), worker_index,
                                       worker_count)
        return _RedisPushPartition(self.config, client, guard, self._stats,
                                   worker_index=worker_index, spool=spool,
                                   restored=restored)


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """The (id, fields) entries of a one-stream XREAD reply, RESP2 or RESP3 shape."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {key: [[(id, fields), ...]]}
        (entries,) = reply.values()
        if entries and isinstance(entries[0], list):
            entries = entries[0]
    else:  # RESP2: [[key, [(id, fields), ...]]]
        ((_, entries),) = reply
    return list(entries)


def read_channel(
    client: RedisClient,
    channel: str,
    last_id: str = "0-0",
    count: int = 100,
    block_ms: int | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
) -> list[tuple[str, dict[str, Any]]]:
    """Pushes on ``channel`` after ``last_id``, oldest first, at most ``count``.

    A terminal keeps the last id it got and passes it back after a reconnect, so it
    reads what it missed with no loss and no repeat (as long as the stream still
    holds it: see ``stream_maxlen``/``stream_ttl_s``). ``block_ms`` waits for new
    pushes when there are none (``None`` = do not wait). An entry that is not a push
    document is skipped.
    """
    reply = client.xread({stream_key(channel, prefix): last_id}, count=count, block=block_ms)
    out: list[tuple[str, dict[str, Any]]] = []
    for entry_id, fields in _entries(reply):
        sid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        data = fields.get(b"data", fields.get("data"))
        if data is None:
            continue
        try:
            doc = json_loads(data)
        except DecodeError:
            continue
        if isinstance(doc, dict):
            out.append((sid, doc))
    return out
