"""The host references that ``python -m bench`` puts before and after its parts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench import host
from bench.core import PartResult
from bench.host import PARSES, QUICK_LOOP, add_reference, parse_s, reference_s


class FakeClock:
    """A clock for :mod:`bench.host` that advances by ``step`` seconds on every call."""

    def __init__(self, step: float) -> None:
        self.calls = 0
        self.step = step

    def __call__(self) -> float:
        self.calls += 1
        return self.calls * self.step


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock(0.25)
    monkeypatch.setattr(host, "_clock", fake)
    yield fake


def test_each_reference_is_the_time_between_two_clock_reads(clock: FakeClock) -> None:
    assert reference_s(1_000) == 0.25
    assert parse_s(1_000) == 0.25
    assert clock.calls == 4


def test_add_reference_records_one_value_per_repeat_and_reference(clock: FakeClock) -> None:
    result = PartResult("host")
    add_reference(result, "before", quick=True, repeats=2)
    add_reference(result, "after", quick=True, repeats=2)
    names = [f.name for f in result.figures]
    assert names == [f"pure-Python loop of {QUICK_LOOP:,} additions, before",
                     f"orjson.loads of one record {PARSES // 50:,} times, before",
                     f"pure-Python loop of {QUICK_LOOP:,} additions, after",
                     f"orjson.loads of one record {PARSES // 50:,} times, after"]
    for f in result.figures:
        assert f.values == [0.25, 0.25] and f.unit == "s"
        assert not f.higher_is_better
    assert clock.calls == 2 * 2 * 2 * 2  # two references, two repeats, two calls, twice
