"""The operations feed in Redis: what the gateway's ``/ops`` console reads.

One Bytewax sink, :class:`OpsFeedOutput`, goes on the pushes, alerts and stats outputs
(it tells the three apart by type) and writes, in one pipeline per batch:

* a stats document: ``SET ops:stats <JSON>`` (the latest) and
  ``XADD ops:stats:history MAXLEN ~ 720 * at <wall ms> data <JSON>`` (an hour at the
  default 5 s interval); dead letters by reason are in it (``dead_letters``);
* an alert: ``XADD ops:alerts MAXLEN ~ 1000 * data <CloudEvents JSON>``;
* a push: ``XADD ops:pushes MAXLEN ~ 10000 * data <summary JSON>``, the summary
  without personal data (:func:`push_summary`: rule, version, module, kind, channel
  kind, hall when the push knows it, event time, when this sink saw it and the
  difference, the event-to-push latency);
* after each batch: ``PUBLISH ops:events <pushes|alerts|stats>``, a wake-up for
  consoles (they read the streams, never the message).

:func:`write_rules` puts the active rule set (id, version, per rule its trigger kind
and parameters, push, alert, once-per) in ``ops:rules`` when the engine starts.

Every command names one key, so the pipeline also works on a Redis Cluster client.
The alert documents keep the customer ids they carry (operations may need them); the
console masks them before they reach a browser.

**While Redis is unreachable** the feed is skipped, never held and never raised: the
batch that met the connection error and every batch after it are dropped (counted by
kind in :meth:`OpsFeedOutput.stats`: ``dropped_pushes``, ``dropped_alerts``,
``dropped_stats``; in Prometheus ``touchstream_ops_feed_dropped_total{kind}`` and
``touchstream_redis_unavailable_total{op="ops_feed"}``) without calling Redis, until a
background ``PING`` every ``retry_interval_s`` gets an answer
(:class:`state.redis_store.RedisHealth`). The ops
feed is a dashboard view: consoles miss the pushes and alerts of the outage (they are
delivered to terminals and on-call through the push sink, Kafka and webhooks, which do
not drop them) and show the next stats document once Redis is back. If the connection
drops in the middle of a pipeline, redis-py sends it again: an entry of the feed may
then appear twice (the feed carries no idempotency keys; the push streams do).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from flows.codec import json_dumps
from flows.metrics import OPS_FEED_DROPPED
from flows.model import Alert, Push
from flows.rules import RuleSet
from flows.settings import RedisSettings
from state.redis_store import MISCONFIGURED, UNAVAILABLE, RedisClient, RedisHealth, connect

__all__ = ["OpsFeedConfig", "OpsFeedOutput", "push_summary", "rules_summary", "write_rules"]

DEFAULT_PREFIX = "ops:"

# the feed's item kinds (its stats keys) -> the kind label of touchstream_ops_feed_dropped
_DROPPED: Final = {"pushes": OPS_FEED_DROPPED.labels("push"),
                   "alerts": OPS_FEED_DROPPED.labels("alert"),
                   "stats": OPS_FEED_DROPPED.labels("stats")}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class OpsFeedConfig:
    """Where the ops feed goes and how long its streams are (``MAXLEN ~``)."""

    url: str = field(repr=False)  # may hold a password
    prefix: str = DEFAULT_PREFIX
    stats_history_maxlen: int = 720
    alerts_maxlen: int = 1000
    pushes_maxlen: int = 10_000
    publish: bool = True
    cluster: bool = False
    retry_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if min(self.stats_history_maxlen, self.alerts_maxlen, self.pushes_maxlen) < 1:
            raise ValueError("stream lengths must be at least 1")
        if self.retry_interval_s <= 0:
            raise ValueError("retry_interval_s must be positive")

    @classmethod
    def from_settings(cls, settings: RedisSettings, **overrides: Any) -> OpsFeedConfig:
        """The config from the ``redis`` settings section (which must have a url)."""
        if settings.url is None:
            raise ValueError("redis.url is not set")
        kwargs: dict[str, Any] = {"url": settings.url.get_secret_value(),
                                  "cluster": settings.cluster,
                                  "retry_interval_s": settings.retry_interval_s}
        return cls(**(kwargs | overrides))

    def key(self, name: str) -> str:
        """``ops:<name>`` with this prefix."""
        return self.prefix + name


def push_summary(p: Push, now_ms: int) -> dict[str, Any]:
    """What the feed keeps of a push: no customer id, no terminal id, no evidence."""
    hall = p.reason.get("hall_id")
    return {
        "rule_id": p.rule_id,
        "rule_version": p.rule_version,
        "module": p.content.get("module"),
        "kind": p.content.get("kind"),
        "channel_kind": p.channel.partition(":")[0],
        "hall": hall if isinstance(hall, str) else None,
        "event_ts": p.event_ts,
        "delivered_at": now_ms,
        "latency_ms": now_ms - p.event_ts,
    }


def _duration(ms: int) -> str:
    """``86400000`` -> ``24h``, ``604800000`` -> ``7d`` (days from two days on)."""
    for unit, n in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= n * (2 if unit == "d" else 1) and ms % n == 0:
            return f"{ms // n}{unit}"
    return f"{ms}ms"


def rules_summary(rules: RuleSet, now_ms: int | None = None) -> dict[str, Any]:
    """The ``ops:rules`` document of a rule set."""
    out: list[dict[str, Any]] = []
    for r in rules.rules:
        trigger = r.trigger.model_dump() if hasattr(r.trigger, "model_dump") else {}
        out.append({
            "id": r.id,
            "version": r.version,
            "trigger": trigger,
            "push": None if r.push is None else {"kind": r.push.kind, "module": r.push.module},
            "alert": None if r.alert is None else r.alert.type,
            "once_per": r.once_scope if r.once_scope != "period" else _duration(r.once_ms),
            "description": r.description,
            "when": r.when.source if r.when else None,
        })
    g = rules.guards
    return {
        "version": rules.version,
        "source": rules.source,
        "loaded_at": _now_ms() if now_ms is None else now_ms,
        "timezone": rules.timezone,
        "guards": {"max_pushes_per_customer": g.max_pushes_per_customer,
                   "cap_window_s": g.cap_window_ms // 1000,
                   "respect_opt_out": g.respect_opt_out},
        "rules": out,
    }


def write_rules(client: RedisClient, rules: RuleSet, prefix: str = DEFAULT_PREFIX,
                *, publish: bool = True) -> None:
    """Write the active rule set to ``ops:rules`` (and announce it on ``ops:events``)."""
    client.set(prefix + "rules", json_dumps(rules_summary(rules)))
    if publish:
        client.publish(prefix + "events", b"rules")


class _FeedStats:
    """Counts shared by all partitions of one feed sink (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, counts: Counter[str]) -> None:
        with self._lock:
            self._counts.update(counts)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in self._counts.items() if v}


