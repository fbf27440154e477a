"""Input-drift part: two Bytewax input steps' epochs drift apart, and so do two workers'.

Bytewax 0.21.1 keeps the epoch of every input partition on its own clock, and lets an
input step read the next epoch only once every output has finished the previous one.
One input step checks all of its partitions' epochs at each activation, so they move on
together. Two input steps do not: the one woken every 50 ms (like the rule-change input)
notices its epoch's end a little later than the one woken every 1 ms (like the Kafka
partitions), every epoch, and the difference adds up. The faster step then waits longer
at every epoch end, and spins while it waits (its partitions' wake-up times have
passed, so Bytewax activates it again at once). Until ``flows.experience.build_flow``
read the rule changes through the event input step
(:func:`connectors.wrapped.with_partitions_of`), an idle engine's worker CPU grew with
its age, and so did the wait before the first record after a quiet spell.

Measured, each for ``seconds`` in windows of ``window_s``, with nothing to read:

* **bare Bytewax, two input steps**: 9 partitions woken every 1 ms and 1 partition
  woken every 50 ms, in two ``op.input`` steps merged, 1 s epochs (the engine's live
  default), a sink that drops everything (``bench/bytewax_idle.py``);
* **bare Bytewax, one input step**: the same partitions read by one step
  (``with_partitions_of``);
* **bare Bytewax, one step, 2 workers**, with the fast partitions resting 10 ms (the
  engine's idle rest): each worker runs its own copy of the step, and their epochs drift
  apart the same way (``bench/README.md``, "Workers of one dataflow drift apart");
* the same **with an epoch grid** (:class:`connectors.wrapped.EpochGrid`, 20 ms quiet
  window), as the engine runs with more than one worker;
* **the engine** (``touchstream run`` on its own Tansu and redis-server, recovery off)
  with ``kafka.idle_rest_ms=1`` (the Kafka partitions rest 1 ms, as before the idle
  rest): its worker thread's CPU per window, and one probe after each window (a
  ``setup-first`` push, send → ``XREAD``).

Per window: CPU from ``/proc`` (the bare flow's whole process, whose one worker thread
is nearly all of it; the engine's worker thread), and for the bare flows the longest
pause between two reads of a 1 ms partition (the wait at an epoch end).

Not in the default ``make bench`` (3 runs: about 10 min, plus 2 min per run for the two
2-worker variants): ``python -m bench
input_drift``; its quick mode is in ``make test`` (``tests/bench/test_input_drift_quick.py``).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.core import BenchContext, PartResult
from bench.engine_idle import own_engine, split_threads, thread_cpu
from bench.latency import REPO

__all__ = ["FULL", "LAYOUTS", "QUICK", "DriftTimes", "run"]

PART = "input_drift"
LAYOUTS: dict[str, tuple[str, ...]] = {
    "bare Bytewax, two input steps": ("--layout", "two"),
    "bare Bytewax, one input step": ("--layout", "one"),
    # workers of one dataflow drift apart like two steps; EpochGrid keeps them together
    "bare Bytewax, one step, 2 workers": ("--layout", "one", "--workers", "2",
                                          "--fast-rest-ms", "10"),
    "bare Bytewax, one step, 2 workers, epoch grid": (
        "--layout", "one", "--workers", "2", "--fast-rest-ms", "10", "--epoch-quiet-ms", "20"),
}
"""Each bare variant: its ``bench/bytewax_idle.py`` arguments."""
_COLORS = dict(zip(LAYOUTS, ("C3", "C0", "C1", "C4"), strict=True))  # the engine: C2
ENGINE = "engine worker thread, idle_rest_ms=1"
ENGINE_ENV = {"TOUCHSTREAM_KAFKA__IDLE_REST_MS": "1"}


@dataclass(frozen=True)
class DriftTimes:
    """How long each variant runs, in windows of ``window_s``."""

    seconds: float
    window_s: float


FULL = DriftTimes(seconds=60.0, window_s=10.0)
QUICK = DriftTimes(seconds=6.0, window_s=3.0)


def bare(args: tuple[str, ...], times: DriftTimes) -> list[dict[str, float]]:
    """Run ``bench/bytewax_idle.py`` with ``args``; its windows."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.bytewax_idle", *args,
         "--seconds", str(times.seconds), "--window", str(times.window_s)],
        cwd=REPO, capture_output=True, check=True, timeout=times.seconds + 60)
    return [orjson.loads(line) for line in out.stdout.splitlines() if line.startswith(b"{")]


