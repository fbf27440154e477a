"""The epoch-grid part in quick mode: both arms run on one dataset (nothing about speed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import epoch_grid, throughput
from flows.settings import Settings
from tests.bench import quick_ctx

pytestmark = pytest.mark.integration


def test_epoch_grid_quick(tansu: str, redis_server: str, tmp_path: Path) -> None:
    ctx = quick_ctx(tmp_path, brokers=tansu, redis_url=redis_server)
    result = epoch_grid.run(ctx)

    (pair,) = result.extra["pairs"]
    assert set(pair) == set(epoch_grid.ARMS)
    assert all(rate > 0 for rate in pair.values())
    figures = {f.name: f for f in result.figures}
    assert figures["touchstream 2p, grid off / grid on"].values == [
        pytest.approx(pair["grid off"] / pair["grid on"])]
    assert result.extra["config"]["events"] == throughput.QUICK["events"]
    # Each arm's engine read its own setting: the grid on (the default window) and off.
    assert result.extra["epoch_quiet_ms"] == {
        "grid on": [Settings().engine.epoch_quiet_ms], "grid off": [0]}
    assert Settings().engine.epoch_quiet_ms > 0
