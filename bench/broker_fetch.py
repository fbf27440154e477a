"""Broker part: what the test broker (Tansu, memory storage) costs per fetch as its log grows.

The latency part finds push latency at 5k events/s growing over a run while the engine
uses a fraction of a core and the broker more than one. This part measures the broker
alone, without the engine, to show where that comes from: a paced producer (the same
``linger.ms=5`` as the latency part's load) and one ``assign()``-ed consumer per input
partition with exactly the engine's consumer configuration
(:meth:`connectors.kafka.KafkaInput.consumer_config`: ``fetch.wait.max.ms=5``), reading
three topics. Latency is send → ``consume()`` returned the record, per 10 s window,
with the broker's CPU use in the same window. Each variant gets a fresh broker (stored
batches from an earlier variant would change the answer).

Variants: three topics of 3 partitions (what ``touchstream topics create`` makes) and of
1 partition, each read with one consumer per partition as the engine reads them; and the
3-partition topics read by one consumer ``assign()``-ed all nine partitions (one fetch
request per broker instead of one per partition: what a shared consumer in
``KafkaInput`` would do, tried and reverted, bench/README.md).

Tansu's memory storage lists every stored batch object of a partition on each fetch
that finds data (``tansu-storage/src/dynostore.rs``, ``fetch``, as its source
reads), so a fetch costs O(batches stored in the partition): the cost grows with the
run's length and with the number of partitions the same events are spread over (each
holds as many batches: a producer with ``linger.ms=5`` closes about one batch per
partition per 5 ms). A Kafka broker finds the fetch position through an offset index.

Not in the default ``make bench`` (3 runs took 498 s on 2026-11-25):
``python -m bench broker_fetch``.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import orjson

from bench.core import BenchContext, PartResult
from bench.services import start_tansu
from gateway.loadtest import cpu_s

__all__ = ["FULL", "QUICK", "run"]

PART = "broker_fetch"
WINDOW_S = 10.0
FULL = {"rate": 5000, "seconds": 45.0}
QUICK = {"rate": 300, "seconds": 4.0}
# (partitions per topic, one consumer for all of them instead of one per partition)
VARIANTS = ((3, False), (1, False), (3, True))
TOPICS = ("bf.clicks", "bf.location", "bf.calls")


def _produce(brokers: str, partitions: int, rate: int, seconds: float) -> None:
    from confluent_kafka import Producer  # noqa: PLC0415  (in the child process)

    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5})
    t0 = time.monotonic()
    for n in range(int(rate * seconds)):
        ahead = t0 + n / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        value = orjson.dumps({"sent_ns": time.time_ns(), "n": n})
        while True:
            try:
                producer.produce(TOPICS[n % 3], value, partition=(n // 3) % partitions)
                break
            except BufferError:  # 100k messages queued: the broker is behind on produce too
                producer.poll(0.005)
        producer.poll(0)
    producer.flush(30)


def _consume(brokers: str, partitions: int, shared: bool, seconds: float, out: Any) -> None:
    from confluent_kafka import Consumer, TopicPartition  # noqa: PLC0415

    from connectors.kafka import KafkaInput  # noqa: PLC0415

    config = KafkaInput(brokers, dict.fromkeys(TOPICS, "json")).consumer_config()
    tps = [TopicPartition(topic, p, 0) for topic in TOPICS for p in range(partitions)]
    consumers = []
    for group in ([tps] if shared else [[tp] for tp in tps]):
        c = Consumer(config)
        c.assign(group)
        consumers.append(c)
    out.put("ready")
    lat: list[float] = []
    t0 = window = time.monotonic()
    while (now := time.monotonic()) - t0 < seconds:
        for c in consumers:  # round-robin, like one Bytewax worker over its partitions
            for m in c.consume(1000, 0.001):
                if m.error() is None:
                    sent = orjson.loads(m.value())["sent_ns"]
                    lat.append((time.time_ns() - sent) / 1e6)
        if now - window >= WINDOW_S:
            out.put((now - t0, lat))
            lat, window = [], now
    out.put((time.monotonic() - t0, lat))
    out.put(None)
    for c in consumers:
        c.close()


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _label(partitions: int, shared: bool) -> str:
    label = f"3 topics x {partitions} partition{'s' if partitions > 1 else ''}"
    return f"{label}, one consumer" if shared else label


def _variant(work: Path, partitions: int, shared: bool, rate: int,
             seconds: float) -> list[dict[str, float]]:
    """One fresh broker, one run: per-window latency, records and broker CPU."""
    broker = start_tansu(work / f"tansu-{partitions}p{'-shared' if shared else ''}")
    try:
        from confluent_kafka.admin import AdminClient, NewTopic  # noqa: PLC0415

        admin = AdminClient({"bootstrap.servers": broker.address})
        new = [NewTopic(t, partitions, 1, config={"retention.ms": "3600000"}) for t in TOPICS]
        for f in admin.create_topics(new).values():
            f.result(30)
        spawn = mp.get_context("spawn")
        q = spawn.Queue()
        drain = 8.0 if seconds > 10 else 2.0  # consume on after the last send
        consumer = spawn.Process(target=_consume,
                                 args=(broker.address, partitions, shared, seconds + drain,
                                       q))
        consumer.start()
        assert q.get(timeout=60) == "ready"
        producer = spawn.Process(target=_produce,
                                 args=(broker.address, partitions, rate, seconds))
        producer.start()
        windows: list[dict[str, float]] = []
        cpu0, t_prev, at_prev = cpu_s(broker.proc.pid), time.monotonic(), 0.0
        while (item := q.get(timeout=seconds + 120)) is not None:
            at, lat = item
            cpu1, t_now = cpu_s(broker.proc.pid), time.monotonic()
            windows.append({"t_s": round(at, 1), "records": len(lat),
                            "records_per_s": round(len(lat) / max(at - at_prev, 1e-6)),
                            "p50_ms": round(_pct(lat, 0.5), 1),
                            "p99_ms": round(_pct(lat, 0.99), 1),
                            "broker_cores": round((cpu1 - cpu0) / max(t_now - t_prev, 1e-6), 2)})
            cpu0, t_prev, at_prev = cpu1, t_now, at
        producer.join(60)
        consumer.join(60)
        return windows
    finally:
        broker.stop()


def _plot(path: Path, series: dict[str, list[dict[str, float]]]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, all_windows in series.items():
        ws = [w for w in all_windows if w["records"]]
        ax1.plot([w["t_s"] for w in ws], [w["p99_ms"] for w in ws], marker="o", label=label)
        ax2.plot([w["t_s"] for w in ws], [w["broker_cores"] for w in ws], marker="o",
                 label=label)
    ax1.set(xlabel="seconds into the run", ylabel="send → consume p99 (ms)", yscale="log",
            title="latency per 10 s window, no engine")
    ax2.set(xlabel="seconds into the run", ylabel="broker CPU (cores)",
            title="Tansu (memory storage) CPU")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(ctx: BenchContext) -> PartResult:
    """Each variant ``ctx.runs`` times (quick: once, tiny), interleaved."""
    cfg = QUICK if ctx.quick else FULL
    rate, seconds = int(cfg["rate"]), float(cfg["seconds"])
    runs = ctx.run_count
    result = PartResult(PART)
    series: dict[str, list[dict[str, float]]] = {}
    for i in range(runs):
        for parts, shared in VARIANTS:
            windows = _variant(ctx.work_dir / f"run{i}", parts, shared, rate, seconds)
            label = _label(parts, shared)
            result.extra.setdefault(label, []).append(windows)
            series.setdefault(label, windows)
            full = [w for w in windows if w["records"]]
            if not full:
                result.notes.append(f"{label}, run {i}: no records consumed")
                continue
            first, last = full[0], full[-1]
            at = f"@ {rate // 1000 if rate >= 1000 else rate}{'k' if rate >= 1000 else ''} " \
                 f"events/s, {label}"
            for name, w in (("first 10 s", first), ("last window", last)):
                result.figure(f"send→consume p50, {name} {at}", "ms",
                              higher_is_better=False).values.append(w["p50_ms"])
                result.figure(f"send→consume p99, {name} {at}", "ms",
                              higher_is_better=False).values.append(w["p99_ms"])
                result.figure(f"broker CPU, {name} {at}", "cores",
                              higher_is_better=False).values.append(w["broker_cores"])
            result.figure(f"records consumed {at}", "records").values.append(
                sum(w["records"] for w in windows))
            # The sending window that ended last: a consumer still reading at the
            # producer's pace there kept up; one at 0 has stopped reading.
            sending = [w for w in windows if w["t_s"] <= seconds] or windows
            result.figure(f"records consumed per s, last sending window {at}",
                          "records/s").values.append(sending[-1]["records_per_s"])
    plot = ctx.results_path(PART, "-windows.png")
    _plot(plot, series)
    result.plots.append(plot)
    result.notes.append(f"{rate} events/s for {seconds:.0f} s per run, no engine: a paced "
                        "producer (linger.ms=5) and the engine's consumer configuration")
    return result
