"""The input-drift part in quick mode: every variant runs and every figure is there.

Nothing is asserted about speed or about the drift itself (a wall-clock effect): only
that both bare layouts and the engine ran for every window, that CPU was read, that
the bare flows read their fast partitions, that the engine answered a probe after each
window, and that the plot was written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import input_drift
from bench.bytewax_idle import main as bare_main
from tests.bench import quick_ctx


def test_the_bare_flow_refuses_an_unknown_layout() -> None:
    with pytest.raises(SystemExit):
        bare_main(["--layout", "three", "--seconds", "1"])


@pytest.mark.integration
def test_input_drift_quick(tmp_path: Path) -> None:
    ctx = quick_ctx(tmp_path)
    result = input_drift.run(ctx)

    (run,) = result.extra["runs"]
    windows = int(input_drift.QUICK.seconds / input_drift.QUICK.window_s)
    assert set(run) == {*input_drift.LAYOUTS, input_drift.ENGINE}
    for label in input_drift.LAYOUTS:
        ws = run[label]
        assert len(ws) == windows
        assert all(w["cores"] > 0 and w["reads_per_s"] > 0 for w in ws)
        assert all(w["longest_pause_ms"] > 0 for w in ws)
    eng = run[input_drift.ENGINE]
    assert len(eng) == windows
    assert all(w["cores"] > 0 and w["first_push_ms"] > 0 for w in eng)
    assert (tmp_path / "work" / "run0" / "tansu").is_dir()  # its own Tansu
    names = {f.name for f in result.figures}
    for label in run:
        assert f"CPU, last {input_drift.QUICK.window_s:g} s, {label}" in names
    assert [p.name for p in result.plots] == ["2000-01-01-input_drift.png"]
    assert result.plots[0].stat().st_size > 0
