"""Idle part: what an engine with nothing to read costs, and what its idle rest costs.

A live engine's Kafka input is asked for records by Bytewax's worker thread. A partition
that finds nothing rests ``kafka.poll_rest_ms`` (1 ms) before it is asked again, and
each rest ends in a Bytewax activation of the input step, which costs the worker far
more than the empty ``consume`` itself. So an engine with nothing to read kept about a
fifth of a core busy (the variant "no idle rest" below). A partition that has found
no record for ``kafka.idle_after_s`` (1 s) now rests ``kafka.idle_rest_ms`` (10 ms)
instead; the price is that the first record after a quiet spell can wait up to that
long more. This part measures both sides, each variant against the same broker in the
same run:

* **CPU while idle**: ``touchstream run --kafka ... --redis ...`` (recovery off) with
  empty input topics, after a settling time; user + system CPU over the window, split
  into the worker (the main thread, which runs the dataflow), librdkafka's threads
  (``rdk:*``: the consumers' fetch loops) and the others (rules poller, metrics), and
  the broker's CPU over the same window. The baseline is the broker with no client.
* **First push after a quiet spell**: then, ``probes`` times, a ``session_start`` of
  a care_link subscriber who never set it up (``setup-first``) on clicks partition 0,
  sent after more than ``idle_after_s`` without a record; the time from just before
  ``produce`` to the moment an ``XREAD BLOCK`` on the probe terminal's stream returns
  with the push. It includes the broker's fetch wait (``fetch.wait.max.ms``, 5 ms).

Variants: the engine without the idle rest (``idle_rest_ms`` = ``poll_rest_ms`` = 1 ms,
what it did before), as shipped, and as shipped with ``fetch.wait.max.ms=100`` (the
setting bench/README suggests for Tansu under a sustained feed: fewer idle fetches).
Each run starts its own Tansu and redis-server, so the broker holds nothing but the
run's empty topics.

Not in the default ``make bench`` (3 runs take about 5 min): ``python -m bench
engine_idle``; its quick mode is in ``make test`` (``tests/bench/test_engine_idle_quick.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from bench.core import BenchContext, PartResult
from bench.latency import PROBE_TERMINAL, EngineProcess, broker_pid
from bench.latency import TOPIC_FIELDS as LATENCY_TOPIC_FIELDS
from bench.services import redis_db_url, services
from connectors.kafka import create_topics
from flows.model import Profile
from gateway.loadtest import cpu_s
from state.redis_store import RedisProfileStore

__all__ = ["FULL", "QUICK", "VARIANTS", "IdleTimes", "own_engine", "run", "split_threads",
           "thread_cpu"]

PART = "engine_idle"
REDIS_DB = 12
TOPIC_FIELDS = (*LATENCY_TOPIC_FIELDS, "rules", "rules_status")
"""The latency part's topics and the rule topics: each engine starts on fresh ones."""


@dataclass(frozen=True)
class IdleTimes:
    """How long each step of a variant's run takes."""

    settle_s: float
    """After the engine answered its first probe, before the CPU window."""
    window_s: float
    """The CPU window."""
    probes: int
    """First-push probes after the window."""
    quiet_s: float
    """Time without a record before each probe (more than ``idle_after_s``)."""


FULL = IdleTimes(settle_s=5.0, window_s=15.0, probes=5, quiet_s=1.5)
QUICK = IdleTimes(settle_s=1.5, window_s=2.0, probes=2, quiet_s=1.2)

