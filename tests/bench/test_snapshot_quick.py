"""The snapshot part in quick mode: every figure measured, the plot written.

Nothing is asserted about speed: only that each figure has one value per run, that
the shards hold the population and made pushes from it, and that the incremental
snapshot weighs what the full one does (the same state, packed per customer).
"""

from __future__ import annotations

from pathlib import Path

from bench import snapshot
from tests.bench import quick_ctx


def test_snapshot_quick(tmp_path: Path) -> None:
    ctx = quick_ctx(tmp_path, runs=2)
    result = snapshot.run(ctx)

    figures = {f.name: f for f in result.figures}
    assert {"full snapshot, every shard", "incremental snapshot, every shard",
            "full/incremental snapshot time", "incremental snapshot, no customer changed",
            "restore from a full snapshot",
            "restore from an incremental snapshot",
            "storing the incremental snapshots (SQLite, as Bytewax)",
            "storing the full snapshots (SQLite, as Bytewax)",
            "packed map kept between snapshots, per customer"} <= set(figures)
    assert all(len(f.values) == 2 and all(v > 0 for v in f.values) for f in result.figures)
    assert result.extra["customers held"] == snapshot.QUICK["customers"]
    assert result.extra["pushes while building"] > 0  # the rules really ran
    full = figures["full snapshot size per customer"].values
    inc = figures["incremental snapshot size per customer"].values
    assert all(0 < i - f < 8 for f, i in zip(full, inc, strict=True))  # bytes' headers
    assert [p.name for p in result.plots] == ["2000-01-01-snapshot.png"]
    assert result.plots[0].stat().st_size > 0
