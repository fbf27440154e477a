"""How fast this host is right now: a fixed pure-Python loop, timed.

The bench's figures move with the host as much as with the code (a shared 2-core
host ran the same code 2-3x slower on one day than on another). ``python -m bench``
times this loop before its first part and after its last, and puts both in the table,
so that two tables can be compared: a run whose reference took twice as long ran on
a host twice as slow.
"""

from __future__ import annotations

import time

from bench.core import PartResult

__all__ = ["LOOP", "QUICK_LOOP", "add_reference", "reference_s"]

LOOP = 10_000_000
"""Additions in the full loop (about 0.4-1.5 s on the 2-core hosts seen here)."""
QUICK_LOOP = 200_000


def reference_s(n: int = LOOP) -> float:
    """Seconds for ``n`` additions in a Python ``for`` loop (no allocation, no I/O)."""
    t = time.perf_counter()
    total = 0
    for i in range(n):
        total += i
    elapsed = time.perf_counter() - t
    if total != n * (n - 1) // 2:  # keeps the loop honest
        raise AssertionError("reference loop miscounted")
    return elapsed


def add_reference(result: PartResult, when: str, *, quick: bool = False,
                  repeats: int = 3) -> None:
    """Time the loop ``repeats`` times into the figure ``reference loop, <when>``."""
    n = QUICK_LOOP if quick else LOOP
    fig = result.figure(f"pure-Python loop of {n:,} additions, {when}", "s",
                        higher_is_better=False)
    for _ in range(repeats):
        fig.values.append(round(reference_s(n), 3))
