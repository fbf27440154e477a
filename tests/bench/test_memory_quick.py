"""The memory part in quick mode: 10k customers through the live flow, then eviction.

Nothing is asserted about how much memory is used, only that the measurement is
sound: every customer was held at the checkpoint, the sweep evicted them, and the
figures, the notes and the plot are there.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import memory
from tests.bench import quick_ctx


def test_memory_quick(tmp_path: Path) -> None:
    ctx = quick_ctx(tmp_path, runs=3)  # quick mode runs once whatever is asked
    result = memory.run(ctx)

    (run,) = result.extra["runs"]
    (point,) = run["points"]
    n = memory.QUICK[0]
    assert point["customers"] == n
    warmup = run["baseline"]["held"]
    assert point["held"] == n + warmup  # every customer seen and held
    assert point["rss"] > run["baseline"]["rss"] > 0
    ev = run["eviction"]
    assert ev["held_before"] == n + warmup
    assert ev["held_after"] <= memory.SHARDS  # only the one-event-per-shard sweepers
    assert run["state"]["snapshot_bytes_per_customer"] > 0
    assert run["state"]["deep_bytes_per_customer"] > 0
    comps = run["components"]["bytes_per_customer"]
    assert comps["call history, 12 intervals"] > comps["call history, 1 interval"] > 0
    assert run["components"]["pushes_per_customer"]["after a cinema-pay push (2 visits)"] == 1

    doc = json.loads(json.dumps(result.to_json()))
    figures = {f["name"]: f for f in doc["figures"]}
    per = figures["RSS per customer @ 10k"]
    assert per["unit"] == "B" and len(per["values"]) == 1 and per["target"]
    assert figures["customers left after eviction"]["values"] == [ev["held_after"]]
    assert any("pymalloc" in note for note in doc["notes"])
    (plot,) = result.plots
    assert plot.exists() and plot.stat().st_size > 1000
