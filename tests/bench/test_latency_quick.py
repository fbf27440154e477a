"""The latency part in quick mode: the suite works end to end (nothing about speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram

from bench import latency
from tests.bench import quick_ctx

pytestmark = pytest.mark.integration


def test_latency_quick(tansu: str, redis_server: str, tmp_path: Path) -> None:
    ctx = quick_ctx(tmp_path, runs=1, brokers=tansu, redis_url=redis_server)
    result = latency.run(ctx)

    (run,) = result.extra["runs"]
    (phase,) = latency.QUICK.phases
    assert run["phase"] == phase.name
    assert run["sent"] == round(phase.rate * phase.duration_s)
    # Latency is measured for the first measure_s seconds of events; the pushes of the
    # rest of the phase are counted apart, and the engine had caught up with the
    # measured window (its end probes answered) before the run stopped.
    assert phase.measure_s is not None and phase.measure_s < phase.duration_s
    assert 0 < run["measured_events"] < run["sent"]
    assert abs(run["measured_s"] - phase.measure_s) < 0.5
    assert run["seen"].get("after the measured window", 0) > 0
    assert run["drain_s"] is not None and run["help_wait_s"] is not None
    # The broker's CPU was read: broker_pid found the Tansu listening on its port.
    assert run["cpu"].get("broker") is not None
    # Pushes were seen, on terminal streams and on customer streams, and the readers
    # watch every stream pushes go to (with the 2 s dwell, a help-sprite of an ordinary
    # session may fire after the readers stopped: a few may be missing).
    assert run["latency"]["count"] > 0
    assert run["seen"].get("terminal", 0) > 0
    assert run["seen"].get("customer", 0) > 0
    assert 0 <= run["pushes_in_redis"] - sum(run["seen"].values()) <= 5
    # Every stuck customer got its help-sprite.
    assert run["stuck"] == phase.stuck
    assert run["lateness"]["count"] == phase.stuck

    (encoded,) = result.extra["histograms_us"][phase.name]
    assert HdrHistogram.decode(encoded).get_total_count() == run["latency"]["count"]

    doc = json.loads(json.dumps(result.to_json()))
    figures = {f["name"]: f for f in doc["figures"]}
    label = latency._label(phase.name)
    assert figures[f"caught up after the measured {phase.measure_s:g} s @ {label}"][
        "values"] == [run["drain_s"]]
    for pname in ("p50", "p99", "p99.9", "max"):
        values = figures[f"push latency {pname} @ {label}"]["values"]
        assert len(values) == 1 and values[0] > 0
    assert figures[f"help-sprite lateness p99 @ {label}"]["target"] == latency.LATENESS_TARGET
    assert figures["help-sprite pushes seen / expected"]["values"] == [100.0]

    assert result.plots == [ctx.results_path("latency", "-cdf.png"),
                            ctx.results_path("latency", "-timers-cdf.png")]
    for plot in result.plots:
        assert plot.is_file() and plot.stat().st_size > 0
