"""Reusable pieces for fault tests: the engine as a process, a fixed stream, readers.

* :class:`Engine` runs ``touchstream run`` as a separate process (its own log file per
  start), and kills, stops or restarts it.
* :class:`RunTopics` names one run's Kafka topics (inputs may be shared between runs,
  outputs never are) and passes them to the engine through the environment.
* :class:`Scenario` makes a fixed, seeded stream of customer scenarios whose outcome
  cannot depend on when the engine is killed or restarted (see its docstring).
* :class:`Receiver` is a webhook receiver that verifies every Standard Webhooks
  signature and counts deliveries per ``webhook-id``.
* :func:`read_push_streams`, :func:`read_topic` read a run's outputs;
  :func:`compare` sets a run's outputs against a reference run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
import yaml
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from standardwebhooks.webhooks import Webhook

from connectors.kafka import create_topics
from flows.model import Profile
from state.redis_store import RedisProfileStore

__all__ = [
    "SECRET",
    "Comparison",
    "Engine",
    "PushEntry",
    "Receiver",
    "RunTopics",
    "Scenario",
    "compare",
    "dead_letter_ids",
    "now_ms",
    "read_push_streams",
    "read_topic",
    "redis_db_url",
    "touchstream_argv",
    "wait_until",
    "write_rules",
]

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a test secret, as in the e2e test
S = 1000
MIN = 60 * S
H = 60 * MIN


def now_ms() -> int:
    """The wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def wait_until(cond: Callable[[], bool], timeout_s: float, every_s: float = 0.1) -> bool:
    """Poll ``cond`` until it holds or ``timeout_s`` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every_s)


def redis_db_url(redis_url: str, db: int) -> str:
    """``redis_url`` (``redis://host:port/N``) pointing at database ``db`` instead."""
    base = redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url
    return f"{base}/{db}"


# --- topics -----------------------------------------------------------------------------


INPUTS = ("clicks", "location", "calls")
OUTPUTS = ("pushes", "alerts", "alerts_dlq", "dead_letters", "stats")


@dataclass(frozen=True)
class RunTopics:
    """One run's topic names, by kind (``clicks``, ..., ``pushes``, ``alerts``, ...)."""

    names: dict[str, str]

    @classmethod
    def make(cls, brokers: str, tag: str, inputs: RunTopics | None = None,
             partitions: int = 3) -> RunTopics:
        """Create fresh uniquely named topics; reuse ``inputs``' input topics if given."""
        suffix = uuid.uuid4().hex[:8]
        names = {k: f"{tag}-{k}-{suffix}" for k in OUTPUTS}
        if inputs is not None:
            names.update({k: inputs.names[k] for k in INPUTS})
        else:
            names.update({k: f"{tag}-{k}-{suffix}" for k in INPUTS})
        create_topics(brokers, {n: (partitions if k in INPUTS else 1)
                                for k, n in names.items()})
        return cls(names)

    def __getitem__(self, kind: str) -> str:
        return self.names[kind]

    def env(self) -> dict[str, str]:
        """``TOUCHSTREAM_KAFKA__<KIND>_TOPIC`` for every topic."""
        return {f"TOUCHSTREAM_KAFKA__{k.upper()}_TOPIC": v for k, v in self.names.items()}


# --- the engine as a process ------------------------------------------------------------


def touchstream_argv() -> list[str]:
    """The command that runs ``touchstream`` from this virtualenv."""
    exe = Path(sys.executable).parent / "touchstream"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]


