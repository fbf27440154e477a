"""Wiring: build the sources, sinks and stores that settings ask for, then run the flow."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import cluster_main, run_main
from confluent_kafka import Producer

from connectors import wrapped
from connectors.console import ConsoleView
from connectors.demo import DemoSource, demo_profiles
from connectors.files import (
    JsonDocSink,
    JsonlSource,
    SortedJsonlSink,
    alert_row,
    dead_letter_row,
    holdout_row,
    push_row,
)
from connectors.kafka import KafkaInput, KafkaMessage, KafkaOutput
from connectors.mapped import MappedSink
from connectors.ops_feed import OpsFeedConfig, OpsFeedOutput, write_rules
from connectors.redis_push import RedisPushConfig, RedisPushOutput
from connectors.rules_sources import (
    ControlSource,
    FileRules,
    InputEnd,
    KafkaRules,
    RedisRules,
    RulesBackend,
    end_with_input,
    status_message,
)
from connectors.webhook import (
    DeadLetterHandler,
    JsonlDeadLetterFile,
    WebhookOutput,
    dead_letter_record,
)
from connectors.wrapped import EpochGrid
from flows.codec import json_dumps
from flows.control import ActiveRules, RulesStatus, compile_update, parse_rules_text
from flows.experience import Outputs, build_flow
from flows.metrics import MetricsServer, start_metrics_server
from flows.model import Alert, DeadLetter, Push, RawRecord
from flows.rules import DEFAULT_RULES_RESOURCE, RuleSet, load_default_rules, load_rules
from flows.settings import Settings
from flows.shutdown import StopRequest, handle_stop_signals, stoppable
from state.guards import QuotaStore
from state.profiles import InMemoryProfileStore, ProfileStore, read_profiles_jsonl
from state.redis_store import (
    RedisClient,
    RedisGuardStore,
    RedisProfileStore,
    RedisQuotaStore,
    make_client,
)

__all__ = ["RecoveryDirError", "all_topics", "control_source", "load_rule_set",
           "load_rules_doc", "prepare_recovery", "recovery_dir", "replay", "run_dataflow",
           "run_live", "tune_gc"]

log = logging.getLogger(__name__)


def load_rule_set(settings: Settings) -> RuleSet:
    """The rules file from settings, or the shipped defaults."""
    return load_rules(settings.rules_file) if settings.rules_file else load_default_rules()


def load_rules_doc(settings: Settings) -> ActiveRules:
    """The start rule set as a document (what rule changes are checked against)."""
    if settings.rules_file:
        p = Path(settings.rules_file)
        return ActiveRules.of(parse_rules_text(p.read_bytes(), str(p)), str(p))
    text = resources.files("flows").joinpath(DEFAULT_RULES_RESOURCE).read_bytes()
    return ActiveRules.of(parse_rules_text(text, f"flows/{DEFAULT_RULES_RESOURCE}"),
                          f"flows/{DEFAULT_RULES_RESOURCE}")


def control_source(settings: Settings, latch: InputEnd,
                   client_factory: Callable[[], RedisClient] | None = None,
                   on_accept: Callable[[ActiveRules], None] | None = None,
                   ) -> ControlSource | None:
    """The rule-change input live mode reads, or None if there is nothing to watch.

    Backends, in this order: the rules file (``rules_file``, polled every 0.2 s), the
    Redis key ``touchstream:rules`` with its pub/sub channel (with ``redis.url``), the
    Kafka control topic ``ops.rules`` (with ``kafka.brokers``).
    """
    backends: list[RulesBackend] = []
    if settings.rules_file:
        backends.append(FileRules(settings.rules_file))
    if settings.redis.url is not None:
        # short timeouts: an outage is retried by the next read, never waited out
        factory = client_factory or functools.partial(
            make_client, settings.redis, socket_connect_timeout=1.0, socket_timeout=2.0)
        backends.append(RedisRules(factory, settings.redis.rules_key, settings.redis.rules_channel))
    if settings.kafka.brokers:
        backends.append(KafkaRules(settings.kafka.brokers, settings.kafka.rules_topic,
                                   settings.kafka.for_consumers()))
    if not backends:
        return None
    return ControlSource(load_rules_doc(settings), backends, until=latch, on_accept=on_accept)


def rules_status_message(topic: str) -> Callable[[RulesStatus], KafkaMessage]:
    """Rule change decision → ``ops.rules.status`` (key: the outcome)."""

    def to_msg(s: RulesStatus) -> KafkaMessage:
        return KafkaMessage(topic, s.outcome.encode(), status_message(s),
                            (("content-type", b"application/json"),))

    return to_msg


def run_dataflow(flow: Dataflow, workers: int, epoch_s: float, *,
                 addresses: Sequence[str] = (), process_id: int | None = None,
                 recovery: RecoveryConfig | None = None) -> None:
    """Run a dataflow with ``workers`` worker threads in this process.

    With ``addresses`` (``host:port`` of every process of a cluster, the same list in
    the same order on each), this process is process ``process_id`` of that cluster:
    Bytewax connects the processes, spreads input partitions and state keys over all
    ``len(addresses) * workers`` workers, and returns when the whole cluster is done.
    With ``recovery``, every epoch (``epoch_s``) ends with a snapshot of the state and
    the input offsets, and a start resumes from the last complete one.
    """
    interval = timedelta(seconds=epoch_s)
    if addresses:
        if process_id is None or not 0 <= process_id < len(addresses):
            raise ValueError(f"process_id {process_id} is not an index of the "
                             f"{len(addresses)} cluster addresses")
        log.info("process %d of %d (%s), %d worker(s) each", process_id, len(addresses),
                 addresses[process_id], workers)
        cluster_main(flow, list(addresses), process_id,  # type: ignore[no-untyped-call]
                     epoch_interval=interval, recovery_config=recovery,
                     worker_count_per_proc=workers)
    elif workers <= 1:
        run_main(flow, epoch_interval=interval,  # type: ignore[no-untyped-call]
                 recovery_config=recovery)
    else:
        cluster_main(flow, [], 0, epoch_interval=interval,  # type: ignore[no-untyped-call]
                     recovery_config=recovery, worker_count_per_proc=workers)


def recovery_dir(settings: Settings) -> Path:
    """This process's recovery directory: ``recovery.dir``, or in a multi-process
    cluster ``recovery.dir/process-<id>`` (processes never share partition files)."""
    base = Path(settings.recovery.dir)
    pid = settings.engine.process_id
    return base / f"process-{pid}" if settings.engine.addresses and pid is not None else base


class RecoveryDirError(ValueError):
    """The recovery directory belongs to another set of inputs."""


INPUTS_FILE = "touchstream-inputs.json"
"""What the recovery directory was made for (its input topics and ``engine.shards``),
written on first start."""


def _check_inputs(d: Path, settings: Settings) -> None:
    """Refuse a directory made for other input topics (Bytewax would abort on the
    unknown partitions with a panic; resuming them elsewhere would be wrong anyway), or
    for another ``engine.shards``.

    A customer's shard is ``crc32(customer id) % engine.shards``, and each shard's
    customers are one snapshot key: resumed with another count, a customer's new events
    go to another shard than the one holding their context, timers and once-marks, and
    the old shard's timers still fire for them. A file written before the shard count
    was noted (topics only) gets this run's count added.
    """
    want = sorted(kafka_input_topics(settings)) if settings.kafka.brokers else ["(demo)"]
    shards = settings.engine.shards
    f = d / INPUTS_FILE
    if not f.exists():
        f.write_text(json.dumps({"input_topics": want, "shards": shards}) + "\n",
                     encoding="utf-8")
        return
    made = json.loads(f.read_text(encoding="utf-8"))
    have = made.get("input_topics")
    if have != want:
        raise RecoveryDirError(
            f"recovery directory {d} holds snapshots of input topics {have}, not "
            f"{want}: give this run its own --recovery-dir (or move that one away to "
            "start from scratch)")
    had = made.get("shards")
    if had is None:
        made["shards"] = shards
        f.write_text(json.dumps(made) + "\n", encoding="utf-8")
        log.info("recovery: %s now notes engine.shards = %d (written before it was noted)",
                 f, shards)
    elif had != shards:
        raise RecoveryDirError(
            f"recovery directory {d} holds customers in {had} shards, and this run has "
            f"engine.shards = {shards}: a customer's shard is crc32(id) % shards, so their "
            f"state would stay in the old shard while their events went to another. Run "
            f"with --shards {had} (TOUCHSTREAM_ENGINE__SHARDS={had}), or give this run its "
            "own --recovery-dir to start from scratch")


def prepare_recovery(settings: Settings) -> RecoveryConfig | None:
    """The recovery store for this run, made on first start; None when recovery is off.

    The first start creates ``recovery.partitions`` empty partitions (what
    ``python -m bytewax.recovery DIR N`` does) and notes the input topics; later starts
    find them and resume. In a multi-process cluster only process 0 creates partitions;
    Bytewax finds them wherever they are in the cluster.

    :raises RecoveryDirError: the directory holds snapshots of other input topics.
    """
    if not settings.recovery_on():
        return None
    rs = settings.recovery
    d = recovery_dir(settings)
    d.mkdir(parents=True, exist_ok=True)
    _check_inputs(d, settings)
    parts = sorted(d.glob("part-*.sqlite3"))
    if parts:
        if len(parts) != rs.partitions:
            log.warning("recovery: %d partition(s) found in %s, not %d; keeping them",
                        len(parts), d, rs.partitions)
        log.info("recovery: resuming from %s (%d partition(s)), snapshot every %g s",
                 d, len(parts), rs.snapshot_interval_s)
    elif settings.engine.process_id in (None, 0):
        init_db_dir(d, rs.partitions)  # type: ignore[no-untyped-call]
        log.info("recovery: created %d partition(s) in %s, snapshot every %g s",
                 rs.partitions, d, rs.snapshot_interval_s)
    return RecoveryConfig(d,  # type: ignore[no-untyped-call]
                          timedelta(seconds=rs.backup_interval_s))


REPLAY_FILES = ("pushes.jsonl", "alerts.jsonl", "dead_letters.jsonl", "holdouts.jsonl",
                "stats.json")
"""What a replay writes to its output directory."""


def replay(settings: Settings, events: Path, rules: RuleSet | None = None) -> Path:
    """Replay a JSONL file in event time; write the outputs to ``settings.out_dir``.

    ``rules`` (backtests) replaces the rules of the settings.
    """
    assert settings.out_dir is not None
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A sink partition that receives nothing is never built: start every file empty.
    for name in REPLAY_FILES:
        (out / name).write_bytes(b"")
    profiles = InMemoryProfileStore(
        read_profiles_jsonl(settings.profiles_file) if settings.profiles_file else ()
    )
    outputs = Outputs(
        pushes=[SortedJsonlSink(out / "pushes.jsonl", push_row)],
        alerts=[SortedJsonlSink(out / "alerts.jsonl", alert_row)],
        dead_letters=[SortedJsonlSink(out / "dead_letters.jsonl", dead_letter_row)],
        stats=[JsonDocSink(out / "stats.json")],
        holdouts=[SortedJsonlSink(out / "holdouts.jsonl", holdout_row)],
    )
    flow = build_flow(
        settings,
        source=JsonlSource(Path(events)),
        outputs=outputs,
        rules=rules if rules is not None else load_rule_set(settings),
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


def kafka_input(settings: Settings) -> KafkaInput:
    """The Kafka input of a live run, as ``settings.kafka`` describes it."""
    k = settings.kafka
    if not k.brokers:
        raise ValueError("kafka.brokers is not set")
    return KafkaInput(k.brokers, kafka_input_topics(settings), k.for_consumers(),
                      tail=k.start == "latest", eof_when_idle_s=k.eof_when_idle_s,
                      on_out_of_range=k.on_out_of_range,
                      poll_timeout_s=k.poll_rest_ms / 1000,
                      idle_rest_s=k.idle_rest_ms / 1000, idle_after_s=k.idle_after_s)


def all_topics(settings: Settings) -> dict[str, int]:
    """Every topic touchstream uses, with its partition count."""
    k = settings.kafka
    names = [k.clicks_topic, k.location_topic, k.calls_topic, k.pushes_topic, k.alerts_topic,
             k.alerts_dlq_topic, k.dead_letters_topic, k.stats_topic]
    topics = {n: k.partitions.get(n, k.default_partitions) for n in names}
    # rule changes are ordered within one partition only
    topics[settings.kafka.rules_topic] = 1
    topics[settings.kafka.rules_status_topic] = 1
    return topics


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


def epoch_grid(settings: Settings, epoch_s: float) -> EpochGrid | None:
    """What keeps the epochs (``epoch_s`` long) of this run's workers together: None
    with one worker in all (nothing to drift from) or ``engine.epoch_quiet_ms = 0``.

    :raises ValueError: the quiet window is not less than half the epoch.
    """
    es = settings.engine
    if es.workers * max(1, len(es.addresses)) <= 1 or es.epoch_quiet_ms <= 0:
        return None
    try:
        return EpochGrid(timedelta(seconds=epoch_s), timedelta(milliseconds=es.epoch_quiet_ms))
    except ValueError as exc:
        raise ValueError(f"engine.epoch_quiet_ms: {exc}") from exc


def run_live(settings: Settings, *, duration_s: float | None = None,
             console: ConsoleView | None = None,
             wrap_source: Callable[[Source[RawRecord]], Source[RawRecord]] | None = None,
             stop: StopRequest | None = None, handle_signals: bool = True,
             ) -> None:
    """Run live: Kafka or demo traffic in; console, Kafka, Redis and webhooks out.

    ``wrap_source`` (benchmarks) wraps the input source before the flow is built.

    With recovery on (``settings.recovery_on()``: by default with Kafka input) the flow
    snapshots its state and input offsets every ``recovery.snapshot_interval_s`` into
    ``recovery.dir`` (made on first start) and resumes from there; the webhook sink
    journals accepted alerts in ``recovery.dir/webhook-outbox``.

    ``stop`` ends the run cleanly when set (see :mod:`flows.shutdown`); with
    ``handle_signals`` (and on the main thread) SIGTERM and SIGINT set it for the
    duration of the run.
    """
    k = settings.kafka
    rules = load_rule_set(settings)
    recovery = prepare_recovery(settings)
    outputs = Outputs()
    profiles: ProfileStore
    redis_client: RedisClient | None = None
    redis_profiles: RedisProfileStore | None = None
    on_accept: Callable[[ActiveRules], None] | None = None
    if settings.redis.url is not None:
        redis_client = make_client(settings.redis)
        profiles = redis_profiles = RedisProfileStore(
            redis_client, settings.redis.profile_cache_ttl_s,
            retry_interval_s=settings.redis.retry_interval_s)
        # each worker's client with the AUTH and TLS options of the settings
        worker_client = functools.partial(make_client, settings.redis)
        # With recovery, pushes held while Redis is down are spooled to disk: the epoch
        # that produced them is committed and will not be replayed.
        spool = ({"spool_dir": recovery_dir(settings) / "redis-push-spool"}
                 if recovery is not None else {})
        outputs.pushes.append(
            RedisPushOutput(RedisPushConfig.from_settings(settings.redis, **spool),
                            guard=RedisGuardStore, client_factory=worker_client)
        )
        # the ops feed for the gateway's /ops console (connectors/ops_feed.py)
        ops_feed = OpsFeedOutput(OpsFeedConfig.from_settings(settings.redis),
                                 client_factory=worker_client)
        for out_list in (outputs.pushes, outputs.alerts, outputs.stats):
            out_list.append(ops_feed)
        write_rules(redis_client, rules)
        console_client = redis_client

        def on_accept(a: ActiveRules) -> None:
            write_rules(console_client,
                        compile_update(a.version, a.doc, a.digest, a.origin))
    else:
        profiles = InMemoryProfileStore(
            read_profiles_jsonl(settings.profiles_file) if settings.profiles_file else ()
        )
    source: Source[RawRecord]
    if k.brokers:
        source = kafka_input(settings)
        out = KafkaOutput(k.brokers, k.for_producers())
        outputs.pushes.append(MappedSink(out, push_message(k.pushes_topic)))
        outputs.alerts.append(MappedSink(out, alert_message(k.alerts_topic)))
        outputs.dead_letters.append(MappedSink(out, dead_letter_message(k.dead_letters_topic)))
        outputs.stats.append(MappedSink(out, stats_message(k.stats_topic)))
        outputs.rules_status.append(MappedSink(out, rules_status_message(k.rules_status_topic)))
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
            dlq = KafkaAlertDeadLetters(k.brokers, k.alerts_dlq_topic, k.for_producers())
        else:
            dlq = JsonlDeadLetterFile(settings.alerts_dlq_file)
        if recovery is not None:
            outputs.alerts.append(WebhookOutput(
                targets, on_dead_letter=dlq,
                outbox_dir=recovery_dir(settings) / "webhook-outbox",
                outbox_max_bytes=settings.recovery.outbox_max_bytes))
        else:
            outputs.alerts.append(WebhookOutput(targets, on_dead_letter=dlq))
    if console is not None:
        sinks = console.sinks()
        outputs.pushes.append(sinks["pushes"])
        outputs.alerts.append(sinks["alerts"])
        outputs.dead_letters.append(sinks["dead_letters"])
        outputs.stats.append(sinks["stats"])
    if wrap_source is not None:
        source = wrap_source(source)
    stop = stop if stop is not None else StopRequest()
    latch = InputEnd()
    rule_changes = control_source(settings, latch, on_accept=on_accept)
    source = stoppable(end_with_input(source, latch), stop)
    control = stoppable(rule_changes, stop) if rule_changes is not None else None
    es = settings.engine
    # With recovery, the epoch is the snapshot interval (Bytewax snapshots at epoch ends).
    epoch_s = settings.recovery.snapshot_interval_s if recovery is not None else es.epoch_interval_s
    grid = epoch_grid(settings, epoch_s)
    if grid is not None:  # outermost: its wake-up times are the ones Bytewax sees
        source = wrapped.wrap_source(source, grid)
        control = wrapped.wrap_source(control, grid) if control is not None else None
        epoch_s = grid.runtime_interval.total_seconds()
    # campaign quotas: in Redis, shared by every process; else by this process's workers
    quota: QuotaStore | None = RedisQuotaStore(redis_client) if redis_client is not None else None
    flow = build_flow(settings, source=source, outputs=outputs, rules=rules, profiles=profiles,
                      recovery=recovery is not None, quota=quota,
                      control=control)
    tune_gc(es.gc_threshold)
    metrics_server: MetricsServer | None = None
    try:
        if es.addresses and not k.brokers:
            # Demo traffic is one generator in one process, and the demo profiles it loads
            # live in that process's memory: shards on other processes would see none.
            raise ValueError("a multi-process cluster (engine.addresses) needs Kafka input")
        if es.metrics_port is not None:
            metrics_server = start_metrics_server(es.metrics_port, es.process_id)
        with contextlib.ExitStack() as stack:
            if handle_signals:
                stack.enter_context(handle_stop_signals(stop))
            run_dataflow(flow, es.workers, epoch_s, addresses=es.addresses,
                         process_id=es.process_id, recovery=recovery)
        if stop.is_set():
            log.info("stopped cleanly (%s)%s", stop.reason,
                     "; the last snapshot is committed" if recovery is not None else "")
    finally:
        if metrics_server is not None:
            metrics_server.close()
        if redis_profiles is not None:
            redis_profiles.close()  # stops its background PING if Redis was down at exit
        if redis_client is not None:
            redis_client.close()
