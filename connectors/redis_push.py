"""Push channels in Redis: a Bytewax sink that writes them and a reader for terminals.

Each push goes to its channel (``terminal:T1``, ``customer:C1``, ...) two ways, in
one pipeline per batch:

* ``XADD push:<channel> MAXLEN ~ <stream_maxlen> * data <push JSON>`` -- the stream a
  terminal that was offline reads from its last id with :func:`read_channel`; the
  stream gets ``EXPIRE push:<channel> <stream_ttl_s>`` after each batch that wrote it;
* ``PUBLISH push:<channel> <push JSON>`` -- for live listeners (if ``publish``).

The push JSON is ``flows.codec.json_dumps(push.to_dict())`` (outside clients read it;
the push's internal ``guard`` is not in it).

With a guard store the sink first admits the batch (one request per push:
:meth:`state.guards.GuardRequest.for_push`, its ``push_id`` at its event time plus the
once-per key and per-customer cap its ``guard`` carries) and writes only the admitted
pushes. So a push replayed after a restart is not appended twice, and workers or
processes sharing one guard store (a shared Redis) never exceed a customer's cap nor
repeat a once-per push, even when their flow states disagree. Note the order: admit,
then write. A crash between the two loses those pushes rather than duplicating them.

With ``cluster`` the sink uses redis-py's cluster client: every command of a batch
names one key (``XADD``/``EXPIRE`` a stream, ``PUBLISH`` a channel, which Redis Cluster
forwards to every node), so the pipeline is split by slot without any cross-slot
operation.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from flows import metrics
from flows.codec import DecodeError, json_dumps, json_loads
from flows.model import Push
from flows.settings import RedisSettings
from state.guards import GuardRequest, GuardStore
from state.redis_store import RedisClient, RedisGuardStore, connect

__all__ = ["GuardSpec", "RedisPushConfig", "RedisPushOutput", "read_channel", "stream_key"]

GuardSpec: TypeAlias = GuardStore | Callable[[RedisClient], GuardStore] | None
"""A guard store, or a factory called in ``build()`` with that worker's client."""

DEFAULT_PREFIX = "push:"

_WRITE_RTT = metrics.REDIS_RTT.labels("push_write")


def stream_key(channel: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The stream (and pub/sub channel) name of a push channel."""
    return prefix + channel


@dataclass(frozen=True, slots=True)
class RedisPushConfig:
    """Where and how pushes are written.

    ``stream_ttl_s`` None or 0 = streams never expire. ``approximate_trim`` uses
    ``MAXLEN ~`` (cheap; the stream may hold somewhat more than ``stream_maxlen``).
    ``cluster`` = ``url`` is a node of a Redis Cluster (redis-py's cluster client).
    """

    url: str = field(repr=False)  # may hold a password
    stream_maxlen: int = 1000
    stream_ttl_s: int | None = 7 * 24 * 3600
    publish: bool = True
    approximate_trim: bool = True
    prefix: str = DEFAULT_PREFIX
    cluster: bool = False

    def __post_init__(self) -> None:
        if self.stream_maxlen < 1:
            raise ValueError("stream_maxlen must be at least 1")

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
        }
        return cls(**(kwargs | overrides))


class _Stats:
    """Counts shared by all partitions of one sink (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, counts: Counter[str]) -> None:
        with self._lock:
            self._counts.update(counts)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class _RedisPushPartition(StatelessSinkPartition[Push]):
    def __init__(
        self,
        config: RedisPushConfig,
        client: RedisClient,
        guard: GuardStore | None,
        stats: _Stats,
    ) -> None:
        self._cfg = config
        self._client = client
        self._guard = guard
        self._stats = stats
        # only a shared Redis guard store is a round trip worth timing
        self._guard_rtt = (metrics.REDIS_RTT.labels("push_guard")
                           if isinstance(guard, RedisGuardStore) else None)

    def write_batch(self, items: list[Push]) -> None:
        if not items:
            return
        counts: Counter[str] = Counter()
        pushes: Sequence[Push] = items
        if self._guard is not None:
            requests = [GuardRequest.for_push(p) for p in items]
            t0 = time.perf_counter()
            decisions = self._guard.admit(requests)
            if self._guard_rtt is not None:
                self._guard_rtt.observe(time.perf_counter() - t0)
            pushes = [p for p, d in zip(items, decisions, strict=True) if d == "ok"]
            counts.update(d for d in decisions if d != "ok")
        if pushes:
            cfg = self._cfg
            pipe = self._client.pipeline(transaction=False)
            streams: dict[str, None] = {}
            for p in pushes:
                key = stream_key(p.channel, cfg.prefix)
                data = json_dumps(p.to_dict())
                pipe.xadd(
                    key, {"data": data}, maxlen=cfg.stream_maxlen,
                    approximate=cfg.approximate_trim,
                )
                if cfg.publish:  # not pipe.publish: redis-py blocks it in cluster pipelines
                    pipe.execute_command("PUBLISH", key, data)
                streams[key] = None
            if cfg.stream_ttl_s:
                for key in streams:
                    pipe.expire(key, cfg.stream_ttl_s)
            t0 = time.perf_counter()
            pipe.execute()
            _WRITE_RTT.observe(time.perf_counter() - t0)
            # event -> push latency: delivered (in Redis) now, triggered at event_ts
            now_s = time.time()
            for p in pushes:
                metrics.observe_push_latency(p.rule_id, now_s - p.event_ts / 1000)
            counts["written"] += len(pushes)
        self._stats.add(counts)
        for outcome, n in counts.items():
            metrics.PUSH_SINK.labels(outcome).inc(n)

    def close(self) -> None:
        self._client.close()


class RedisPushOutput(DynamicSink[Push]):
    """Write :class:`flows.model.Push` items to Redis streams (and pub/sub).

    Every worker makes its own client in :meth:`build`. ``guard`` is a shared
    :class:`state.guards.GuardStore`, or a factory such as
    ``state.redis_store.RedisGuardStore`` called with the worker's client.
    """

    def __init__(self, config: RedisPushConfig, guard: GuardSpec = None) -> None:
        self.config = config
        self._guard = guard
        self._stats = _Stats()

    def stats(self) -> dict[str, int]:
        """Pushes ``written`` and not written by guard decision (``duplicate``, ...)."""
        return self._stats.snapshot()

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> _RedisPushPartition:
        client = connect(self.config.url, cluster=self.config.cluster)
        spec = self._guard
        guard: GuardStore | None
        if spec is None:
            guard = None
        elif isinstance(spec, type) or not isinstance(spec, GuardStore):
            # a factory (a store class has ``admit`` too, so test for classes first)
            guard = spec(client)
        else:
            guard = spec
        return _RedisPushPartition(self.config, client, guard, self._stats)


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