VARIANTS: dict[str, dict[str, str]] = {
    "no idle rest": {"TOUCHSTREAM_KAFKA__IDLE_REST_MS": "1"},
    "shipped": {},
    "shipped, fetch.wait.max.ms=100": {
        "TOUCHSTREAM_KAFKA__CONSUMER_CONFIG": json.dumps({"fetch.wait.max.ms": 100})},
}
"""Label -> the engine's environment on top of the shipped settings."""


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """``{tid: (thread name, user + system CPU seconds)}`` of every thread of ``pid``."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def split_threads(pid: int, before: dict[int, tuple[str, float]],
                  after: dict[int, tuple[str, float]], seconds: float) -> dict[str, float]:
    """Cores used between two :func:`thread_cpu` readings of process ``pid``: the
    worker (its main thread), librdkafka's threads (``rdk:*``), the other threads, and
    the total. A thread that started in between counts from zero."""
    use = {"worker": 0.0, "librdkafka": 0.0, "other": 0.0}
    for tid, (name, cpu) in after.items():
        spent = cpu - before.get(tid, (name, 0.0))[1]
        kind = "worker" if tid == pid else "librdkafka" if name.startswith("rdk:") else "other"
        use[kind] += spent
    out = {k: round(v / seconds, 3) for k, v in use.items()}
    out["total"] = round(sum(use.values()) / seconds, 3)
    return out


@dataclass
class _Run:
    """One variant's figures in one run."""

    engine: dict[str, float] = field(default_factory=dict)
    broker_cores: float = 0.0
    first_push_ms: list[float] = field(default_factory=list)


