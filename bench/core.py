"""What every benchmark part shares: the context it runs in and the result it returns.

A part is a module under ``bench/`` with ``run(ctx: BenchContext) -> PartResult``.
``python -m bench`` starts one Tansu broker and one redis-server, runs the parts it is
asked for against them, writes ``bench/results/<date>-<part>.json`` (and the part's
PNG plots) and prints one table. Each figure keeps every run's value; the table shows
the median with min and max. Ratios are taken between figures of the same run.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BenchContext", "Figure", "PartResult", "free_path"]


def free_path(path: Path) -> Path:
    """``path``, or ``<stem>-2<suffix>``, ``-3``, ... when it exists: a result file an
    earlier run wrote is never replaced."""
    n, free = 1, path
    while free.exists():
        n += 1
        free = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return free


@dataclass(frozen=True)
class BenchContext:
    """Where a part runs: the services started for this bench run, and how big to go.

    ``quick`` is the CI mode: tiny inputs, a few seconds per part, nothing asserted
    about speed. ``runs`` is how many times each figure is measured (3 or more for
    the published table).
    """

    brokers: str
    redis_url: str
    quick: bool
    runs: int
    results_dir: Path
    work_dir: Path
    date: str
    broker: str = "tansu"
    """What ``brokers`` is: ``"tansu"`` (the default broker of every part) or
    ``"mock"`` (librdkafka's mock cluster, :mod:`bench.mock_kafka`: no admin requests,
    topics made on first use)."""
    _stems: dict[str, str] = field(default_factory=dict, init=False, repr=False,
                                   compare=False)

    def results_path(self, part: str, suffix: str = ".json") -> Path:
        """``bench/results/<date>-<part><suffix>``, never a file an earlier run wrote.

        The first call for ``part`` picks its stem: ``<date>-<part>``, or, when
        ``<date>-<part>.json`` is already there (an earlier run of that day, such as the
        ``make bench`` whose table README shows), ``<date>-<part>-2``, ``-3``, ...; every
        file of the part in this run (its JSON, plots, profiles) shares that stem.
        """
        self.results_dir.mkdir(parents=True, exist_ok=True)
        stem = self._stems.get(part)
        if stem is None:
            stem = free_path(self.results_dir / f"{self.date}-{part}.json").stem
            self._stems[part] = stem
        return self.results_dir / f"{stem}{suffix}"

    @property
    def run_count(self) -> int:
        """How many runs a part makes: ``runs`` (at least 1), or 1 in quick mode."""
        return 1 if self.quick else max(1, self.runs)


@dataclass
class Figure:
    """One measured quantity, one value per run."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    target: str = ""
    higher_is_better: bool = True

    @property
    def median(self) -> float:
        """The median over runs (NaN if nothing was measured)."""
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def min(self) -> float:
        """The smallest value."""
        return min(self.values) if self.values else float("nan")

    @property
    def max(self) -> float:
        """The largest value."""
        return max(self.values) if self.values else float("nan")


@dataclass
class PartResult:
    """What one part measured: figures, plots it wrote, and notes for the reader."""

    part: str
    figures: list[Figure] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def figure(self, name: str, unit: str, *, target: str = "",
               higher_is_better: bool = True) -> Figure:
        """Get or create the figure called ``name``."""
        for f in self.figures:
            if f.name == name:
                return f
        f = Figure(name, unit, target=target, higher_is_better=higher_is_better)
        self.figures.append(f)
        return f

    def append_ratio(self, name: str, numerator: str, denominator: str) -> None:
        """Append to the ratio figure ``name`` the latest value of figure ``numerator``
        over that of ``denominator`` (a ratio taken within one run; lower is better)."""
        num, den = self.figure(numerator, ""), self.figure(denominator, "")
        self.figure(name, "ratio", higher_is_better=False).values.append(
            num.values[-1] / den.values[-1])

    def to_json(self) -> dict[str, Any]:
        """A JSON-able document (medians included for convenience)."""
        return {
            "part": self.part,
            "figures": [
                {**asdict(f), "median": f.median, "min": f.min, "max": f.max}
                for f in self.figures
            ],
            "plots": [str(p) for p in self.plots],
            "notes": self.notes,
            "extra": self.extra,
        }