class Engine:
    """``touchstream run ...`` as a child process, started and stopped on demand.

    Each start writes its own log ``log_dir/<name>-<n>.log`` (stdout and stderr).
    ``starts`` counts the starts, ``kills`` the SIGKILLs.
    """

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str],
                 log_dir: Path) -> None:
        self.name = name
        self.argv = [*touchstream_argv(), "run", *args]
        self.env = {**os.environ, **env}
        self.env.pop("TOUCHSTREAM_CONFIG", None)
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self.log_path: Path | None = None

    def start(self) -> None:
        """Start the process (the previous one must have exited)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.log_path = self.log_dir / f"{self.name}-{self.starts}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no handler, no flush, no snapshot."""
        assert self.proc is not None and self.running, f"{self.name} is not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` (the process keeps running until it handles it)."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        """Wait for the exit; its status (SIGKILL and fail if it takes longer)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"{self.name} did not exit within {timeout_s} s; log:\n"
                                 f"{self.log_tail()}") from None

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit; its status."""
        self.send(sig)
        return self.wait(timeout_s)

    def wait_logged(self, text: str, timeout_s: float = 60.0) -> None:
        """Wait until the current start's log holds ``text`` (the process got that far)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.log_path is not None and self.log_path.exists() and \
                    text in self.log_path.read_text(errors="replace"):
                return
            assert self.running, f"{self.name} exited before logging {text!r}:\n" \
                f"{self.log_tail()}"
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not log {text!r} within {timeout_s} s:\n"
                             f"{self.log_tail()}")

    def ensure_dead(self) -> None:
        """SIGKILL if still running (test teardown)."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the current start's log."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def engine_args(brokers: str, redis_url: str, webhook_url: str, rules: Path,
                recovery_dir: Path, snapshot_interval_s: float,
                extra: Iterable[str] = ()) -> list[str]:
    """The ``touchstream run`` arguments for a fault test (no secret in them)."""
    return ["--kafka", brokers, "--redis", redis_url, "--webhook", webhook_url,
            "--rules", str(rules), "--recovery-dir", str(recovery_dir),
            "--snapshot-interval", str(snapshot_interval_s), *extra]


def engine_env(topics: RunTopics, **settings: str) -> dict[str, str]:
    """Environment for the engine: topics, the webhook secret, fast stats, extras."""
    env = {**topics.env(), "TOUCHSTREAM_WEBHOOK_SECRET": SECRET,
           "TOUCHSTREAM_ENGINE__STATS_INTERVAL_S": "1",
           "TOUCHSTREAM_RECOVERY__ENABLED": "true"}
    env.update(settings)
    return env


# --- rules --------------------------------------------------------------------------------


def write_rules(path: Path, dwell_s: float) -> Path:
    """The default rules with help after ``dwell_s`` and step friction at a 100 s mean."""
    doc = yaml.safe_load((ROOT / "flows" / "default_rules.yaml").read_text())
    for r in doc["rules"]:
        if r["id"] == "help-sprite":
            r["trigger"]["dwell"] = f"{int(dwell_s * 1000)}ms"
    path.write_text(yaml.safe_dump(doc))
    return path


# --- the stream ---------------------------------------------------------------------------


Record = tuple[str, bytes | None, bytes]
"""(input kind, message key, value)."""

KINDS = ("cinema", "calls", "setup", "browse", "stuck", "bad", "cohort")
WEIGHTS = (4, 3, 2, 3, 2, 1, 1)


@dataclass(frozen=True)
class Unit:
    """One scenario unit: its kind and its customers."""

    index: int
    kind: str
    customers: tuple[str, ...]


