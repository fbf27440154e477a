"""A source wrapped with hooks around its partitions: same partitions, items and resume
state as the inner source; only when a partition ends, and what is told of it, differs.

:func:`flows.shutdown.stoppable` (a stop request ends every partition) and
:func:`connectors.rules_sources.end_with_input` (the rule-change input ends with the
event input) are both such wrappers, for fixed-partitioned and dynamic sources alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from bytewax.inputs import (
    DynamicSource,
    FixedPartitionedSource,
    Source,
    StatefulSourcePartition,
    StatelessSourcePartition,
)

__all__ = ["PartitionHooks", "wrap_source"]

X = TypeVar("X")
S = TypeVar("S")


class PartitionHooks(Protocol):
    """What a wrapper does around each partition of the inner source."""

    def built(self) -> None:
        """A partition was built on this worker."""

    def before_batch(self) -> None:
        """Before each batch; raise :class:`StopIteration` to end the partition."""

    def ended(self) -> None:
        """The inner partition ended by itself (called once per partition)."""

    def awake(self, at: datetime | None) -> datetime | None:
        """When the partition should be asked again, given the inner partition's wish."""


class _Hooked:
    """The part both partition kinds share: the hooks around ``next_batch``."""

    def __init__(self, inner: Any, hooks: PartitionHooks) -> None:
        self._inner = inner
        self._hooks = hooks
        self._ended = False

    def _next(self) -> Any:
        self._hooks.before_batch()
        try:
            return self._inner.next_batch()
        except StopIteration:
            if not self._ended:
                self._ended = True
                self._hooks.ended()
            raise

    def _awake(self) -> datetime | None:
        return self._hooks.awake(self._inner.next_awake())


class _Part(_Hooked, StatefulSourcePartition[X, S], Generic[X, S]):
    def next_batch(self) -> Iterable[X]:
        return self._next()  # type: ignore[no-any-return]

    def next_awake(self) -> datetime | None:
        return self._awake()

    def snapshot(self) -> S:
        # Also after a stop: the resume state of where it got to.
        return self._inner.snapshot()  # type: ignore[no-any-return]

    def close(self) -> None:
        self._inner.close()


class _StatelessPart(_Hooked, StatelessSourcePartition[X], Generic[X]):
    def next_batch(self) -> Iterable[X]:
        return self._next()  # type: ignore[no-any-return]

    def next_awake(self) -> datetime | None:
        return self._awake()

    def close(self) -> None:
        self._inner.close()


class _FixedSource(FixedPartitionedSource[X, S], Generic[X, S]):
    def __init__(self, inner: FixedPartitionedSource[X, S], hooks: PartitionHooks) -> None:
        self.inner = inner
        self.hooks = hooks

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: S | None) -> _Part[X, S]:
        self.hooks.built()
        return _Part(self.inner.build_part(step_id, for_part, resume_state), self.hooks)


class _DynamicSource(DynamicSource[X], Generic[X]):
    def __init__(self, inner: DynamicSource[X], hooks: PartitionHooks) -> None:
        self.inner = inner
        self.hooks = hooks

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _StatelessPart[X]:
        self.hooks.built()
        return _StatelessPart(self.inner.build(step_id, worker_index, worker_count), self.hooks)


def wrap_source(source: Source[X], hooks: PartitionHooks) -> Source[X]:
    """``source`` with ``hooks`` around each of its partitions (fixed or dynamic)."""
    if isinstance(source, FixedPartitionedSource):
        return _FixedSource(source, hooks)
    if isinstance(source, DynamicSource):
        return _DynamicSource(source, hooks)
    raise TypeError(f"cannot wrap a {type(source).__name__}")
