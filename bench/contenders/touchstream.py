"""The engine itself: the full experience flow, wired as ``touchstream run`` wires it.

``flows.runner.run_live`` with Kafka in (the three input topics of the dataset),
Redis for profiles (100,000 loaded before the clock starts), the push guard and push
streams, and Kafka out (``exp.pushes``, ``ops.alerts``, ``exp.dead_letters``,
``exp.stats`` of this run, prefixed like its input). All default rules are on. The
input is wrapped in :class:`bench.timing.TimedSource`, so the figure is measured the
same way as the other contenders'; each partition ends after 1 s without a record.

``--processes P`` runs a P-process Bytewax cluster on 127.0.0.1 (one worker each),
the way ``touchstream run -i N -a ...`` runs one across hosts.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import redis

from bench import gcstats
from bench.contenders import ContenderArgs, parse_args, scratch_dir, write_result
from bench.services import free_port
from bench.timing import TimedSource, read_timings
from bench.workload import profiles
from connectors.kafka import create_topics
from flows.runner import run_live
from flows.settings import Settings
from state.redis_store import RedisProfileStore

CONTENDER = True

EOF_WHEN_IDLE_S = 1.0
CUSTOMERS = 100_000
_LOADED_MARK = "bench:profiles-loaded"


def load_profiles(redis_url: str, customers: int = CUSTOMERS) -> None:
    """Load the workload's profiles into Redis once (a marker key says they are there)."""
    client = redis.Redis.from_url(redis_url)
    try:
        if client.get(_LOADED_MARK) == str(customers).encode():
            return
        store = RedisProfileStore(client, cache_ttl_s=0)
        batch = []
        for p in profiles(customers):
            batch.append(p)
            if len(batch) == 5000:
                store.put_many(batch)
                batch.clear()
        store.put_many(batch)
        client.set(_LOADED_MARK, str(customers))
    finally:
        client.close()


def settings_for(args: ContenderArgs, topics: Sequence[str]) -> Settings:
    """Live settings on the dataset's topics, with outputs prefixed like them."""
    clicks, location, calls = _by_kind(topics)
    prefix = clicks[: -len("touch.clicks")] if clicks.endswith("touch.clicks") else "bench."
    kafka = {
        "brokers": args.brokers,
        "clicks_topic": clicks,
        "location_topic": location,
        "calls_topic": calls,
        "pushes_topic": f"{prefix}exp.pushes",
        "alerts_topic": f"{prefix}ops.alerts",
        "alerts_dlq_topic": f"{prefix}ops.alerts.dlq",
        "dead_letters_topic": f"{prefix}exp.dead_letters",
        "stats_topic": f"{prefix}exp.stats",
        "eof_when_idle_s": EOF_WHEN_IDLE_S,
        "default_partitions": 3,
    }
    # Recovery (on by default with Kafka) is off: the figures are the flow's own cost;
    # snapshots are measured separately (bench/README.md).
    return Settings(mode="live", kafka=kafka,
                    redis={"url": args.redis} if args.redis else {},
                    recovery={"enabled": False})


def _by_kind(topics: Sequence[str]) -> tuple[str, str, str]:
    def one(suffix: str) -> str:
        found = [t for t in topics if t.endswith(suffix)]
        if len(found) != 1:
            raise SystemExit(f"need exactly one topic ending in {suffix!r}: {list(topics)}")
        return found[0]

    return one("touch.clicks"), one("net.location"), one("net.calls")


def _own_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--addresses", default=None, help=argparse.SUPPRESS)


def _run(settings: Settings, timing_dir: Path) -> None:
    run_live(settings, wrap_source=lambda src: TimedSource(src, timing_dir))  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the engine (or one process of its cluster), then write the timing."""
    args = parse_args(argv, __doc__, _own_args)
    if not args.redis:
        raise SystemExit("the touchstream contender needs --redis (profiles live there)")
    timing_dir = scratch_dir(args.result) / "timing"
    gcstats.install(timing_dir)  # each process of a cluster writes its collections there
    base = settings_for(args, args.topics)
    proc_id = args.extra.process_id
    if proc_id is not None:  # one member of the cluster started below
        engine = {**base.engine.model_dump(), "process_id": proc_id,
                  "addresses": args.extra.addresses.split(",")}
        _run(base.model_copy(update={"engine": type(base.engine).model_validate(engine)}),
             timing_dir)
        return 0
    shutil.rmtree(timing_dir, ignore_errors=True)
    load_profiles(args.redis)
    create_topics(args.brokers, {
        t: 3 for t in (base.kafka.pushes_topic, base.kafka.alerts_topic,
                       base.kafka.dead_letters_topic, base.kafka.stats_topic)
    })
    if args.processes == 1:
        _run(base, timing_dir)
    else:
        addresses = ",".join(f"127.0.0.1:{free_port()}" for _ in range(args.processes))
        own = list(argv if argv is not None else sys.argv[1:])
        procs = [
            subprocess.Popen([sys.executable, "-m", __spec__.name if __spec__ else __name__,
                              *own, "--process-id", str(i), "--addresses", addresses])
            for i in range(args.processes)
        ]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"cluster processes exited with {codes}")
    pushes = _count_pushes(args.redis)
    # The quiet window the members read from the environment (0: no epoch grid).
    write_result(args.result, read_timings(timing_dir), gc_dir=timing_dir, processes=args.processes,
                 push_streams=pushes, epoch_quiet_ms=base.engine.epoch_quiet_ms)
    return 0


def _count_pushes(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(1 for _ in client.scan_iter(match="push:*", count=1000))
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
