"""The decode part in quick mode: every figure measured, the plot written.

Nothing is asserted about speed: only that each figure has one value per run, that the
in-process engine really made pushes from the records, and that the plot is there.
"""

from __future__ import annotations

from pathlib import Path

from bench import decode
from tests.bench import quick_ctx


def test_decode_quick(tmp_path: Path) -> None:
    ctx = quick_ctx(tmp_path, runs=2)
    result = decode.run(ctx)

    names = {f.name for f in result.figures}
    assert {"decode_record, per record", "orjson.loads (floor), per record",
            "event init: engine's/generated", "in-process touchstream/bytewax"} <= names
    assert all(len(f.values) == 2 and all(v > 0 for v in f.values) for f in result.figures)
    assert all(n > 0 for n in result.extra["pushes per run"])  # the rules really ran
    assert [p.name for p in result.plots] == ["2000-01-01-decode-per-record.png"]
    assert result.plots[0].stat().st_size > 0