@dataclass
class Scenario:
    """A fixed, seeded stream of customer scenarios, produced unit by unit in real time.

    :meth:`plan` fixes the units (kinds, customers, profiles) from the seed; each unit is
    then produced in one burst with event times taken when it is produced (so they are
    fresh live). No outcome depends on when the engine is killed or restarted:

    * ``cinema``: a cinema visit 2 h ago and one now -> one cinema-pay push;
    * ``calls``: three quiet intervals (stale: history only) then a busy one -> call-spike;
    * ``setup``: a session by a customer subscribed to care_link but not set up ->
      setup-first on the terminal (the profile is in Redis); no step is entered;
    * ``browse``: a session with module, demo, rating, order, no step -> nothing;
    * ``stuck``: a session that enters a step and sends nothing more -> after the
      dwell, one help-sprite push and one customer dwell alert, whenever the timer is
      looked at (the only units with a live dwell timer);
    * ``cohort``: five customers on one step, entering 10 min ahead of now (event time)
      and leaving 120-160 s later, all at the same leave time -> one step-friction
      alert whichever visit arrives fifth; their help timers are due long after the
      test, and their exits come in the same burst, so they never race;
    * ``bad``: a message that is not JSON and one whose key is not its customer ->
      two dead letters.

    ``stuck_times`` records when each stuck customer entered its step (event time).
    """

    seed: int
    tag: str
    profiles: list[Profile] = field(default_factory=list)
    stuck_times: dict[str, int] = field(default_factory=dict)
    planned: int = 0

    def plan(self, count: int, kinds: Sequence[str] | None = None) -> list[Unit]:
        """``count`` units in a seeded order (every kind at least once when count allows),
        or exactly ``kinds`` if given; their profiles are added to :attr:`profiles`."""
        r = random.Random(f"{self.tag}-{self.seed}")
        if kinds is None:
            chosen = list(KINDS)[:count]
            chosen += r.choices(KINDS, WEIGHTS, k=max(0, count - len(chosen)))
            r.shuffle(chosen)
        else:
            chosen = list(kinds)
        units = []
        base = self.planned
        self.planned += len(chosen)
        for i, kind in enumerate(chosen):
            n = 5 if kind == "cohort" else 1
            cids = tuple(f"{self.tag}{self.seed % 1000:03d}{base + i:05d}{j}" for j in range(n))
            if kind == "setup":
                self.profiles.append(Profile(cids[0], subscriptions=frozenset({"care_link"})))
            units.append(Unit(base + i, kind, cids))
        return units

    def make(self, unit: Unit, now: int) -> list[Record]:
        """The records of one unit with event times around ``now``."""
        eid = f"{self.tag}-{self.seed}-{unit.index}"
        recs: list[Record] = []

        def rec(topic: str, ev: dict[str, Any]) -> None:
            ev.setdefault("event_id", f"{eid}-{len(recs)}")
            recs.append((topic, ev["customer_id"].encode(), json.dumps(ev).encode()))

        def click(cid: str, ts: int, action: str, module: str | None = None,
                  step: str | None = None, terminal: str = "H01-T01") -> None:
            ev: dict[str, Any] = {"type": "click", "customer_id": cid, "ts": ts,
                                  "terminal_id": terminal, "hall_id": terminal[:3],
                                  "action": action}
            if module:
                ev["module"] = module
            if step:
                ev["step"] = step
            rec("clicks", ev)

        term = f"H{KINDS.index(unit.kind):02d}-T{unit.index:04d}"
        cid = unit.customers[0]
        if unit.kind == "cinema":
            for ts in (now - 2 * H, now):
                rec("location", {"type": "location", "customer_id": cid, "ts": ts,
                                 "cell_id": "cell-cinema-1", "poi": "cinema"})
        elif unit.kind == "calls":
            for i, total in enumerate((2, 3, 2)):
                rec("calls", {"type": "calls", "customer_id": cid,
                              "ts": now - (30 - 5 * i) * MIN, "interval_s": 300,
                              "calls_in": total, "calls_out": 0, "missed": 0})
            rec("calls", {"type": "calls", "customer_id": cid, "ts": now, "interval_s": 300,
                          "calls_in": 12, "calls_out": 4, "missed": 3})
        elif unit.kind == "setup":
            click(cid, now, "session_start", terminal=term)
            click(cid, now + 1, "module_enter", "care_link", terminal=term)
            click(cid, now + 2, "session_end", terminal=term)
        elif unit.kind == "browse":
            click(cid, now, "session_start", terminal=term)
            click(cid, now + 1, "module_enter", "video", terminal=term)
            click(cid, now + 2, "demo_play", "video", terminal=term)
            click(cid, now + 3, "rate", "video", terminal=term)
            click(cid, now + 4, "order", "video", terminal=term)
            click(cid, now + 5, "session_end", terminal=term)
        elif unit.kind == "stuck":
            click(cid, now - 2, "session_start", terminal=term)
            click(cid, now - 1, "module_enter", "remote_cam", terminal=term)
            click(cid, now, "step_enter", "remote_cam", "door_sensor", terminal=term)
            self.stuck_times[cid] = now
        elif unit.kind == "cohort":
            step = f"step-{unit.index}"
            leave = now + 10 * MIN + 160 * S
            for j, c in enumerate(unit.customers):
                click(c, now, "session_start", terminal=f"{term}-{j}")
                click(c, now + 10 * MIN + j * 10 * S, "step_enter", "remote_cam", step,
                      terminal=f"{term}-{j}")
                click(c, leave, "step_exit", "remote_cam", step, terminal=f"{term}-{j}")
        elif unit.kind == "bad":
            recs.append(("clicks", cid.encode(), b"{not json " + eid.encode()))
            rec("location", {"type": "location", "customer_id": cid, "ts": now,
                             "cell_id": "x"})
            recs[-1] = ("location", b"someone-else", recs[-1][2])
        else:
            raise ValueError(unit.kind)
        return recs