class _OpsFeedPartition(StatelessSinkPartition[Any]):
    def __init__(self, config: OpsFeedConfig, client: RedisClient,
                 now_ms: Callable[[], int], stats: _FeedStats | None = None) -> None:
        self._cfg = config
        self._client = client
        self._now = now_ms
        self._stats = stats or _FeedStats()
        self._health = RedisHealth(client, config.retry_interval_s, name="ops-feed",
                                   op="ops_feed")

    def write_batch(self, items: list[Any]) -> None:
        if not items:
            return
        cfg = self._cfg
        now = self._now()
        pipe = self._client.pipeline(transaction=False)
        kinds: Counter[str] = Counter()
        for item in items:
            if isinstance(item, Push):
                pipe.xadd(cfg.key("pushes"), {"data": json_dumps(push_summary(item, now))},
                          maxlen=cfg.pushes_maxlen, approximate=True)
                kinds["pushes"] += 1
            elif isinstance(item, Alert):
                pipe.xadd(cfg.key("alerts"), {"data": json_dumps(item.to_cloudevent())},
                          maxlen=cfg.alerts_maxlen, approximate=True)
                kinds["alerts"] += 1
            elif isinstance(item, dict):
                data = json_dumps(item)
                pipe.set(cfg.key("stats"), data)
                pipe.xadd(cfg.key("stats:history"), {"at": str(now), "data": data},
                          maxlen=cfg.stats_history_maxlen, approximate=True)
                kinds["stats"] += 1
        if not kinds:
            return
        if self._health.up:
            if cfg.publish:  # not pipe.publish: redis-py blocks it in cluster pipelines
                for kind in kinds:
                    pipe.execute_command("PUBLISH", cfg.key("events"), kind)
            try:
                pipe.execute()
            except MISCONFIGURED:
                raise
            except UNAVAILABLE as exc:
                self._health.mark_down(exc)
                self._stats.add(Counter({"redis_errors": 1}))
            else:
                self._stats.add(Counter({"written": sum(kinds.values())}))
                return
        self._stats.add(Counter({f"dropped_{kind}": n for kind, n in kinds.items()}))
        for kind, n in kinds.items():  # per batch, at most three kinds
            _DROPPED[kind].inc(n)

    def close(self) -> None:
        self._health.close()
        self._client.close()


class OpsFeedOutput(DynamicSink[Any]):
    """Write pushes (summaries), alerts and stats documents to the ops feed.

    The same instance may go on the pushes, alerts and stats outputs; every worker
    makes its own client in :meth:`build` (with ``client_factory`` if given, e.g.
    ``lambda: make_client(settings.redis)``). Items of any other type are ignored.
    While Redis is unreachable the feed is skipped and counted (see the module).
    """

    def __init__(self, config: OpsFeedConfig, now_ms: Callable[[], int] | None = None, *,
                 client_factory: Callable[[], RedisClient] | None = None) -> None:
        self.config = config
        self._now = now_ms or _now_ms
        self._client_factory = client_factory
        self._stats = _FeedStats()

    def stats(self) -> dict[str, int]:
        """Counters that moved: ``written`` (items), ``dropped_<kind>`` (items skipped
        while Redis was unreachable), ``redis_errors`` (failed batches)."""
        return self._stats.snapshot()

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _OpsFeedPartition:
        client = (self._client_factory() if self._client_factory is not None
                  else connect(self.config.url, cluster=self.config.cluster))
        return _OpsFeedPartition(self.config, client, self._now, self._stats)
