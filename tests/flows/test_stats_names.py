"""The stats keep a bounded number of hall, module and step names (terminals choose them)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from flows.aggregates import DEFAULT_MAX_NAMES, OTHER_NAME, StatsEngine
from flows.codec import pack, unpack
from flows.engine import StatDelta
from flows.settings import Settings

T0 = 1_700_000_040_000
MIN = 60_000


def _clicks(hall: str, module: str, step: str, n: int = 1) -> StatDelta:
    return StatDelta({("hall", hall, "tries"): n, ("module", module, "tries"): n,
                      ("step", f"{module}/{step}", "help"): n,
                      ("dwell", module, "3"): n, ("rule", "r1", "pushes"): n})


def _minute(doc: dict[str, Any]) -> dict[str, Any]:
    [w] = [w for w in doc["windows"] if w["size_s"] == 60]
    return w


def test_names_past_the_bound_are_counted_as_other() -> None:
    eng = StatsEngine(30 * MIN, max_names=3)
    for i in range(5):
        eng.add(_clicks(f"H{i}", f"m{i}", "s"), at_ms=T0)
    eng.add(_clicks("H0", "m0", "s", n=10), at_ms=T0)  # a kept name keeps counting
    doc = eng.render(T0 + MIN)
    assert doc["halls"] == {"H0": {"tries": 11}, "H1": {"tries": 1}, "H2": {"tries": 1},
                            OTHER_NAME: {"tries": 2}}
    assert set(doc["modules"]) == {"m0", "m1", "m2", OTHER_NAME}
    assert doc["modules"][OTHER_NAME]["tries"] == 2
    assert set(doc["steps"]) == {"m0/s", "m1/s", "m2/s", OTHER_NAME}
    assert doc["rules"]["r1"]["pushes"] == 15  # rules are the operator's: never folded
    # 2 events of unknown names x (hall, module, step, dwell) increments
    assert doc["engine"]["stats_names_folded"] == 8
    minute = _minute(doc)
    assert minute["halls"][OTHER_NAME] == {"tries": 2}
    assert minute["modules"][OTHER_NAME]["step_visits"] == 2  # the dwell histogram too
    assert minute["engine"]["stats_names_folded"] == 8


def test_the_kept_names_survive_a_snapshot() -> None:
    eng = StatsEngine(30 * MIN, max_names=2)
    eng.add(_clicks("H0", "m0", "s"))
    eng.add(_clicks("H1", "m1", "s"))
    eng.render(T0)
    restored = StatsEngine(30 * MIN, unpack(pack(eng.snapshot())), max_names=2)
    assert restored.names == eng.names
    restored.add(_clicks("H1", "m1", "s"))
    restored.add(_clicks("H9", "m9", "s"))
    doc = restored.render(T0 + MIN)
    assert doc["halls"] == {"H0": {"tries": 1}, "H1": {"tries": 2}, OTHER_NAME: {"tries": 1}}


def test_folding_warns_once_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    eng = StatsEngine(30 * MIN, max_names=1)
    with caplog.at_level(logging.WARNING, logger="flows.aggregates"):
        for i in range(50):
            eng.add(_clicks(f"H{i}", "m0", "s"))
    assert [r.getMessage() for r in caplog.records] == [
        "stats: more than 1 distinct hall names; counting further ones as '(other)'"]


def test_the_bound_is_a_setting_with_the_engine_default() -> None:
    assert Settings().engine.stats_max_names == DEFAULT_MAX_NAMES
    assert Settings(engine={"stats_max_names": 5}).engine.stats_max_names == 5
    with pytest.raises(ValueError):
        StatsEngine(30 * MIN, max_names=0)
