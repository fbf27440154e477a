"""Recovery at unit level: the live flow under Bytewax ``run_main`` with a RecoveryConfig.

* A crash (``TestingSource.ABORT``) after a snapshot, then a restart that does not
  read the old events again: the shard state from the snapshot still holds the
  customer's pending dwell timer (help fires after the restart, at its deadline) and
  their cinema history (a second visit after the restart earns the push). A control
  run without that snapshot gets neither.
* A clean stop (:class:`flows.shutdown.StopRequest`) ends the input, emits no push at
  the end of input, and the next start goes on from exactly where it stopped.
* The recovery directory is made on first start and kept; the CLI maps its recovery
  flags and refuses a password in ``--redis``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from contextlib import redirect_stderr
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from flows.cli import _parser, _recovery_overrides
from flows.cli import main as cli_main
from flows.codec import json_dumps
from flows.engine import shard_of
from flows.experience import Outputs, build_flow
from flows.model import Push, RawRecord
from flows.rules import load_default_rules
from flows.runner import RecoveryDirError, prepare_recovery, recovery_dir
from flows.settings import load_settings
from flows.shutdown import StopRequest, stoppable
from state.profiles import InMemoryProfileStore

T0 = 1_700_000_000_000
S = 1000
H = 3_600 * S
EPOCH = timedelta(milliseconds=50)
STUCK, CINEMA = "13800000001", "13800000002"


def _rec(pos: int, ev: dict[str, Any]) -> RawRecord:
    return RawRecord("touch.clicks/0" if ev["type"] == "click" else "net.location/0", pos,
                     json_dumps(ev), ev["customer_id"].encode())


def _click(ts: int, action: str, **kw: Any) -> dict[str, Any]:
    return {"type": "click", "customer_id": STUCK, "ts": ts, "terminal_id": "H01-T01",
            "hall_id": "H01", "action": action, "event_id": f"{action}-{ts}", **kw}


def _cinema(ts: int) -> dict[str, Any]:
    return {"type": "location", "customer_id": CINEMA, "ts": ts, "cell_id": "c-1",
            "poi": "cinema", "event_id": f"cinema-{ts}"}


class _Recording(FixedPartitionedSource[Any, Any]):
    """Wrap a source: record every item it hands out; optionally set ``stop`` after
    ``stop_after`` items (the stop takes effect at the next batch)."""

    def __init__(self, inner: FixedPartitionedSource[Any, Any], seen: list[Any],
                 stop: StopRequest | None = None, stop_after: int | None = None) -> None:
        self.inner, self.seen, self.stop, self.stop_after = inner, seen, stop, stop_after

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _RecordingPart:
        return _RecordingPart(self.inner.build_part(step_id, for_part, resume_state), self)


class _RecordingPart(StatefulSourcePartition[Any, Any]):
    def __init__(self, inner: StatefulSourcePartition[Any, Any], src: _Recording) -> None:
        self.inner, self.src = inner, src

    def next_batch(self) -> Iterable[Any]:
        batch = list(self.inner.next_batch())
        self.src.seen.extend(batch)
        s = self.src
        if s.stop is not None and s.stop_after is not None and len(s.seen) >= s.stop_after:
            s.stop.set("test")
        return batch

    def next_awake(self) -> Any:
        return self.inner.next_awake()

    def snapshot(self) -> Any:
        return self.inner.snapshot()

    def close(self) -> None:
        self.inner.close()


def _run_live(items: list[Any], clock: list[int], rec_dir: Path | None,
              seen: list[Any], stop: StopRequest | None = None,
              stop_after: int | None = None) -> list[Push]:
    """One run of the live flow (one worker) over ``items``; the pushes it emitted."""
    settings = load_settings(mode="live", engine={"shards": 4, "stats_interval_s": 3600})
    pushes: list[Push] = []
    source: Any = _Recording(TestingSource(items), seen, stop, stop_after)
    if stop is not None:
        source = stoppable(source, stop)
    flow = build_flow(settings, source=source, outputs=Outputs(pushes=[TestingSink(pushes)]),
                      rules=load_default_rules(), profiles=InMemoryProfileStore(),
                      now_ms=lambda: clock[0], recovery=rec_dir is not None)
    run_main(flow, epoch_interval=EPOCH,  # type: ignore[no-untyped-call]
             recovery_config=RecoveryConfig(rec_dir)  # type: ignore[no-untyped-call]
             if rec_dir is not None else None)
    return pushes


def _first_run_items() -> list[Any]:
    return [
        _rec(0, _click(T0 - 2_000, "session_start")),
        _rec(1, _click(T0 - 1_000, "module_enter", module="remote_cam")),
        _rec(2, _click(T0, "step_enter", module="remote_cam", step="door_sensor")),
        _rec(3, _cinema(T0 - 2 * H)),  # history only: too old to trigger anything
    ]


def test_pending_dwell_and_place_history_survive_a_crash(tmp_path: Path) -> None:
    init_db_dir(tmp_path, 1)  # type: ignore[no-untyped-call]
    clock = [T0 + 10 * S]
    dwell = next(r for r in load_default_rules().rules if r.id == "help-sprite").trigger
    tail = [_rec(4, _cinema(T0 + 95 * S)), TestingSource.PAUSE(timedelta(seconds=0.5))]
    items: list[Any] = [*_first_run_items(),
                        # a snapshot is taken during the pause; then the process dies
                        TestingSource.PAUSE(timedelta(seconds=0.4)), TestingSource.ABORT(),
                        *tail]
    seen1: list[Any] = []
    first = _run_live(items, clock, tmp_path, seen1)
    assert first == []  # not due yet, and one cinema visit is not enough
    assert [r.pos for r in seen1 if isinstance(r, RawRecord)][:4] == [0, 1, 2, 3]

    clock[0] = T0 + 100 * S  # past the dwell deadline (90 s)
    seen2: list[Any] = []
    second = _run_live(items, clock, tmp_path, seen2)
    # The restart read only what came after the snapshot: the state did the rest.
    assert [r.pos for r in seen2 if isinstance(r, RawRecord)] == [4]
    by_rule = {p.rule_id: p for p in second}
    assert sorted(by_rule) == ["cinema-pay", "help-sprite"], second
    assert len(second) == 2
    assert by_rule["help-sprite"].customer_id == STUCK
    assert by_rule["help-sprite"].event_ts == T0 + dwell.dwell
    assert by_rule["cinema-pay"].customer_id == CINEMA

    # Control: the same restart without that snapshot earns nothing.
    assert _run_live(tail, clock, None, []) == []


def test_a_customer_untouched_since_a_restart_is_in_the_snapshots_after_it(
    tmp_path: Path
) -> None:
    """Snapshots re-pack only changed customers: one whose shard is busy after a restart
    while they send nothing is kept through the next stop too (their cinema history
    still earns the push in a third run)."""
    init_db_dir(tmp_path, 1)  # type: ignore[no-untyped-call]
    clock = [T0 + 10 * S]
    neighbour = next(c for c in (f"139{i:08d}" for i in range(1000))
                     if shard_of(c, 4) == shard_of(CINEMA, 4))
    mall = {"type": "location", "customer_id": neighbour, "ts": T0 + 20 * S,
            "cell_id": "C9", "poi": "mall", "event_id": "mall-1"}
    items: list[Any] = [
        *_first_run_items(),
        _rec(4, mall),  # the only event of the second run, on the cinema customer's shard
        _rec(5, _cinema(T0 + 95 * S)), TestingSource.PAUSE(timedelta(seconds=0.5)),
    ]
    runs: list[list[Any]] = [[], [], []]
    pushes = [_run_live(items, clock, tmp_path, seen, StopRequest(), stop_after=stop)
              for seen, stop in zip(runs, (4, 1, None), strict=True)]
    assert [[r.pos for r in seen if isinstance(r, RawRecord)] for seen in runs] == [
        [0, 1, 2, 3], [4], [5]]
    assert pushes[:2] == [[], []]
    assert [(p.rule_id, p.customer_id) for p in pushes[2]] == [("cinema-pay", CINEMA)]


def test_a_stop_ends_the_input_emits_nothing_early_and_the_restart_goes_on(
    tmp_path: Path
) -> None:
    init_db_dir(tmp_path, 1)  # type: ignore[no-untyped-call]
    clock = [T0 + 10 * S]
    late = [_rec(4, _cinema(T0 + 95 * S)), _rec(5, _cinema(T0 + 96 * S)),
            TestingSource.PAUSE(timedelta(seconds=0.5))]
    items: list[Any] = [*_first_run_items(), *late]
    seen1: list[Any] = []
    first = _run_live(items, clock, tmp_path, seen1, StopRequest(), stop_after=4)
    # Stopped after the 4th record: the dwell timer is pending, nothing fired at the end.
    assert [r.pos for r in seen1 if isinstance(r, RawRecord)] == [0, 1, 2, 3]
    assert first == []

    clock[0] = T0 + 100 * S
    seen2: list[Any] = []
    second = _run_live(items, clock, tmp_path, seen2, StopRequest())
    assert [r.pos for r in seen2 if isinstance(r, RawRecord)] == [4, 5]
    assert sorted(p.rule_id for p in second) == ["cinema-pay", "help-sprite"]


def test_a_stopped_partition_resumes_at_its_offset_not_as_done(tmp_path: Path) -> None:
    """Plain Bytewax: a partition ended by the stop request is rebuilt from its snapshot
    on the next start; two workers, two partitions, nothing read twice or skipped."""
    from bytewax.testing import cluster_main

    init_db_dir(tmp_path, 1)  # type: ignore[no-untyped-call]

    class Parts(FixedPartitionedSource[int, int]):
        def list_parts(self) -> list[str]:
            return ["a", "b"]

        def build_part(self, step_id: str, for_part: str,
                       resume_state: int | None) -> _Counter:
            return _Counter(for_part, resume_state or 0)

    class _Counter(StatefulSourcePartition[int, int]):
        def __init__(self, name: str, start: int) -> None:
            self.base, self.next = (0 if name == "a" else 1000), start

        def next_batch(self) -> list[int]:
            if self.next >= 50:
                raise StopIteration
            self.next += 1
            if self.next == 20:
                STOP[0].set("test")
            return [self.base + self.next - 1]

        def snapshot(self) -> int:
            return self.next

    STOP = [StopRequest()]
    got: list[list[int]] = []
    for _ in range(3):
        out: list[int] = []
        flow = Dataflow("stop")
        op.output("out", op.input("in", flow, stoppable(Parts(), STOP[0])), TestingSink(out))
        cluster_main(flow, [], 0, epoch_interval=EPOCH,  # type: ignore[no-untyped-call]
                     recovery_config=RecoveryConfig(tmp_path),  # type: ignore[no-untyped-call]
                     worker_count_per_proc=2)
        got.append(out)
        STOP[0] = StopRequest()
    everything = sorted(x for run in got for x in run)
    assert everything == list(range(50)) + list(range(1000, 1050))
    assert got[0] and got[1]  # the first two runs were stopped part way


def test_recovery_dir_is_made_on_first_start_and_kept(tmp_path: Path) -> None:
    d = tmp_path / "rec"
    kafka = load_settings(mode="live", kafka={"brokers": "127.0.0.1:1"},
                          recovery={"dir": d, "partitions": 2})
    cfg = prepare_recovery(kafka)
    assert cfg is not None and sorted(p.name for p in d.iterdir()) == [
        "part-0.sqlite3", "part-1.sqlite3", "touchstream-inputs.json"]
    mtimes = [p.stat().st_mtime_ns for p in sorted(d.iterdir())]
    assert prepare_recovery(kafka) is not None  # found, not made again (that would fail)
    assert [p.stat().st_mtime_ns for p in sorted(d.iterdir())] == mtimes
    # Snapshots of other input topics are refused with a clear message.
    other = load_settings(mode="live", kafka={"brokers": "127.0.0.1:1", "clicks_topic": "x"},
                          recovery={"dir": d})
    with pytest.raises(RecoveryDirError, match="give this run its own --recovery-dir"):
        prepare_recovery(other)
    # So are snapshots of customers in another number of shards (their state would
    # stay in the old shard while their events went to another).
    resharded = load_settings(mode="live", kafka={"brokers": "127.0.0.1:1"},
                              recovery={"dir": d}, engine={"shards": 128})
    with pytest.raises(RecoveryDirError, match=r"in 64 shards.*--shards 64"):
        prepare_recovery(resharded)
    # A file written before the count was noted gets this run's count.
    made = d / "touchstream-inputs.json"
    topics = json.loads(made.read_text())["input_topics"]
    made.write_text(json.dumps({"input_topics": topics}))
    assert prepare_recovery(resharded) is not None
    assert json.loads(made.read_text()) == {"input_topics": topics, "shards": 128}
    with pytest.raises(RecoveryDirError, match=r"in 128 shards.*--shards 128"):
        prepare_recovery(kafka)
    # Off without Kafka (demo) and when disabled.
    assert prepare_recovery(load_settings(mode="live", recovery={"dir": d})) is None
    off = load_settings(mode="live", kafka={"brokers": "x:1"},
                        recovery={"dir": d, "enabled": False})
    assert prepare_recovery(off) is None
    # A multi-process cluster: one directory per process, partitions made by process 0.
    cluster = load_settings(mode="live", kafka={"brokers": "x:1"}, recovery={"dir": d},
                            engine={"addresses": ["127.0.0.1:1", "127.0.0.1:2"],
                                    "process_id": 1})
    assert recovery_dir(cluster) == d / "process-1"
    prepare_recovery(cluster)
    assert not list((d / "process-1").glob("part-*"))


def test_run_recovery_flags_map_to_settings() -> None:
    args = _parser().parse_args(["run", "--recovery-dir", "/var/lib/ts", "--snapshot-interval",
                                 "2.5", "--no-recovery"])
    assert _recovery_overrides(args) == {"recovery": {
        "enabled": False, "dir": Path("/var/lib/ts"), "snapshot_interval_s": 2.5}}
    assert _recovery_overrides(_parser().parse_args(["run"])) == {}
    with pytest.raises(SystemExit), redirect_stderr(io.StringIO()):
        _parser().parse_args(["run", "--snapshot-interval", "0"])


@pytest.mark.parametrize("url", ["redis://:hunter2@127.0.0.1:6390/0",
                                 "redis://app:hunter2@127.0.0.1:6390/0",
                                 "rediss://app:hunter2@redis.example:6380"])
def test_a_password_in_the_redis_flag_is_refused(url: str) -> None:
    err = io.StringIO()
    with redirect_stderr(err):
        rc = cli_main(["run", "--redis", url, "--duration", "1"])
    assert rc == 2
    assert "PASSWORD_FILE" in err.getvalue()
    assert "hunter2" not in err.getvalue()
