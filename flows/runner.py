"""Wiring: build the sources, sinks and stores that settings ask for, then run the flow."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.testing import cluster_main, run_main
from confluent_kafka import Producer

from connectors.console import ConsoleView
from connectors.demo import DemoSource, demo_profiles
from connectors.files import (
    JsonDocSink,
    JsonlSource,
    SortedJsonlSink,
    alert_row,
    dead_letter_row,
    push_row,
)
from connectors.kafka import KafkaInput, KafkaMessage, KafkaOutput
from connectors.mapped import MappedSink
from connectors.ops_feed import OpsFeedConfig, OpsFeedOutput, write_rules
from connectors.redis_push import RedisPushConfig, RedisPushOutput
from connectors.webhook import (
    DeadLetterHandler,
    JsonlDeadLetterFile,
    WebhookOutput,
    dead_letter_record,
)
from flows.codec import json_dumps
from flows.experience import Outputs, build_flow
from flows.metrics import MetricsServer, start_metrics_server
from flows.model import Alert, DeadLetter, Push, RawRecord
from flows.rules import RuleSet, load_default_rules, load_rules
from flows.settings import Settings
from state.profiles import InMemoryProfileStore, ProfileStore, read_profiles_jsonl
from state.redis_store import RedisClient, RedisGuardStore, RedisProfileStore, make_client

__all__ = ["all_topics", "load_rule_set", "replay", "run_dataflow", "run_live", "tune_gc"]

log = logging.getLogger(__name__)


def load_rule_set(settings: Settings) -> RuleSet:
    """The rules file from settings, or the shipped defaults."""
    return load_rules(settings.rules_file) if settings.rules_file else load_default_rules()


def run_dataflow(flow: Dataflow, workers: int, epoch_s: float, *,
                 addresses: Sequence[str] = (), process_id: int | None = None) -> None:
    """Run a dataflow with ``workers`` worker threads in this process.

    With ``addresses`` (``host:port`` of every process of a cluster, the same list in
    the same order on each), this process is process ``process_id`` of that cluster:
    Bytewax connects the processes, spreads input partitions and state keys over all
    ``len(addresses) * workers`` workers, and returns when the whole cluster is done.
    """
    interval = timedelta(seconds=epoch_s)
    if addresses:
        if process_id is None or not 0 <= process_id < len(addresses):
            raise ValueError(f"process_id {process_id} is not an index of the "
                             f"{len(addresses)} cluster addresses")
        log.info("process %d of %d (%s), %d worker(s) each", process_id, len(addresses),
                 addresses[process_id], workers)
        cluster_main(flow, list(addresses), process_id,  # type: ignore[no-untyped-call]
                     epoch_interval=interval, worker_count_per_proc=workers)
    elif workers <= 1:
        run_main(flow, epoch_interval=interval)  # type: ignore[no-untyped-call]
    else:
        cluster_main(flow, [], 0, epoch_interval=interval,  # type: ignore[no-untyped-call]
                     worker_count_per_proc=workers)


def replay(settings: Settings, events: Path) -> Path:
    """Replay a JSONL file in event time; write the four outputs to ``settings.out_dir``."""
    assert settings.out_dir is not None
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A sink partition that receives nothing is never built: start every file empty.
    for name in ("pushes.jsonl", "alerts.jsonl", "dead_letters.jsonl", "stats.json"):
        (out / name).write_bytes(b"")
    profiles = InMemoryProfileStore(
        read_profiles_jsonl(settings.profiles_file) if settings.profiles_file else ()
    )
    outputs = Outputs(
        pushes=[SortedJsonlSink(out / "pushes.jsonl", push_row)],
        alerts=[SortedJsonlSink(out / "alerts.jsonl", alert_row)],
        dead_letters=[SortedJsonlSink(out / "dead_letters.jsonl", dead_letter_row)],
        stats=[JsonDocSink(out / "stats.json")],
    )
    flow = build_flow(
        settings,
        source=JsonlSource(Path(events)),
        outputs=outputs,
        rules=load_rule_set(settings),
        profiles=profiles,
    )
    run_dataflow(flow, settings.engine.workers, settings.engine.epoch_interval_s)
    return out


# --- live wiring ------------------------------------------------------------------------


def push_message(topic: str) -> Callable[[Push], KafkaMessage]:
    """Push → ``exp.pushes`` message: key = customer id, idempotency key in a header."""

    def to_msg(p: Push) -> KafkaMessage:
        return KafkaMessage(topic, p.customer_id.encode(), json_dumps(p.to_dict()),
                            (("content-type", b"application/json"),
                             ("idempotency-key", p.push_id.encode())))

    return to_msg


def alert_message(topic: str) -> Callable[[Alert], KafkaMessage]:
    """Alert → ``ops.alerts``: key = subject (customer, or module/step), CloudEvents JSON."""

    def to_msg(a: Alert) -> KafkaMessage:
        return KafkaMessage(topic, a.subject.encode(), json_dumps(a.to_cloudevent()),
                            (("content-type", b"application/cloudevents+json"),
                             ("idempotency-key", a.id.encode())))

    return to_msg


def dead_letter_message(topic: str) -> Callable[[DeadLetter], KafkaMessage]:
    """Dead letter → ``exp.dead_letters`` with its reason in a header."""

    def to_msg(d: DeadLetter) -> KafkaMessage:
        return KafkaMessage(topic, None, json_dumps(d.to_dict()),
                            (("content-type", b"application/json"),
                             ("reason", d.reason.encode())))

    return to_msg


def stats_message(topic: str) -> Callable[[dict[str, Any]], KafkaMessage]:
    """Stats document → ``exp.stats``."""

    def to_msg(doc: dict[str, Any]) -> KafkaMessage:
        return KafkaMessage(topic, b"stats", json_dumps(doc),
                            (("content-type", b"application/json"),))

    return to_msg


class KafkaAlertDeadLetters:
    """Webhook dead-letter path to ``ops.alerts.dlq``: each undeliverable alert, flushed."""

    def __init__(self, brokers: str, topic: str, config: dict[str, Any]) -> None:
        self.brokers = brokers
        self.topic = topic
        self.config = config
        self._producer: Producer | None = None
        self._lock = threading.Lock()

    def __call__(self, alert: Alert, target_url: str, reason: str, last_status: int | None,
                 *, attempts: int = 0, error: str | None = None) -> None:
        """Produce the record and wait for the broker to take it."""
        body = dead_letter_record(alert, target_url, reason, last_status,
                                  attempts=attempts, error=error)
        with self._lock:
            if self._producer is None:
                self._producer = Producer({"bootstrap.servers": self.brokers, **self.config})
            self._producer.produce(self.topic, body, key=alert.subject.encode(),
                                   headers=[("idempotency-key", alert.id.encode())])
            left = self._producer.flush(10)
        if left:
            log.error("alert %s could not be written to %s either", alert.id, self.topic)


def kafka_input_topics(settings: Settings) -> dict[str, Literal["json", "msgpack"]]:
    """The three input topics with their wire formats."""
    k = settings.kafka
    return {t: k.formats.get(t, "json") for t in (k.clicks_topic, k.location_topic,
                                                   k.calls_topic)}


def all_topics(settings: Settings) -> dict[str, int]:
    """Every topic touchstream uses, with its partition count."""
    k = settings.kafka
    names = [k.clicks_topic, k.location_topic, k.calls_topic, k.pushes_topic, k.alerts_topic,
             k.alerts_dlq_topic, k.dead_letters_topic, k.stats_topic]
    return {n: k.partitions.get(n, k.default_partitions) for n in names}


def tune_gc(gen0_threshold: int) -> None:
    """Make Python's cyclic GC cheap for a long-running flow.

    Per-customer state is millions of small, long-lived containers that never form
    cycles; at the default threshold (700 allocations) the collector keeps walking
    them and costs about as much as the rules themselves. Everything alive at start
    (rules, loaded profiles, modules) is frozen out of collections, and generation 0
    is collected every ``gen0_threshold`` allocations instead. 0 leaves Python's
    defaults.
    """
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _g0, g1, g2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, g1, g2)


def run_live(settings: Settings, *, duration_s: float | None = None,
             console: ConsoleView | None = None,
             wrap_source: Callable[[Source[RawRecord]], Source[RawRecord]] | None = None,
             ) -> None:
    """Run live: Kafka or demo traffic in; console, Kafka, Redis and webhooks out.

    ``wrap_source`` (benchmarks) wraps the input source before the flow is built.
    """
    k = settings.kafka
    rules = load_rule_set(settings)
    outputs = Outputs()
    profiles: ProfileStore
    redis_client: RedisClient | None = None
    if settings.redis.url is not None:
        redis_client = make_client(settings.redis)
        profiles = RedisProfileStore(redis_client, settings.redis.profile_cache_ttl_s)
        outputs.pushes.append(
            RedisPushOutput(RedisPushConfig.from_settings(settings.redis), guard=RedisGuardStore)
        )
        # the ops feed for the gateway's /ops console (connectors/ops_feed.py)
        ops_feed = OpsFeedOutput(OpsFeedConfig.from_settings(settings.redis))
        for out_list in (outputs.pushes, outputs.alerts, outputs.stats):
            out_list.append(ops_feed)
        write_rules(redis_client, rules)
    else:
        profiles = InMemoryProfileStore(
            read_profiles_jsonl(settings.profiles_file) if settings.profiles_file else ()
        )
    source: Source[RawRecord]
    if k.brokers:
        source = KafkaInput(k.brokers, kafka_input_topics(settings), dict(k.config),
                            tail=k.start == "latest", eof_when_idle_s=k.eof_when_idle_s)
        out = KafkaOutput(k.brokers, dict(k.config))
        outputs.pushes.append(MappedSink(out, push_message(k.pushes_topic)))
        outputs.alerts.append(MappedSink(out, alert_message(k.alerts_topic)))
        outputs.dead_letters.append(MappedSink(out, dead_letter_message(k.dead_letters_topic)))
        outputs.stats.append(MappedSink(out, stats_message(k.stats_topic)))
    else:
        demo_store = profiles

        def on_round(rnd: int, start_ms: int) -> None:
            demo_store.put_many(demo_profiles(rnd, start_ms))

        source = DemoSource(seed=settings.demo_seed, rate=settings.demo_rate,
                            duration_s=duration_s, on_round=on_round)
    targets = settings.webhook_targets()
    if targets:
        dlq: DeadLetterHandler
        if k.brokers:
            dlq = KafkaAlertDeadLetters(k.brokers, k.alerts_dlq_topic, dict(k.config))
        else:
            dlq = JsonlDeadLetterFile(settings.alerts_dlq_file)
        outputs.alerts.append(WebhookOutput(targets, on_dead_letter=dlq))
    if console is not None:
        sinks = console.sinks()
        outputs.pushes.append(sinks["pushes"])
        outputs.alerts.append(sinks["alerts"])
        outputs.dead_letters.append(sinks["dead_letters"])
        outputs.stats.append(sinks["stats"])
    if wrap_source is not None:
        source = wrap_source(source)
    flow = build_flow(settings, source=source, outputs=outputs, rules=rules, profiles=profiles)
    es = settings.engine
    tune_gc(es.gc_threshold)
    metrics_server: MetricsServer | None = None
    try:
        if es.addresses and not k.brokers:
            # Demo traffic is one generator in one process, and the demo profiles it loads
            # live in that process's memory: shards on other processes would see none.
            raise ValueError("a multi-process cluster (engine.addresses) needs Kafka input")
        if es.metrics_port is not None:
            metrics_server = start_metrics_server(es.metrics_port, es.process_id)
        run_dataflow(flow, es.workers, es.epoch_interval_s, addresses=es.addresses,
                     process_id=es.process_id)
    finally:
        if metrics_server is not None:
            metrics_server.close()
        if redis_client is not None:
            redis_client.close()