def engine(work: Path, times: DriftTimes) -> list[dict[str, float]]:
    """The engine idle on its own Tansu and redis-server: per window, its worker's CPU
    and the first push after the window."""
    windows: list[dict[str, float]] = []
    with own_engine(work, "drift", ENGINE_ENV) as (eng, prober):
        born = time.monotonic()
        while time.monotonic() - born < times.seconds:
            before, t0 = thread_cpu(eng.proc.pid), time.monotonic()
            time.sleep(times.window_s)
            after, t1 = thread_cpu(eng.proc.pid), time.monotonic()
            eng.check()
            use = split_threads(eng.proc.pid, before, after, t1 - t0)
            windows.append({"age_s": round(t1 - born, 1), "cores": use["worker"],
                            "first_push_ms": round(prober.push_ms(eng, timeout_s=30), 2)})
    return windows


def _plot(path: Path, runs: list[dict[str, list[dict[str, float]]]]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(runs):
        for label, ws in r.items():
            kw: dict[str, Any] = {"label": label if i == 0 else None, "alpha": 0.8,
                                  "color": _COLORS.get(label, "C2")}
            ax1.plot([w["age_s"] for w in ws], [w["cores"] for w in ws],
                     marker="o", **kw)
            if "longest_pause_ms" in ws[0]:
                ax2.plot([w["age_s"] for w in ws], [w["longest_pause_ms"] for w in ws],
                         marker="o", **kw)
    ax1.set(xlabel="age (s)", ylabel="cores",
            title="CPU by age, idle (bare: process; engine: worker thread)")
    ax2.set(xlabel="age (s)", ylabel="ms",
            title="longest pause between reads of a 1 ms partition")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(ctx: BenchContext) -> PartResult:
    """``ctx.runs`` runs (quick: 1, short) of the bare variants and the engine."""
    times = QUICK if ctx.quick else FULL
    n = ctx.run_count
    result = PartResult(PART)
    runs: list[dict[str, list[dict[str, float]]]] = []
    for i in range(n):
        r = {label: bare(args, times) for label, args in LAYOUTS.items()}
        r[ENGINE] = engine(ctx.work_dir / f"run{i}", times)
        runs.append(r)
    for r in runs:
        for label, ws in r.items():
            first, last = ws[0], ws[-1]
            result.figure(f"CPU, first {times.window_s:g} s, {label}", "cores",
                          higher_is_better=False).values.append(first["cores"])
            result.figure(f"CPU, last {times.window_s:g} s, {label}", "cores",
                          higher_is_better=False).values.append(last["cores"])
            if "longest_pause_ms" in first:
                result.figure(f"longest pause, first {times.window_s:g} s, {label}", "ms",
                              higher_is_better=False).values.append(first["longest_pause_ms"])
                result.figure(f"longest pause, last {times.window_s:g} s, {label}", "ms",
                              higher_is_better=False).values.append(last["longest_pause_ms"])
            if "first_push_ms" in first:
                result.figure(f"first push after each window, median, {label}", "ms",
                              higher_is_better=False).values.append(
                    round(statistics.median(w["first_push_ms"] for w in ws), 2))
                result.figure(f"first push after each window, max, {label}", "ms",
                              higher_is_better=False).values.append(
                    max(w["first_push_ms"] for w in ws))
    result.extra["runs"] = runs
    result.extra["times"] = times.__dict__
    plot = ctx.results_path(PART, ".png")
    _plot(plot, runs)
    result.plots.append(plot)
    result.notes.append(
        f"nothing to read; {times.seconds:g} s per variant in windows of {times.window_s:g} s; "
        "1 s epochs; bare flows: 9 partitions woken every 1 ms (10 ms in the 2-worker "
        "variants, as the engine's idle rest) and 1 every 50 ms")
    return result
