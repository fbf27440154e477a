"""flows.runner: a live run with more than one worker keeps its epochs on a grid
(connectors.wrapped.EpochGrid; the grid itself is tested in tests/connectors/test_wrapped.py)."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from bytewax.dataflow import Dataflow

from connectors.console import ConsoleView
from connectors.wrapped import EpochGrid
from flows import runner
from flows.settings import load_settings

DEFAULT_RULES = Path(__file__).parents[2] / "flows" / "default_rules.yaml"


@pytest.mark.parametrize(("engine", "grid"), [
    ({}, False),  # one worker in all: nothing to drift from
    ({"workers": 2}, True),
    ({"addresses": "127.0.0.1:1,127.0.0.1:2", "process_id": 0}, True),
    ({"workers": 2, "epoch_quiet_ms": 0}, False),
])
def test_a_grid_only_with_more_than_one_worker(engine: dict[str, Any], grid: bool) -> None:
    got = runner.epoch_grid(load_settings(mode="live", engine=engine), 1.0)
    assert (got is not None) is grid
    if got is not None:
        assert got.runtime_interval == timedelta(milliseconds=990)


def test_a_quiet_window_of_half_the_epoch_is_refused() -> None:
    settings = load_settings(mode="live", engine={"workers": 2, "epoch_quiet_ms": 500})
    with pytest.raises(ValueError, match="epoch_quiet_ms"):
        runner.epoch_grid(settings, 1.0)
    assert runner.epoch_grid(settings, 1.5) is not None


def _input_hooks(flow: Dataflow) -> list[Any]:
    """The hooks around the input step's source, or around each part of a joined one."""
    (step,) = [s for s in flow.substeps if type(s).__name__ == "input"]
    src = step.source
    parts = [src.main, src.extra] if hasattr(src, "main") else [src]
    return [getattr(p, "hooks", None) for p in parts]


@pytest.mark.parametrize("rules_file", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
def test_run_live_wraps_every_input_partition_and_shortens_bytewax_s_interval(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, workers: int,
        rules_file: bool) -> None:
    seen: dict[str, Any] = {}

    def fake_run(flow: Dataflow, n: int, epoch_s: float, **_: Any) -> None:
        seen.update(flow=flow, workers=n, epoch_s=epoch_s)

    monkeypatch.setattr(runner, "run_dataflow", fake_run)
    extra: dict[str, Any] = {}
    if rules_file:  # rule changes are read: a second source joins the input step
        path = tmp_path / "rules.yaml"
        path.write_text(DEFAULT_RULES.read_text(encoding="utf-8"), encoding="utf-8")
        extra["rules_file"] = str(path)
    settings = load_settings(mode="live", engine={"workers": workers,
                                                  "epoch_interval_s": 2.0}, **extra)
    runner.run_live(settings, duration_s=1.0, console=ConsoleView(io.StringIO()),
                    handle_signals=False)
    assert seen["workers"] == workers
    hooks = _input_hooks(seen["flow"])
    assert len(hooks) == (2 if rules_file else 1)
    if workers == 1:
        assert seen["epoch_s"] == 2.0
        assert not any(isinstance(h, EpochGrid) for h in hooks)
    else:
        assert seen["epoch_s"] == pytest.approx(1.99)
        assert hooks and all(isinstance(h, EpochGrid) for h in hooks)
