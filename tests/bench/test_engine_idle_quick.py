"""The engine-idle part in quick mode: every variant runs and every figure is there.

Nothing is asserted about speed: only that each variant's engine answered its probes
(one push per probe, each timed), that CPU was read for the engine's threads and the
broker, that the thread split adds up and that the plot was written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import engine_idle
from tests.bench import quick_ctx


def test_split_threads_counts_the_main_thread_as_the_worker() -> None:
    before = {10: ("python", 1.0), 11: ("rdk:broker1", 2.0), 12: ("python", 0.5)}
    after = {10: ("python", 1.5), 11: ("rdk:broker1", 2.25), 12: ("python", 0.75),
             13: ("rdk:main", 0.25)}  # started in between: counts from zero
    use = engine_idle.split_threads(10, before, after, seconds=2.0)
    assert use == {"worker": 0.25, "librdkafka": 0.25, "other": 0.125, "total": 0.625}


@pytest.mark.integration
def test_engine_idle_quick(tmp_path: Path) -> None:
    ctx = quick_ctx(tmp_path)
    result = engine_idle.run(ctx)

    (run,) = result.extra["runs"]
    assert set(run) == {"broker alone", *engine_idle.VARIANTS}
    for label in engine_idle.VARIANTS:
        v = run[label]
        assert len(v["first_push_ms"]) == engine_idle.QUICK.probes
        assert all(ms > 0 for ms in v["first_push_ms"])
        cores = v["engine_cores"]
        assert cores["worker"] > 0  # the worker thread was found and read
        parts = cores["worker"] + cores["librdkafka"] + cores["other"]
        assert abs(cores["total"] - parts) <= 0.002
    for server in ("tansu", "redis"):  # the run started its own Tansu and redis-server
        assert (tmp_path / "work" / "run0" / server).is_dir()
    assert any(run[label]["broker_cores"] > 0 for label in engine_idle.VARIANTS)
    names = {f.name for f in result.figures}
    for label in engine_idle.VARIANTS:
        assert f"engine CPU idle, {label}" in names
        assert f"broker CPU with the engine idle, {label}" in names
    assert [p.name for p in result.plots] == ["2000-01-01-engine_idle.png"]
    assert result.plots[0].stat().st_size > 0