class StreamProducer:
    """Produce a scenario's units to the input topics, one burst per unit."""

    def __init__(self, brokers: str, topics: RunTopics, scenario: Scenario) -> None:
        self.topics = topics
        self.scenario = scenario
        self.producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5,
                                  "enable.idempotence": True})
        self.sent = 0

    def unit(self, unit: Unit) -> None:
        """Produce one unit now and wait for the broker to take it."""
        for topic_kind, key, value in self.scenario.make(unit, now_ms()):
            self.producer.produce(self.topics[topic_kind], value, key=key)
            self.sent += 1
        assert self.producer.flush(10) == 0, "the test producer could not deliver"

    def run(self, units: Sequence[Unit], gap_s: float,
            stop: threading.Event | None = None) -> None:
        """Produce ``units`` one every ``gap_s`` until done or ``stop`` is set."""
        for u in units:
            if stop is not None and stop.is_set():
                return
            self.unit(u)
            time.sleep(gap_s)


def load_profiles(redis_url: str, profiles: Iterable[Profile]) -> int:
    """Put profiles into the Redis at ``redis_url``; how many."""
    client = redis.Redis.from_url(redis_url)
    try:
        return RedisProfileStore(client).put_many(list(profiles))
    finally:
        client.close()


# --- webhook receiver -------------------------------------------------------------------