class _Prober:
    """``setup-first`` pushes on demand: one new care_link customer per probe."""

    def __init__(self, brokers: str, client: redis.Redis, clicks_topic: str, tag: str) -> None:
        from confluent_kafka import Producer  # noqa: PLC0415

        self.producer = Producer({"bootstrap.servers": brokers, "linger.ms": 0,
                                  "log.connection.close": False})  # idle between probes
        self.client = client
        self.store = RedisProfileStore(client)
        self.topic = clicks_topic
        self.tag = tag
        self.n = 0
        self.stream = f"push:terminal:{PROBE_TERMINAL}".encode()
        self.last = b"0-0"

    def close(self) -> None:
        """Let go of the producer (librdkafka's handle goes with it), before the broker
        stops: a live handle would log its failed reconnects."""
        self.producer.flush(5)
        del self.producer

    def push_ms(self, engine: EngineProcess, timeout_s: float) -> float:
        """Send one probe; the ms from just before ``produce`` to the ``XREAD`` that
        returned its push. Raises ``TimeoutError`` if none comes within ``timeout_s``."""
        self.n += 1
        cid = f"idle{self.tag}{self.n}"
        self.store.put_many([Profile(cid, subscriptions=frozenset({"care_link"}))])
        event_id = f"{self.tag}-{self.n}"
        doc = {"type": "click", "customer_id": cid, "terminal_id": PROBE_TERMINAL,
               "hall_id": "P00", "action": "session_start", "event_id": event_id,
               "ts": time.time_ns() // 1_000_000}
        sent = time.time_ns()
        self.producer.produce(self.topic, orjson.dumps(doc), key=cid.encode(), partition=0)
        self.producer.flush(10)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            engine.check()
            reply: Any = self.client.xread({self.stream: self.last},
                                           block=max(1, int(min(left, 0.5) * 1000)))
            seen = time.time_ns()
            for _key, entries in reply or []:
                for entry_id, fields in entries:
                    self.last = entry_id
                    push = orjson.loads(fields[b"data"])
                    if push["reason"].get("trigger_event") == event_id:
                        return (seen - sent) / 1e6
        raise TimeoutError(f"no push for probe {cid} within {timeout_s} s")


def _start(brokers: str, redis_url: str, client: redis.Redis, tag: str,
           env: dict[str, str], log: Path) -> tuple[EngineProcess, _Prober]:
    """An engine (``env`` on top of the shipped settings) on fresh topics named after
    ``tag`` (3 partitions, the rule topics 1, as ``touchstream topics create``), and a
    prober for it."""
    topics = {f: f"idle.{tag}.{f}" for f in TOPIC_FIELDS}
    create_topics(brokers, {name: 1 if f.startswith("rules") else 3
                            for f, name in topics.items()})
    engine = EngineProcess(brokers, redis_db_url(redis_url, REDIS_DB), topics, log,
                           None, None, env)
    return engine, _Prober(brokers, client, topics["clicks"], tag)


def _one_run(work: Path, index: int, times: IdleTimes) -> dict[str, _Run]:
    """Fresh Tansu and redis-server; the broker alone, then each variant, their order
    turned by one per run (run 1 starts with the second variant), so that whatever the
    first engine on a fresh broker meets is not always the same variant's."""
    out: dict[str, _Run] = {}
    with services(work / f"run{index}") as (brokers, redis_url):
        bpid = broker_pid(brokers)
        if bpid is None:
            raise RuntimeError(f"no broker process listens on {brokers}")
        b0 = cpu_s(bpid)
        time.sleep(times.window_s)
        out["broker alone"] = _Run(broker_cores=round((cpu_s(bpid) - b0) / times.window_s, 3))
        client = redis.Redis.from_url(redis_db_url(redis_url, REDIS_DB))
        try:
            order = list(VARIANTS.items())
            order = order[index % len(order):] + order[:index % len(order)]
            for label, env in order:
                tag = f"r{index}v{list(VARIANTS).index(label)}"
                engine, prober = _start(brokers, redis_url, client, tag, env,
                                        work / f"engine-{tag}.log")
                try:
                    prober.push_ms(engine, timeout_s=60)  # up and reading (not counted)
                    time.sleep(times.settle_s)
                    before, b0, t0 = thread_cpu(engine.proc.pid), cpu_s(bpid), time.monotonic()
                    time.sleep(times.window_s)
                    after, b1, t1 = thread_cpu(engine.proc.pid), cpu_s(bpid), time.monotonic()
                    engine.check()
                    run = _Run(engine=split_threads(engine.proc.pid, before, after, t1 - t0),
                               broker_cores=round((b1 - b0) / (t1 - t0), 3))
                    for _ in range(times.probes):
                        time.sleep(times.quiet_s)
                        run.first_push_ms.append(round(prober.push_ms(engine, timeout_s=30), 2))
                    out[label] = run
                finally:
                    engine.stop()
                    prober.close()
        finally:
            client.close()
    return out


def _plot(path: Path, runs: list[dict[str, _Run]]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = list(runs[0])
    med = {lab: {k: statistics.median(r[lab].engine.get(k, 0.0) for r in runs)
                 for k in ("worker", "librdkafka", "other")} for lab in labels}
    broker = {lab: statistics.median(r[lab].broker_cores for r in runs) for lab in labels}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = range(len(labels))
    bottom = [0.0] * len(labels)
    for kind in ("worker", "librdkafka", "other"):
        ys = [med[lab][kind] for lab in labels]
        ax1.bar([x - 0.2 for x in xs], ys, 0.4, bottom=bottom, label=f"engine: {kind}")
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax1.bar([x + 0.2 for x in xs], [broker[lab] for lab in labels], 0.4, label="broker",
            color="grey")
    ax1.set_xticks(list(xs), [lab.replace(", ", ",\n") for lab in labels], fontsize=8)
    ax1.set(ylabel="cores (median of runs)", title="CPU with nothing to read")
    ax1.legend(fontsize=8)
    engine_labels = [lab for lab in labels if runs[0][lab].first_push_ms]
    ax2.boxplot([[ms for r in runs for ms in r[lab].first_push_ms] for lab in engine_labels])
    ax2.set_xticks(range(1, len(engine_labels) + 1),
                   [lab.replace(", ", ",\n") for lab in engine_labels], fontsize=8)
    ax2.set(ylabel="ms", title="first push after a quiet spell (send → XREAD)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(ctx: BenchContext) -> PartResult:
    """``ctx.runs`` runs (quick: 1, short), each on its own Tansu and redis-server."""
    times = QUICK if ctx.quick else FULL
    n = ctx.run_count
    result = PartResult(PART)
    runs = [_one_run(ctx.work_dir, i, times) for i in range(n)]
    for r in runs:
        result.figure("broker CPU, broker alone", "cores",
                      higher_is_better=False).values.append(r["broker alone"].broker_cores)
        for label in VARIANTS:
            v = r[label]
            result.figure(f"engine CPU idle, {label}", "cores",
                          higher_is_better=False).values.append(v.engine["total"])
            result.figure(f"  worker thread, {label}", "cores",
                          higher_is_better=False).values.append(v.engine["worker"])
            result.figure(f"  librdkafka threads, {label}", "cores",
                          higher_is_better=False).values.append(v.engine["librdkafka"])
            result.figure(f"broker CPU with the engine idle, {label}", "cores",
                          higher_is_better=False).values.append(v.broker_cores)
            result.figure(f"first push after {times.quiet_s:g} s quiet, median, {label}", "ms",
                          higher_is_better=False).values.append(
                round(statistics.median(v.first_push_ms), 2))
            result.figure(f"first push after {times.quiet_s:g} s quiet, max, {label}", "ms",
                          higher_is_better=False).values.append(max(v.first_push_ms))
    result.extra["runs"] = [{label: {"engine_cores": v.engine, "broker_cores": v.broker_cores,
                                     "first_push_ms": v.first_push_ms}
                             for label, v in r.items()} for r in runs]
    result.extra["times"] = times.__dict__
    plot = ctx.results_path(PART, ".png")
    _plot(plot, runs)
    result.plots.append(plot)
    result.notes.append(
        f"engine with empty input topics (3 partitions each), recovery off; CPU over "
        f"{times.window_s:g} s after {times.settle_s:g} s settling; then {times.probes} "
        f"probes, each after {times.quiet_s:g} s without a record; each run on its own Tansu")
    return result


@contextlib.contextmanager
def own_engine(work: Path, tag: str,
               env: dict[str, str]) -> Iterator[tuple[EngineProcess, _Prober]]:
    """One engine (``env`` on top of the shipped settings) on its own Tansu and
    redis-server (under ``work``), reading: yields it and its prober after a first probe
    (not counted) got its push; stops both on exit."""
    with services(work) as (brokers, redis_url):
        client = redis.Redis.from_url(redis_db_url(redis_url, REDIS_DB))
        engine, prober = _start(brokers, redis_url, client, tag, env, work / "engine.log")
        try:
            prober.push_ms(engine, timeout_s=60)
            yield engine, prober
        finally:
            engine.stop()
            prober.close()
            client.close()


def quiet_spells(spans: list[float], env: dict[str, str], work: Path) -> list[float]:
    """One engine (``env`` on top of the shipped settings) on its own Tansu and
    redis-server: after a first probe, one probe after each quiet spell of ``spans``
    seconds; the first push times (ms)."""
    with own_engine(work, "quiet", env) as (engine, prober):
        out = []
        for span in spans:
            time.sleep(span)
            out.append(round(prober.push_ms(engine, timeout_s=30), 2))
            print(f"first push after {span:g} s quiet: {out[-1]} ms", flush=True)
        return out


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.engine_idle --quiet 1.5,5,10,20 [--set KEY=VALUE ...]``: the
    first push after each quiet spell, for one engine (the part itself runs through
    ``python -m bench engine_idle``)."""
    import argparse  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m bench.engine_idle", description=main.__doc__)
    p.add_argument("--quiet", required=True,
                   help="comma-separated quiet spells in seconds, one probe after each")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="engine environment, e.g. TOUCHSTREAM_KAFKA__IDLE_REST_MS=1")
    args = p.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.set)
    with tempfile.TemporaryDirectory(prefix="touchstream-quiet-") as tmp:
        quiet_spells([float(x) for x in args.quiet.split(",")], env, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
