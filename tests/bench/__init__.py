"""Tests of the benchmark suite: quick modes (nothing asserted about speed) and helpers."""

from __future__ import annotations

from pathlib import Path

from bench.core import BenchContext


def quick_ctx(tmp_path: Path, *, runs: int = 3, brokers: str = "",
              redis_url: str = "") -> BenchContext:
    """A quick-mode context writing under ``tmp_path`` (results/, work/), dated 2000-01-01."""
    return BenchContext(brokers=brokers, redis_url=redis_url, quick=True, runs=runs,
                        results_dir=tmp_path / "results", work_dir=tmp_path / "work",
                        date="2000-01-01")
