"""Time a contender's processes spend in Python's cyclic garbage collector.

The collector stops the whole process while it walks the objects of a generation, and
what it costs depends on how many long-lived containers a contender keeps and on how
it tunes the collector: ``touchstream run`` freezes what exists at start and collects
generation 0 every 50,000 allocations (``flows.runner.tune_gc``); the bare Bytewax
and Quix Streams counts run with Python's defaults, as a user would write them. So the
throughput part reports, next to each rate, the share of the measured window its
processes spent collecting.

Usage, in a contender (and in each process of a cluster)::

    gcstats.install(out_dir)            # first thing: records every collection
    ...run...
    gcstats.in_window(first, last, out_dir)   # this process, plus the files others wrote

``install`` hooks ``gc.callbacks``; with ``out_dir`` each process writes its
collections to ``out_dir/gc-<pid>.json`` when it exits. Collections count when they
start inside ``[first, last]`` (wall clock, as :mod:`bench.timing` measures).
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["in_window", "install", "installed"]

# (wall time a collection started, seconds it took, generation), this process
_collections: list[tuple[float, float, int]] = []
_start = [0.0, 0.0]  # wall, perf_counter of the collection under way
_state: dict[str, Any] = {"installed": False, "out_dir": None}


def _callback(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _start[0] = time.time()
        _start[1] = time.perf_counter()
    else:
        _collections.append((_start[0], time.perf_counter() - _start[1], info["generation"]))


def _write() -> None:
    out_dir = _state["out_dir"]
    if out_dir is None:
        return
    path = Path(out_dir) / f"gc-{os.getpid()}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_collections))
        tmp.replace(path)
    except OSError:
        pass  # the figure goes missing, the run's result does not


def install(out_dir: str | Path | None = None) -> None:
    """Record this process's collections from now on (idempotent); with ``out_dir``,
    write them there when the process exits."""
    if out_dir is not None:
        _state["out_dir"] = str(out_dir)
    if _state["installed"]:
        return
    _state["installed"] = True
    gc.callbacks.append(_callback)
    atexit.register(_write)


def installed() -> bool:
    """Whether :func:`install` ran in this process."""
    return bool(_state["installed"])


def in_window(first: float, last: float, out_dir: str | Path | None = None) -> dict[str, float]:
    """``{"gc_s", "gc_full_s", "gc_collections"}`` of the collections that started
    within ``[first, last]``: seconds in all of them, seconds in full (generation 2)
    ones, and how many; this process's, and those of every other process that wrote a
    ``gc-<pid>.json`` under ``out_dir`` (summed: two processes collecting at once count
    twice)."""
    per_process: dict[str, list[tuple[float, float, int]]] = {
        str(os.getpid()): list(_collections)}
    if out_dir is not None:
        for p in sorted(Path(out_dir).glob("gc-*.json")):
            pid = p.stem[len("gc-"):]
            if pid == str(os.getpid()):
                continue
            try:
                per_process[pid] = [tuple(c) for c in json.loads(p.read_text())]
            except (OSError, ValueError):
                continue
    total = full = 0.0
    n = 0
    for cols in per_process.values():
        for started, seconds, gen in cols:
            if first <= started <= last:
                total += seconds
                n += 1
                if gen == 2:
                    full += seconds
    return {"gc_s": total, "gc_full_s": full, "gc_collections": float(n)}
