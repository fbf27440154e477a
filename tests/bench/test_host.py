"""The host reference loop that ``python -m bench`` puts before and after its parts."""

from __future__ import annotations

from bench.core import PartResult
from bench.host import PARSES, QUICK_LOOP, add_reference, parse_s, reference_s


def test_reference_loop_takes_longer_for_more_additions() -> None:
    small = min(reference_s(10_000) for _ in range(3))
    big = min(reference_s(1_000_000) for _ in range(3))
    assert 0 < small < big


def test_reference_parse_takes_longer_for_more_records() -> None:
    small = min(parse_s(1_000) for _ in range(3))
    big = min(parse_s(100_000) for _ in range(3))
    assert 0 < small < big


def test_add_reference_records_one_value_per_repeat() -> None:
    result = PartResult("host")
    add_reference(result, "before", quick=True, repeats=2)
    add_reference(result, "after", quick=True, repeats=2)
    names = [f.name for f in result.figures]
    assert names == [f"pure-Python loop of {QUICK_LOOP:,} additions, before",
                     f"orjson.loads of one record {PARSES // 50:,} times, before",
                     f"pure-Python loop of {QUICK_LOOP:,} additions, after",
                     f"orjson.loads of one record {PARSES // 50:,} times, after"]
    for f in result.figures:
        assert len(f.values) == 2 and all(v > 0 for v in f.values) and f.unit == "s"
        assert not f.higher_is_better