class Receiver:
    """A local webhook receiver: verifies every signature, counts deliveries per id."""

    def __init__(self, secret: str = SECRET) -> None:
        self.deliveries: Counter[str] = Counter()
        self.bodies: dict[str, dict[str, Any]] = {}
        self.bad_signatures = 0
        self.truncated = 0
        self.lock = threading.Lock()
        receiver = self
        verifier = Webhook(secret)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["content-length"])
                body = self.rfile.read(length)
                if len(body) < length:
                    # The sender was killed mid-request: nothing was delivered (it will
                    # send again from its outbox), and it is no forged signature.
                    with receiver.lock:
                        receiver.truncated += 1
                    return
                try:
                    verifier.verify(body, dict(self.headers.items()))
                except Exception:
                    with receiver.lock:
                        receiver.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                with receiver.lock:
                    wid = self.headers["webhook-id"]
                    receiver.deliveries[wid] += 1
                    receiver.bodies[wid] = json.loads(body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/touchstream"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ids(self) -> Counter[str]:
        """Deliveries per alert id so far."""
        with self.lock:
            return Counter(self.deliveries)

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def receiving(secret: str = SECRET) -> Iterator[Receiver]:
    """A :class:`Receiver` for the duration of the block."""
    r = Receiver(secret)
    try:
        yield r
    finally:
        r.close()


# --- reading outputs ----------------------------------------------------------------------


@dataclass(frozen=True)
class PushEntry:
    """One push as stored in a Redis push stream."""

    stream: str
    entry_ms: int  # when Redis appended it (the stream entry id's time part)
    push: dict[str, Any]


def read_push_streams(redis_url: str, prefix: str = "push:") -> list[PushEntry]:
    """Every push in every ``push:*`` stream (``XRANGE``), oldest first per stream."""
    client = redis.Redis.from_url(redis_url)
    try:
        out: list[PushEntry] = []
        for key in sorted(k.decode() for k in client.scan_iter(f"{prefix}*", count=1000)):
            if client.type(key) != b"stream":
                continue
            entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(key)  # type: ignore[assignment]
            for entry_id, fields in entries:
                doc = json.loads(fields[b"data"])
                out.append(PushEntry(key, int(entry_id.decode().split("-")[0]), doc))
        return out
    finally:
        client.close()


def read_topic(brokers: str, topic: str, timeout_s: float = 20.0,
               idle_s: float = 1.0) -> list[Message]:
    """Every message of ``topic`` (all partitions): read past the high watermarks, then
    until nothing came for ``idle_s`` (Tansu can report the last batch's base offset + 1
    as the high watermark, so the watermark alone may stop short)."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": f"faults-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        want: dict[int, int] = {}
        for p in md.partitions:
            _low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > 0:
                want[p] = high
        c.assign([TopicPartition(topic, p, 0) for p in md.partitions])
        out: list[Message] = []
        deadline = time.monotonic() + timeout_s
        idle_until = time.monotonic() + idle_s
        while time.monotonic() < deadline and (want or time.monotonic() < idle_until):
            m = c.poll(0.1)
            if m is None or m.error():
                continue
            out.append(m)
            idle_until = time.monotonic() + idle_s
            offset = m.offset()
            if offset is not None and offset + 1 >= want.get(m.partition() or 0, 0):
                want.pop(m.partition() or 0, None)
        assert not want, f"{topic}: not read to the high watermark: {want}"
        return out
    finally:
        c.close()


def topic_docs(brokers: str, topic: str) -> list[dict[str, Any]]:
    """The JSON bodies of every message of ``topic``."""
    return [json.loads(m.value() or b"null") for m in read_topic(brokers, topic)]


def dead_letter_ids(docs: Iterable[dict[str, Any]]) -> Counter[tuple[str, int]]:
    """Dead letters by a stable identity: (source topic/partition, offset)."""
    return Counter((d["source"], d["pos"]) for d in docs)


# --- comparing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """One output kind of a run against the reference: what is missing or repeated."""

    name: str
    expected: int  # distinct items of the reference
    seen: int  # distinct items of the run
    lost: int  # in the reference, not in the run
    extra: int  # in the run, not in the reference
    repeated: int  # deliveries beyond the first, in the run
    reference_repeated: int

    def line(self) -> str:
        """A one-line summary for the test output."""
        return (f"{self.name}: expected {self.expected}, seen {self.seen}, lost {self.lost}, "
                f"extra {self.extra}, repeated {self.repeated} "
                f"(reference repeated {self.reference_repeated})")


def compare(name: str, reference: Counter[Any], run: Counter[Any]) -> Comparison:
    """Compare multisets of identities (item -> times delivered)."""
    ref, got = set(reference), set(run)
    return Comparison(
        name=name,
        expected=len(ref),
        seen=len(got),
        lost=len(ref - got),
        extra=len(got - ref),
        repeated=sum(n - 1 for n in run.values() if n > 1),
        reference_repeated=sum(n - 1 for n in reference.values() if n > 1),
    )


def push_counts(entries: Iterable[PushEntry]) -> Counter[tuple[str, str]]:
    """Pushes per (stream, push id)."""
    return Counter((e.stream, e.push["push_id"]) for e in entries)
