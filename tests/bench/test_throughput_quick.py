"""The throughput part in quick mode: the suite works end to end (nothing about speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import throughput
from tests.bench import quick_ctx

pytestmark = pytest.mark.integration


def test_throughput_quick(tansu: str, redis_server: str, tmp_path: Path) -> None:
    ctx = quick_ctx(tmp_path, runs=1, brokers=tansu, redis_url=redis_server)
    result = throughput.run(ctx)  # quick mode raises if any contender fails

    (run,) = result.extra["runs"]
    expected = run["dataset"]["count"]
    assert expected == throughput.QUICK["events"]
    assert sum(run["dataset"]["per_topic"].values()) == expected
    assert not run["failed"]
    ran = {c.label for c in throughput.CONTENDERS} & set(run["results"])
    assert {"limit", "bytewax count", "quix count"} <= ran
    for label in ran:
        doc = run["results"][label]
        assert doc["events"] == expected, label
        assert doc["rate"] > 0 and doc["seconds"] > 0, label

    doc = json.loads(json.dumps(result.to_json()))
    figures = {f["name"]: f for f in doc["figures"]}
    for label in ran:
        assert len(figures[f"{label} events/s"]["values"]) == 1
        assert figures[f"{label} events/s"]["median"] > 0
    for label in ran:
        # every contender records its processes' garbage collection in the window
        gc_fig = figures[f"{label} time in GC"]
        assert gc_fig["unit"] == "share" and len(gc_fig["values"]) == 1, label
        assert 0 <= gc_fig["values"][0] < 1, label
        assert {"gc_s", "gc_full_s", "gc_collections"} <= set(run["results"][label]), label
    for name in ("bytewax/limit", "quix/bytewax"):
        assert figures[name]["unit"] == "ratio"
        assert len(figures[name]["values"]) == 1 and figures[name]["values"][0] > 0
    assert any("faust" in note for note in doc["notes"])

    (plot,) = result.plots
    assert plot == ctx.results_path("throughput", ".png")
    assert plot.is_file() and plot.stat().st_size > 0
