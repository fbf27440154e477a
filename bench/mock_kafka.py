"""librdkafka's mock cluster as a stand-in broker whose fetch cost has a bound.

The latency targets of issue #6 cannot be judged on Tansu's memory storage: it lists
every stored batch of a partition on each fetch, so send -> consume latency grows with
the run (``python -m bench broker_fetch``). No Apache Kafka can run on this host.
librdkafka (inside confluent-kafka's wheel) has a mock cluster of its own, in C, made
for client tests: a client configured with ``test.mock.num.brokers`` starts it inside
its process and it listens on a real TCP port of 127.0.0.1, so other processes (the
engine, the load producer, the readers) can use it as a broker.

What it is not: a Kafka broker. It keeps records in memory, at most 5 MiB or 100,000
batches per partition (older ones are dropped), finds a fetch's position by walking a
partition's batches in C, and answers only the requests librdkafka clients need for
producing and consuming (no CreateTopics, DeleteTopics or configs).
A topic is made on first use with 4 partitions (its default, not settable from a
client's configuration): :func:`ensure_topics` asks for the topics' metadata with a
producer, which lets the broker create them. Figures taken on it say what the engine
does on a broker that keeps up; they do not replace the Tansu figures that the targets
are judged on.

``python -m bench.mock_kafka`` starts one and prints ``bootstrap.servers=HOST:PORT``,
then serves until SIGTERM or SIGINT; :func:`start_mock_kafka` runs that as a child
process and returns it as a :class:`bench.services.Service`.
"""

from __future__ import annotations

import logging
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from bench.services import Service, ServiceError, _tail

__all__ = ["PARTITIONS", "ensure_topics", "start_mock_kafka"]

PARTITIONS = 4
"""Partitions of a topic the mock cluster makes on first use (its default)."""
START_TIMEOUT_S = 20.0
_MARK = "bootstrap.servers="
_LOGGED = "replaced with "


def start_mock_kafka(log_path: Path) -> Service:
    """Start ``python -m bench.mock_kafka`` and wait for its address."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "bench.mock_kafka"],
                            cwd=Path(__file__).resolve().parent.parent,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith(_MARK):
                return Service("mock-kafka", proc, line[len(_MARK):].strip(), log_path)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait(5)
    raise ServiceError(f"librdkafka's mock cluster did not start; log {log_path}:\n"
                       f"{_tail(log_path)}")


def ensure_topics(brokers: str, names: Iterable[str], timeout_s: float = 10.0) -> dict[str, int]:
    """Have the mock cluster make ``names`` (a producer's metadata request may create
    topics); return each topic's partition count."""
    from confluent_kafka import Producer  # noqa: PLC0415

    producer = Producer({"bootstrap.servers": brokers})
    out: dict[str, int] = {}
    for name in names:
        deadline = time.monotonic() + timeout_s
        while True:
            meta = producer.list_topics(name, timeout=timeout_s).topics.get(name)
            if meta is not None and meta.error is None and meta.partitions:
                out[name] = len(meta.partitions)
                break
            if time.monotonic() > deadline:
                raise ServiceError(f"the mock cluster did not make topic {name!r}")
            time.sleep(0.05)
    producer.flush(1)
    return out


def main() -> int:
    """Serve one mock cluster (one broker) until SIGTERM or SIGINT."""
    from confluent_kafka import Producer  # noqa: PLC0415

    lines: queue.SimpleQueue[str] = queue.SimpleQueue()

    class _Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.put(record.getMessage())

    logger = logging.getLogger("bench.mock_kafka")
    logger.addHandler(_Lines())
    logger.setLevel(logging.DEBUG)
    # The client only hosts the cluster; it logs the cluster's address once (a notice).
    host = Producer({"bootstrap.servers": "unused:9092", "test.mock.num.brokers": 1,
                     "logger": logger})
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    told = False
    while not stop:
        host.poll(0.2)
        while not lines.empty():
            msg = lines.get()
            if not told and _LOGGED in msg:
                print(_MARK + msg.split(_LOGGED, 1)[1].split()[0], flush=True)
                told = True
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
