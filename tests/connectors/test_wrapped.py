"""connectors.wrapped: two fixed-partitioned sources read as one; the epoch grid."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.inputs import (
    DynamicSource,
    FixedPartitionedSource,
    StatefulSourcePartition,
    StatelessSourcePartition,
)
from bytewax.testing import TestingSink, cluster_main

from connectors.wrapped import EpochGrid, with_partitions_of


class _Part(StatefulSourcePartition[str, int]):
    def __init__(self, name: str, items: list[str], at: int) -> None:
        self.name, self.items, self.at = name, items, at

    def next_batch(self) -> list[str]:
        if self.at >= len(self.items):
            raise StopIteration
        self.at += 1
        return [self.items[self.at - 1]]

    def snapshot(self) -> int:
        return self.at


class _Source(FixedPartitionedSource[str, int]):
    def __init__(self, parts: dict[str, list[str]]) -> None:
        self.parts = parts
        self.built: list[tuple[str, str, int | None]] = []

    def list_parts(self) -> list[str]:
        return list(self.parts)

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Part:
        self.built.append((step_id, for_part, resume_state))
        return _Part(for_part, self.parts[for_part], resume_state or 0)


def test_the_joined_source_has_both_sources_partitions_each_built_by_its_own() -> None:
    main = _Source({"events/0": ["a", "b"], "events/1": ["c"]})
    extra = _Source({"rules": ["r1", "r2"]})
    joined = with_partitions_of(main, extra, "control:")
    assert isinstance(joined, FixedPartitionedSource)
    assert joined.list_parts() == ["events/0", "events/1", "control:rules"]

    part = joined.build_part("in", "control:rules", 1)  # resumed past "r1"
    assert part.next_batch() == ["r2"]
    assert extra.built == [("in", "rules", 1)] and main.built == []
    joined.build_part("in", "events/1", None)
    assert main.built == [("in", "events/1", None)]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_flow_reads_every_item_of_both_through_one_input_step(workers: int) -> None:
    main = _Source({"events/0": ["a", "b"], "events/1": ["c"]})
    extra = _Source({"rules": ["r1", "r2"]})
    flow = Dataflow("joined")
    out: list[Any] = []
    op.output("out", op.input("in", flow, with_partitions_of(main, extra, "control:")),
              TestingSink(out))
    cluster_main(flow, [], 0, worker_count_per_proc=workers)  # type: ignore[no-untyped-call]
    assert sorted(out) == ["a", "b", "c", "r1", "r2"]


def test_a_main_partition_named_like_the_other_sources_is_refused() -> None:
    joined = with_partitions_of(_Source({"control:x": []}), _Source({"x": []}), "control:")
    with pytest.raises(ValueError, match="control:"):
        joined.list_parts()


class _Dyn(DynamicSource[str]):
    def build(self, step_id: str, worker_index: int,
              worker_count: int) -> StatelessSourcePartition[str]:
        raise AssertionError("not built")


def test_only_fixed_partitioned_sources_can_be_joined() -> None:
    with pytest.raises(TypeError, match="fixed-partitioned"):
        with_partitions_of(_Dyn(), _Source({}), "control:")


# --- EpochGrid ------------------------------------------------------------------------


def _grid(quiet_ms: float = 20.0) -> tuple[EpochGrid, list[float], list[int]]:
    clock, worker = [1000.0], [1]
    grid = EpochGrid(timedelta(seconds=1), timedelta(milliseconds=quiet_ms),
                     now=lambda: clock[0], worker=lambda: worker[0])
    return grid, clock, worker


def _at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def test_the_runtime_interval_is_the_epoch_less_half_the_quiet_window() -> None:
    grid, _, _ = _grid(20)
    assert grid.runtime_interval == timedelta(milliseconds=990)


@pytest.mark.parametrize("quiet_ms", [0, -1, 500, 600])
def test_a_quiet_window_must_be_positive_and_under_half_the_epoch(quiet_ms: float) -> None:
    with pytest.raises(ValueError, match="quiet"):
        EpochGrid(timedelta(seconds=1), timedelta(milliseconds=quiet_ms))


def test_wake_ups_near_an_epoch_end_move_to_it_and_others_stay() -> None:
    grid, clock, _ = _grid(20)
    assert grid.awake(None) is None  # the first ask: this worker's first epoch starts now
    clock[0] = 1000.5
    assert grid.awake(_at(1000.9)) == _at(1000.9)  # before the window
    assert grid.awake(_at(1000.979)) == _at(1000.979)
    assert grid.awake(_at(1000.985)) == _at(1001.0)  # in the quiet window: to the end
    assert grid.awake(_at(1001.01)) == _at(1001.0)  # just after it: back to the end
    assert grid.awake(_at(1001.03)) == _at(1001.03)
    assert grid.awake(_at(1002.995)) == _at(1003.0)  # a later epoch's end alike
    assert grid.awake(None) is None  # "at once", well before the window
    clock[0] = 1000.99
    assert grid.awake(None) == _at(1001.0)  # "at once" inside the window waits
    assert grid.awake(_at(1000.2)) == _at(1001.0)  # so does a time already past
    clock[0] = 1001.005  # the end has passed: nothing is moved back to it (no spinning),
    assert grid.awake(None) is None
    assert grid.awake(_at(1001.0055)) == _at(1001.0055)
    assert grid.awake(_at(1001.015)) == _at(1001.006)  # but polled every ms for a while
    clock[0] = 1001.021
    assert grid.awake(_at(1001.031)) == _at(1001.031)


def test_each_worker_keeps_its_own_schedule() -> None:
    grid, clock, worker = _grid(20)
    grid.awake(None)  # worker 1 starts at 1000.0
    clock[0], worker[0] = 1000.3, 2
    grid.awake(None)  # worker 2 at 1000.3
    clock[0] = 1000.5
    assert grid.awake(_at(1001.29)) == _at(1001.3)
    worker[0] = 1
    assert grid.awake(_at(1001.29)) == _at(1001.29)
    assert grid.awake(_at(1000.99)) == _at(1001.0)


def _epoch_ends(quiet_ms: float, epochs: int, late: dict[int, float],
                seed: int = 3) -> list[float]:
    """One worker's input step as Bytewax 0.21.1 runs it (``src/inputs.rs``,
    ``partitioned_input``), one partition resting 10 ms between polls, wrapped in an
    :class:`EpochGrid` (1 s epochs): each activation comes up to 0.5 ms after the
    partition's wake-up time, and ends the epoch if the runtime interval has passed
    since the epoch started (then the next one starts). In epoch ``k`` of ``late``, the
    activation that would end it comes ``late[k]`` s late (a long batch before it).
    Returns how far after its grid point (``k`` s after the start) each epoch ended."""
    rng = random.Random(seed)
    clock = [0.0]
    grid = (EpochGrid(timedelta(seconds=1), timedelta(milliseconds=quiet_ms),
                      now=lambda: clock[0], worker=lambda: 1)
            if quiet_ms else None)  # 0: no grid, Bytewax's rule alone
    interval = grid.runtime_interval.total_seconds() if grid is not None else 1.0

    def ask(at: float | None) -> float:
        got = grid.awake(None if at is None else _at(at)) if grid is not None else (
            None if at is None else _at(at))
        return clock[0] if got is None else got.timestamp()

    epoch, started, ends = 0, 0.0, []
    awake = ask(None)
    stalled = set()
    while epoch < epochs:
        t = max(awake, clock[0]) + rng.uniform(0.0, 0.0005)
        if epoch in late and epoch not in stalled and t - started >= interval:
            stalled.add(epoch)
            t += late[epoch]
        clock[0] = t
        awake = ask(t + 0.010)
        if t - started >= interval:
            epoch += 1
            started = t
            ends.append(t - epoch)
    return ends


def test_a_model_worker_ends_its_epochs_on_its_grid_and_returns_to_it_when_late() -> None:
    ends = _epoch_ends(20, 120, late={20: 0.2, 90: 0.016})
    on_time = lambda e: 0 <= e < 0.001  # noqa: E731  at the grid point (+ the jitter)
    assert all(on_time(e) for e in ends[:20]), ends[:20]
    # 200 ms late: each later epoch ends less late (by up to half the quiet window, 10 ms;
    # here, resting 10 ms between polls, about 3 ms) until it is on time again, and stays
    assert 0.2 <= ends[20] < 0.201, ends[20]
    back = next((k for k in range(21, 90) if on_time(ends[k])), None)
    assert back is not None, ends[20:90]
    assert all(b <= a + 0.0005 for a, b in itertools.pairwise(ends[20:back + 1])), ends[20:back]
    assert all(on_time(e) for e in ends[back:90]), ends[back:90]
    # 16 ms late: on time again two epochs later
    assert 0.016 <= ends[90] < 0.017, ends[90]
    assert all(on_time(e) for e in ends[92:]), ends[90:]


def test_without_the_grid_the_same_model_worker_ends_each_epoch_later() -> None:
    # What the grid corrects, in the same model (so the test above cannot pass merely
    # because the model never runs late): Bytewax starts the next epoch when the last
    # one ended, so each epoch's lateness (up to a rest) adds up.
    ends = _epoch_ends(0, 60, late={})
    assert ends[-1] > 0.1, ends[-1]
    assert all(b >= a for a, b in itertools.pairwise(ends)), ends
