"""The engine's Prometheus metrics: every metric object, defined once (default registry).

Nothing here runs per event. Event, dead-letter, push, blocked-push and alert counters
are derived from what the stats step already aggregates (:class:`flows.engine.StatDelta`
per shard and per stats interval, dead-letter reasons per batch): see
:func:`count_stat_delta` and :func:`count_dead_letters`, called by the stats shim in
``flows/experience.py``. So they move when a shard hands over its delta (every
``engine.stats_interval_s`` live, at end of input in a replay), not on each event, and
in a cluster only the process whose worker owns the stats key reports them (sum over
processes in PromQL).

The fault-handling metrics (Redis outages, Kafka client errors and offset resets)
move per batch, per failed attempt or per retry interval, never per event.

Label values are bounded: event types, dead-letter reasons, rule ids, guard names,
alert types, webhook target indexes, Redis operation names, worker indexes, Kafka
topic/partition, librdkafka error names. Never customer, terminal or hall ids.

:func:`start_metrics_server` serves ``/metrics`` over HTTP (``engine.metrics_port``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = [
    "ALERTS",
    "CONVERSIONS",
    "DEAD_LETTERS",
    "EVENTS",
    "KAFKA_CLIENT_ERRORS",
    "KAFKA_CONSUMER_LAG",
    "KAFKA_OFFSET_RESETS",
    "KAFKA_OUTPUT_DUPLICATE_ACKS",
    "LATENCY_BUCKETS_S",
    "OPS_FEED_DROPPED",
    "PROFILE_DEGRADED_READS",
    "PUSHES",
    "PUSHES_BLOCKED",
    "PUSH_LATENCY",
    "PUSH_SINK",
    "PUSH_SINK_BACKPRESSURE",
    "REDIS_HELD_PUSHES",
    "REDIS_RTT",
    "REDIS_UNAVAILABLE",
    "RULES_ACTIVE_VERSION",
    "RULES_CHANGES",
    "WEBHOOK_FAILURES",
    "WEBHOOK_OUTBOX_PENDING",
    "WEBHOOK_RETRIES",
    "WEBHOOK_SENT",
    "MetricsServer",
    "count_dead_letters",
    "count_stat_delta",
    "observe_push_latency",
    "start_metrics_server",
]

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
"""Event → push latency buckets (seconds): 250 ms is a bucket edge, for the p99 alert."""

RTT_BUCKETS_S: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                        1.0, 2.5)

# --- from the stats step (per StatDelta / per batch of dead letters) ------------------

EVENTS = Counter(
    "touchstream_events", "Events applied by the engine, by type (counted per stats delta)",
    ["type"],
)
DEAD_LETTERS = Counter(
    "touchstream_dead_letters", "Input records dead-lettered, by reason", ["reason"],
)
PUSHES = Counter(
    "touchstream_pushes", "Pushes emitted by the engine, by rule", ["rule"],
)
PUSHES_BLOCKED = Counter(
    "touchstream_pushes_blocked",
    "Pushes a rule triggered but a guard of the engine blocked, by rule and guard "
    "(once_per, opt_out, cap; when: the rule's CEL condition was false; when_error: it "
    "could not be evaluated, which counts as false)",
    ["rule", "guard"],
)
ALERTS = Counter(
    "touchstream_alerts", "Alerts emitted by the engine, by alert type", ["type"],
)
CONVERSIONS = Counter(
    "touchstream_conversions", "Pushes converted (an order of the pushed module within the "
    "conversion window), by rule", ["rule"],
)

# --- delivery ------------------------------------------------------------------------

PUSH_LATENCY = Histogram(
    "touchstream_push_latency_seconds",
    "Event -> push latency per rule: wall clock when the Redis push sink's pipeline has "
    "executed minus the push's event_ts (the triggering event's time, i.e. the producer's "
    "clock, so it includes producer-to-engine clock skew; for a dwell timer, its due "
    "time). Negative values (producer clock ahead) count as 0",
    ["rule"],
    buckets=LATENCY_BUCKETS_S,
)
PUSH_SINK = Counter(
    "touchstream_push_sink_pushes",
    "Pushes reaching the Redis push sink, by outcome: written, the shared guard "
    "store's decision (duplicate, cap, once) when it refused them, or lost (still held "
    "for an unreachable Redis when the sink closed, with no spool_dir to keep them)",
    ["outcome"],
)
REDIS_RTT = Histogram(
    "touchstream_redis_rtt_seconds",
    "Redis round trips, by operation: push_write (the push sink's pipeline), push_guard "
    "(the shared guard store's admit), profile_get (profile prefetch pipeline)",
    ["op"],
    buckets=RTT_BUCKETS_S,
)
WEBHOOK_SENT = Counter(
    "touchstream_webhook_sent",
    "Alerts delivered to a webhook target (a 2xx answer), by target (its index in the "
    "configured webhooks; the webhook_url shorthand comes last)",
    ["target"],
)
WEBHOOK_RETRIES = Counter(
    "touchstream_webhook_retries", "Webhook retry attempts, by target", ["target"],
)
WEBHOOK_FAILURES = Counter(
    "touchstream_webhook_failures",
    "Alerts a webhook target did not get (sent to the dead-letter path), by target and "
    "reason (rejected, retries_exhausted, retry_budget_exhausted, encode_error, error, "
    "target_removed; queue_full and shutdown only without an outbox)",
    ["target", "reason"],
)
RULES_CHANGES = Counter(
    "touchstream_rules_changes",
    "Rule changes decided by the control source, by outcome (accepted, rejected)",
    ["outcome"],
)
RULES_ACTIVE_VERSION = Gauge(
    "touchstream_rules_active_version", "Version of the rule set the control source accepted last",
)
WEBHOOK_OUTBOX_PENDING = Gauge(
    "touchstream_webhook_outbox_pending",
    "Alerts journaled in the webhook outbox and not yet delivered or dead-lettered, per worker",
    ["worker"],
)

# --- Redis outages (connectors/redis_push.py, connectors/ops_feed.py, state/redis_store.py)

REDIS_UNAVAILABLE = Counter(
    "touchstream_redis_unavailable",
    "Redis calls that failed because Redis was unreachable (connection refused or "
    "reset, timeout, cluster down, ...), by op: push (a push sink write or retry of "
    "held pushes), profiles (a profile read, or a probe while they are down), ops_feed "
    "(an ops feed write, or a probe while it is down). Moves per failed attempt (at "
    "most once per retry interval while down), never per event",
    ["op"],
)
REDIS_HELD_PUSHES = Gauge(
    "touchstream_redis_held_pushes",
    "Pushes the Redis push sink holds for an unreachable Redis (delivered in order "
    "once it answers), per worker; at most redis.max_held_effects",
    ["worker"],
)
PUSH_SINK_BACKPRESSURE = Counter(
    "touchstream_push_sink_backpressure_seconds",
    "Seconds the Redis push sink made the flow wait because its hold was full (Redis "
    "unreachable for a while): back-pressure instead of dropping pushes. Moves while "
    "the wait lasts (every retry interval)",
)
PROFILE_DEGRADED_READS = Counter(
    "touchstream_profile_degraded_reads",
    "Profile reads while Redis was unreachable, by outcome: stale (a profile served "
    "from its last known copy, counted per profile) or wait (a batch read that waited "
    "for Redis because some of its customers were never read before, counted per "
    "read)",
    ["outcome"],
)
OPS_FEED_DROPPED = Counter(
    "touchstream_ops_feed_dropped",
    "Ops feed items skipped while Redis was unreachable (a dashboard view: the pushes "
    "and alerts themselves are still delivered), by kind (push, alert, stats)",
    ["kind"],
)

# --- Kafka (connectors/kafka.py) -------------------------------------------------------

KAFKA_CONSUMER_LAG = Gauge(
    "touchstream_kafka_consumer_lag",
    "Messages not yet read, per input partition: the consumer's cached high watermark "
    "(from Fetch responses, no extra request) minus the next offset to read, updated at "
    "most every few seconds, clamped at 0. The cached value is exact, on Tansu 0.6.0 "
    "too (only a ListOffsets query answers the last batch's base offset + 1 there)",
    ["topic", "partition"],
)
KAFKA_CLIENT_ERRORS = Counter(
    "touchstream_kafka_client_errors",
    "Errors the Kafka clients reported, by client (consumer, producer) and librdkafka "
    "error name (e.g. _TRANSPORT, _ALL_BROKERS_DOWN while a broker is down; librdkafka "
    "retries those by itself)",
    ["client", "error"],
)
KAFKA_OUTPUT_DUPLICATE_ACKS = Counter(
    "touchstream_kafka_output_duplicate_acks",
    "Batches of the Kafka output the broker acknowledged as duplicates of an earlier write "
    "(librdkafka: DUPLICATE_SEQUENCE_NUMBER to a retry, counted as delivered, without "
    "offsets), by topic. Normal after a lost answer on a broker that kept the batch; Tansu "
    "0.6.0 on S3 storage killed mid-write answers so without having kept it",
    ["topic"],
)
KAFKA_OFFSET_RESETS = Counter(
    "touchstream_kafka_offset_resets",
    "Input partitions moved because their position was outside the broker's log (the "
    "broker lost data, the topic was recreated, or retention deleted unread records), "
    "by topic, partition and policy (earliest, latest, fail)",
    ["topic", "partition", "policy"],
)


def count_stat_delta(counts: Mapping[tuple[str, ...], int]) -> None:
    """Move the event, push, blocked, alert and conversion counters by one stats delta.

    Called by the stats step for each :class:`flows.engine.StatDelta`: a few dozen keys,
    once per shard per stats interval. Which counter (if any) a stats key moves is
    looked up once per key and cached (the stats step keeps every key anyway).
    """
    children = _children
    for key, n in counts.items():
        child = children.get(key, _UNSEEN)
        if child is _UNSEEN:
            child = children[key] = _child_for(key)
        if child is not None and n > 0:
            child.inc(n)


_UNSEEN: Final = object()
_children: dict[tuple[str, ...], Any] = {}


def _child_for(key: tuple[str, ...]) -> Counter | None:
    kind = key[0]
    if kind == "events" and len(key) == 2:
        return EVENTS.labels(key[1])
    if kind == "alerts" and len(key) == 2:
        return ALERTS.labels(key[1])
    if kind == "rule" and len(key) == 3:
        what = key[2]
        if what == "pushes":
            return PUSHES.labels(key[1])
        if what.startswith("blocked:"):
            return PUSHES_BLOCKED.labels(key[1], what[8:])
        if what == "conversions":
            return CONVERSIONS.labels(key[1])
    return None


def count_dead_letters(reasons: Mapping[str, int]) -> None:
    """Move the dead-letter counter by one batch's reasons."""
    for reason, n in reasons.items():
        DEAD_LETTERS.labels(reason).inc(n)


