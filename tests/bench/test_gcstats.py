"""bench.gcstats: the garbage collector's time inside a measured window, this process's
and other processes' (read from the files they wrote)."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from bench import gcstats
from bench.throughput import gc_share


def test_collections_inside_the_window_count_and_those_outside_do_not(tmp_path: Path) -> None:
    gcstats.install()
    assert gcstats.installed()
    gc.collect()  # before the window
    first = time.time()
    junk = [[i] for i in range(50_000)]  # something for a full collection to walk
    gc.collect()
    gc.collect(0)
    last = time.time()
    del junk
    got = gcstats.in_window(first, last)
    assert got["gc_collections"] >= 2
    assert got["gc_s"] >= got["gc_full_s"] > 0
    assert gcstats.in_window(last + 3600, last + 7200)["gc_collections"] == 0


def test_other_processes_files_are_added_and_a_broken_one_is_skipped(tmp_path: Path) -> None:
    gcstats.install()
    t = time.time() + 10_000  # a window no collection of this process falls into
    (tmp_path / "gc-1.json").write_text(json.dumps([[t + 1, 0.5, 2], [t + 2, 0.25, 0],
                                                    [t + 100, 9.0, 2]]))
    (tmp_path / "gc-2.json").write_text(json.dumps([[t + 3, 0.125, 1]]))
    (tmp_path / "gc-3.json").write_text("{not json")
    got = gcstats.in_window(t, t + 10, tmp_path)
    assert got == {"gc_s": 0.875, "gc_full_s": 0.5, "gc_collections": 3.0}


def test_the_share_is_per_process_second_and_missing_without_a_record() -> None:
    assert gc_share({"gc_s": 1.0, "seconds": 4.0}, 1) == 0.25
    assert gc_share({"gc_s": 1.0, "seconds": 4.0}, 2) == 0.125
    assert gc_share({"seconds": 4.0}, 1) is None
    assert gc_share({"gc_s": 1.0, "seconds": 0.0}, 1) is None
