"""How fast this host is right now: two fixed pieces of work, timed.

The bench's figures move with the host as much as with the code (a shared 2-core
host ran the same code 2-3x slower on one day than on another). ``python -m bench``
times both before its first part and after its last, and puts them in the table, so
that two tables can be compared: a run whose references took twice as long ran on a
host twice as slow. One is a pure-Python loop (the interpreter on a core); the other
parses one workload record with orjson, over and over (allocation and memory, which a
busy neighbour can slow down more than the loop).
"""

from __future__ import annotations

import time

import orjson

from bench.core import PartResult

__all__ = ["LOOP", "PARSES", "QUICK_LOOP", "RECORD", "add_reference", "parse_s", "reference_s"]

LOOP = 10_000_000
"""Additions in the full loop (about 0.4-1.5 s on the 2-core hosts seen here)."""
QUICK_LOOP = 200_000
PARSES = 1_000_000
"""``orjson.loads`` of :data:`RECORD` in the full reference (quick: a fiftieth)."""
RECORD = (b'{"cell_id":"cell-417","customer_id":"13800012345","event_id":"bench-42",'
          b'"poi":"cinema","poi_id":"cinema-7","ts":1795463088733,"type":"location"}')
"""A location record as the workload sends it."""
_clock = time.perf_counter


def reference_s(n: int = LOOP) -> float:
    """Seconds for ``n`` additions in a Python ``for`` loop (no allocation, no I/O)."""
    t = _clock()
    total = 0
    for i in range(n):
        total += i
    elapsed = _clock() - t
    if total != n * (n - 1) // 2:  # keeps the loop honest
        raise AssertionError("reference loop miscounted")
    return elapsed


def parse_s(n: int = PARSES) -> float:
    """Seconds for ``n`` ``orjson.loads`` of :data:`RECORD`, each result read once."""
    loads = orjson.loads
    t = _clock()
    seen = 0
    for _ in range(n):
        seen += len(loads(RECORD)["customer_id"])
    elapsed = _clock() - t
    if seen != 11 * n:
        raise AssertionError("reference parse misread")
    return elapsed


def add_reference(result: PartResult, when: str, *, quick: bool = False,
                  repeats: int = 3) -> None:
    """Time both references ``repeats`` times into two figures named after ``when``."""
    n = QUICK_LOOP if quick else LOOP
    loop = result.figure(f"pure-Python loop of {n:,} additions, {when}", "s",
                         higher_is_better=False)
    m = PARSES // 50 if quick else PARSES
    parse = result.figure(f"orjson.loads of one record {m:,} times, {when}", "s",
                          higher_is_better=False)
    for _ in range(repeats):
        loop.values.append(round(reference_s(n), 3))
        parse.values.append(round(parse_s(m), 3))
