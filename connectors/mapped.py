"""A sink adapter: map each item before an inner sink writes it (e.g. Push → KafkaMessage)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from bytewax.outputs import DynamicSink, StatelessSinkPartition

__all__ = ["MappedSink"]

X = TypeVar("X")
Y = TypeVar("Y")


class _MappedPartition(StatelessSinkPartition[X], Generic[X, Y]):
    def __init__(self, inner: StatelessSinkPartition[Y], fn: Callable[[X], Y]) -> None:
        self._inner = inner
        self._fn = fn

    def write_batch(self, items: list[X]) -> None:
        self._inner.write_batch([self._fn(x) for x in items])

    def close(self) -> None:
        self._inner.close()


class MappedSink(DynamicSink[X], Generic[X, Y]):
    """Writes ``fn(item)`` to ``inner`` for every item."""

    def __init__(self, inner: DynamicSink[Y], fn: Callable[[X], Y]) -> None:
        self.inner = inner
        self.fn = fn

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _MappedPartition[X, Y]:
        """Build the inner partition and wrap it."""
        return _MappedPartition(self.inner.build(step_id, worker_index, worker_count), self.fn)