_latency_by_rule: dict[str, Histogram] = {}


def observe_push_latency(rule_id: str, latency_s: float) -> None:
    """Record one delivered push's event → push latency (clamped at 0)."""
    h = _latency_by_rule.get(rule_id)
    if h is None:
        h = _latency_by_rule[rule_id] = PUSH_LATENCY.labels(rule_id)
    h.observe(latency_s if latency_s > 0 else 0.0)


# --- exposure ------------------------------------------------------------------------


@dataclass
class MetricsServer:
    """The ``/metrics`` HTTP server of this process (a daemon thread)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The port it listens on (the real one when asked for 0)."""
        return int(self.server.server_address[1])

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def metrics_port_for(port: int, process_id: int | None) -> int:
    """This process's port: ``port + process_id`` in a cluster, 0 stays 0 (a free port)."""
    return port + (process_id or 0) if port else 0


def start_metrics_server(port: int, process_id: int | None = None,
                         addr: str = "0.0.0.0") -> MetricsServer:  # noqa: S104
    """Serve the default registry on ``port`` (+ ``process_id``; 0 = a free port, logged)."""
    httpd, thread = start_http_server(metrics_port_for(port, process_id), addr)
    server = MetricsServer(httpd, thread)
    log.info("metrics on http://%s:%d/metrics", addr, server.port)
    return server
