"""Files: a JSONL event source and the replay output files.

The replay outputs are written sorted (pushes by event time and id, alerts by time
and id, dead letters by source position) when the flow ends, so the same input gives
byte-identical files whatever the worker count or the interleaving of workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import orjson
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from flows.codec import json_dumps
from flows.engine import Holdout
from flows.model import Alert, DeadLetter, Push, RawRecord

__all__ = [
    "JsonDocSink",
    "JsonlSource",
    "SortedJsonlSink",
    "alert_row",
    "dead_letter_row",
    "holdout_row",
    "push_row",
]

X = TypeVar("X")


class _JsonlPartition(StatefulSourcePartition[RawRecord, list[int]]):
    def __init__(self, path: Path, name: str, batch: int, resume: list[int] | None) -> None:
        self._fh = path.open("rb")
        self._name = name
        self._batch = batch
        self._line = 0
        if resume is not None:
            offset, self._line = resume
            self._fh.seek(offset)

    def next_batch(self) -> list[RawRecord]:
        out: list[RawRecord] = []
        fh = self._fh
        for _ in range(self._batch):
            line = fh.readline()
            if not line:
                if not out:
                    raise StopIteration
                break
            self._line += 1
            body = line.rstrip(b"\r\n")
            if body.strip():
                out.append(RawRecord(self._name, self._line, body))
        return out

    def snapshot(self) -> list[int]:
        return [self._fh.tell(), self._line]

    def close(self) -> None:
        self._fh.close()


@dataclass(frozen=True)
class JsonlSource(FixedPartitionedSource[RawRecord, list[int]]):
    """One JSON event per line; a record's ``pos`` is its line number (blank lines skip).

    ``name`` is the ``source`` written on dead letters (default: the file name).
    """

    path: Path
    name: str | None = None
    batch_size: int = 1000

    def list_parts(self) -> list[str]:
        """One partition: the file."""
        return [str(self.path)]

    def build_part(self, step_id: str, for_part: str,
                   resume_state: list[int] | None) -> _JsonlPartition:
        """Open the file (at the resume offset, if any)."""
        return _JsonlPartition(Path(for_part), self.name or Path(for_part).name,
                               self.batch_size, resume_state)


class _SortedPartition(StatefulSinkPartition[X, None], Generic[X]):
    def __init__(self, path: Path, row: Callable[[X], tuple[Any, bytes]]) -> None:
        self._path = path
        self._row = row
        self._rows: list[tuple[Any, bytes]] = []

    def write_batch(self, values: list[X]) -> None:
        self._rows.extend(self._row(v) for v in values)

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self._rows.sort(key=lambda r: r[0])
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._path.open("wb") as fh:
            for _, line in self._rows:
                fh.write(line)
                fh.write(b"\n")


class SortedJsonlSink(FixedPartitionedSink[X, None], Generic[X]):
    """Collects items and writes them to one JSONL file, sorted, when the flow ends.

    ``row`` turns an item into ``(sort key, JSON bytes)``; see :func:`push_row` etc.
    """

    def __init__(self, path: Path, row: Callable[[X], tuple[Any, bytes]]) -> None:
        self.path = path
        self.row = row

    def list_parts(self) -> list[str]:
        """One partition: the file."""
        return [str(self.path)]

    def build_part(self, step_id: str, for_part: str,
                   resume_state: None) -> _SortedPartition[X]:
        """A partition that buffers rows until close."""
        return _SortedPartition(Path(for_part), self.row)


class _DocPartition(StatefulSinkPartition[dict[str, Any], None]):
    def __init__(self, path: Path) -> None:
        self._path = path
        self._doc: dict[str, Any] | None = None

    def write_batch(self, values: list[dict[str, Any]]) -> None:
        if values:
            self._doc = values[-1]

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        if self._doc is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._path.write_bytes(
            orjson.dumps(self._doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"
        )


class JsonDocSink(FixedPartitionedSink[dict[str, Any], None]):
    """Writes the last document it received to a JSON file when the flow ends."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def list_parts(self) -> list[str]:
        """One partition: the file."""
        return [str(self.path)]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _DocPartition:
        """A partition that keeps the latest document."""
        return _DocPartition(Path(for_part))


def push_row(p: Push) -> tuple[Any, bytes]:
    """Sort pushes by event time, then id."""
    return (p.event_ts, p.push_id), json_dumps(p.to_dict())


def holdout_row(h: Holdout) -> tuple[Any, bytes]:
    """Sort control-group records by event time, then the push id they stand for."""
    return (h.ts, h.push_id), json_dumps(asdict(h))


def alert_row(a: Alert) -> tuple[Any, bytes]:
    """Sort alerts by time, then id."""
    return (a.time_ms, a.id), json_dumps(a.to_cloudevent())


def dead_letter_row(d: DeadLetter) -> tuple[Any, bytes]:
    """Sort dead letters by where they were in the input."""
    return (d.source, d.pos, d.reason), json_dumps(d.to_dict())
