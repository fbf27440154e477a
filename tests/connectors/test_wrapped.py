"""connectors.wrapped.with_partitions_of: two fixed-partitioned sources read as one."""

from __future__ import annotations

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

from connectors.wrapped import with_partitions_of


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
