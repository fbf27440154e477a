"""Throughput part: how many events per second each contender gets through.

Each run produces a fresh dataset (the seeded workload, keyed by customer id, on
three topics of 3 partitions: 500,000 events over 100,000 customers; quick mode
5,000 over 1,000) and runs every contender on it, one after another, each in its own
process reading the same topics from the beginning (see :mod:`bench.contenders`):

* ``limit``: a bare confluent-kafka consumer decoding with orjson (the ceiling of
  any Python consumer on this broker and host);
* ``bytewax count``: a bare Bytewax keyed count on the engine's ``KafkaInput``
  (the ceiling of the runtime the engine is built on);
* ``quix count``: the same keyed count in Quix Streams (a peer);
* ``touchstream 1p`` / ``2p``: the engine on one process and on a two-process
  cluster, when ``bench/contenders/touchstream.py`` exists and says
  ``CONTENDER = True``.

Rates are measured the same way for all (:mod:`bench.timing`): events / (last
record processed - first record received). Ratios are taken between contenders of
the same run, over the same data. A contender that fails or times out becomes a
note (quick mode raises instead, so CI catches a broken suite).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.contenders import ContenderError, contender_available, run_contender
from bench.core import BenchContext, Figure, PartResult
from bench.dataset import delete_dataset, produce_dataset
from bench.services import services
from bench.workload import Workload

__all__ = ["CONTENDERS", "RATIOS", "Contender", "run"]

PART = "throughput"
FULL = {"events": 500_000, "customers": 100_000}
QUICK = {"events": 5_000, "customers": 1_000}
PARTITIONS = 3
SEED = 1


@dataclass(frozen=True)
class Contender:
    """A figure's label, the contender module, and the processes to run it on."""

    label: str
    module: str
    processes: int = 1


CONTENDERS: tuple[Contender, ...] = (
    Contender("limit", "limit"),
    Contender("bytewax count", "bytewax_count"),
    Contender("quix count", "quix_count"),
    Contender("touchstream 1p", "touchstream", 1),
    Contender("touchstream 2p", "touchstream", 2),
)

RATIOS: tuple[tuple[str, str, str], ...] = (
    # (figure, numerator contender, denominator contender), all from the same run
    ("bytewax/limit", "bytewax count", "limit"),
    ("quix/bytewax", "quix count", "bytewax count"),
    ("touchstream 1p/bytewax", "touchstream 1p", "bytewax count"),
    ("touchstream 1p/quix", "touchstream 1p", "quix count"),
    ("touchstream 2p/1p", "touchstream 2p", "touchstream 1p"),
)

NOTES = (
    "rate = events / (last record processed - first record received): start-up, "
    "group joins and the idle wait before a finite source ends are excluded",
    "time in GC: the share of that window the contender's processes spent in Python's "
    "garbage collector (bench/gcstats.py); touchstream tunes its collector "
    "(flows.runner.tune_gc), the bare Bytewax and Quix counts run with Python's defaults",
    "faust: skipped (optional peer; faust-streaming is not installed)",
)


# Note a run if, just before it, other processes kept more than this share of the
# host's CPUs busy.
BUSY_SHARE = 0.25


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields), idle


def _host_busy(window_s: float = 1.0) -> float:
    """The share of all CPUs busy over ``window_s`` (0 where /proc/stat is missing)."""
    a = _cpu_times()
    time.sleep(window_s)
    b = _cpu_times()
    if a is None or b is None or b[0] == a[0]:
        return 0.0
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


def _timeout_s(events: int) -> float:
    # Generous: start-up (imports, a Quix group join) plus 2,000 events/s.
    return 60.0 + events / 2_000


# The targets, shown next to the figures (never lowered here).
TARGETS = {
    "touchstream 1p events/s": ">= 65,000 and >= bytewax count",
    "touchstream 2p events/s": ">= 100,000",
    "touchstream 1p/bytewax": ">= 1.0",
    "touchstream 1p/quix": ">= 1.6",
}


def _rate_figure(result: PartResult, label: str) -> Figure:
    name = f"{label} events/s"
    return result.figure(name, "events/s", target=TARGETS.get(name, ""))


def _gc_figure(result: PartResult, label: str) -> Figure:
    return result.figure(f"{label} time in GC", "share", higher_is_better=False)


def gc_share(doc: dict[str, Any], processes: int) -> float | None:
    """The share of a contender's measured window its processes spent in Python's
    garbage collector (``bench.gcstats``), or None if it did not record it."""
    gc_s = doc.get("gc_s")
    seconds = float(doc.get("seconds", 0.0))
    if gc_s is None or seconds <= 0:
        return None
    return float(gc_s) / (seconds * processes)


def run(ctx: BenchContext, *, profile: bool = False) -> PartResult:
    """Measure every available contender ``ctx.runs`` times on fresh datasets.

    With ``profile``, each touchstream contender runs under py-spy and its samples are
    written next to the results, as ``<date>-throughput-profile-run<i>-<n>p.txt``
    (:func:`bench.contenders.profiled`; a profiled run is slower, its rates are not
    comparable with unprofiled ones).
    """
    size = QUICK if ctx.quick else FULL
    n, customers = size["events"], size["customers"]
    result = PartResult(PART)
    result.notes.extend(NOTES)
    result.extra["config"] = {"events": n, "customers": customers, "partitions": PARTITIONS,
                              "seed": SEED, "runs": ctx.runs}

    contenders: list[Contender] = []
    availability: dict[str, tuple[bool, str]] = {}
    for c in CONTENDERS:
        if c.module not in availability:
            try:
                availability[c.module] = ok, why = contender_available(c.module)
            except ContenderError as exc:  # exists but is broken
                if ctx.quick:
                    raise
                availability[c.module] = ok, why = False, str(exc)
            if not ok:
                result.notes.append(f"{c.module}: skipped ({why})")
        if availability[c.module][0]:
            contenders.append(c)
    # Every figure exists (possibly empty) in a stable order, ratios after rates.
    for c in contenders:
        _rate_figure(result, c.label)
    labels = {c.label for c in contenders}
    ratios = [r for r in RATIOS if r[1] in labels and r[2] in labels]
    for name, _, _ in ratios:
        result.figure(name, "ratio", target=TARGETS.get(name, ""))
    for c in contenders:
        _gc_figure(result, c.label)

    runs: list[dict[str, Any]] = []
    result.extra["runs"] = runs
    work = ctx.work_dir / f"{PART}-{uuid.uuid4().hex[:6]}"
    for i in range(ctx.runs):
        # Nothing of ours runs now (the broker is idle): what keeps the CPUs busy
        # belongs to someone else and will slow every contender of this run.
        busy = _host_busy()
        if busy > BUSY_SHARE:
            result.notes.append(
                f"run {i + 1}: other processes kept {busy:.0%} of the host's "
                f"{os.cpu_count()} CPUs busy before the run: its figures are low"
            )
        prefix = f"bench.tp{i + 1}.{uuid.uuid4().hex[:6]}."
        ds = produce_dataset(ctx.brokers, prefix, n, Workload(customers, SEED),
                             partitions=PARTITIONS)
        run_doc: dict[str, Any] = {"dataset": ds.to_json(), "results": {}, "failed": {},
                                   "host_busy_before": busy}
        runs.append(run_doc)
        rates: dict[str, float] = {}
        try:
            for c in contenders:
                out = work / f"run{i + 1}" / f"{c.module}-{c.processes}p.json"
                spy = None
                if profile and c.module == "touchstream":
                    spy = ctx.results_path(PART, f"-profile-run{i + 1}-{c.processes}p.txt")
                    result.notes.append(f"run {i + 1}: {c.label} profiled into {spy}")
                try:
                    doc = run_contender(
                        c.module, brokers=ctx.brokers, topics=ds.topic_names, expect=n,
                        result=out, redis_url=ctx.redis_url, processes=c.processes,
                        timeout_s=_timeout_s(n), profile=spy,
                    )
                except ContenderError as exc:
                    if ctx.quick:
                        raise
                    run_doc["failed"][c.label] = str(exc)
                    first_line = str(exc).splitlines()[0]
                    result.notes.append(f"run {i + 1}: {c.label} failed: {first_line}")
                    continue
                run_doc["results"][c.label] = doc
                rates[c.label] = float(doc["rate"])
                _rate_figure(result, c.label).values.append(rates[c.label])
                share = gc_share(doc, c.processes)
                if share is not None:
                    _gc_figure(result, c.label).values.append(share)
        finally:
            try:
                delete_dataset(ds)
            except Exception as exc:
                result.notes.append(f"run {i + 1}: could not delete the dataset topics: {exc}")
        for name, num, den in ratios:
            if num in rates and den in rates:
                result.figure(name, "ratio").values.append(rates[num] / rates[den])

    plot = ctx.results_path(PART, ".png")
    _plot(result, plot, n)
    result.plots.append(plot)
    return result


def _plot(result: PartResult, path: Path, events: int) -> None:
    """Bars of medians with min-max error bars and each run as a dot: rates (log
    scale) and ratios."""
    import matplotlib  # noqa: PLC0415 (optional dependency, bench only)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rates = [f for f in result.figures if f.unit == "events/s" and f.values]
    ratios = [f for f in result.figures if f.unit == "ratio" and f.values]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8),
                             gridspec_kw={"width_ratios": [max(len(rates), 1),
                                                           max(len(ratios), 1)]})
    for ax, figs, title, fmt in (
        (axes[0], rates, f"events/s ({events:,} events, median of runs, min-max)", "{:,.0f}"),
        (axes[1], ratios, "ratios, same run", "{:.2f}"),
    ):
        ax.set_title(title, fontsize=10)
        if not figs:
            ax.text(0.5, 0.5, "nothing measured", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        names = [f.name.removesuffix(" events/s") for f in figs]
        med = [f.median for f in figs]
        err = [[f.median - f.min for f in figs], [f.max - f.median for f in figs]]
        bars = ax.bar(names, med, yerr=err, capsize=4, color="#4c72b0")
        for bar, f in zip(bars, figs, strict=True):
            x = bar.get_x() + bar.get_width() / 2
            ax.scatter([x] * len(f.values), f.values, s=9, color="black", zorder=3)
            ax.annotate(fmt.format(f.median), (x, f.max), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 4), textcoords="offset points")
        top = max(f.max for f in figs)
        if figs is rates:
            ax.set_yscale("log")
            ax.set_ylim(top=top * 1.8)  # room for the labels
        else:
            ax.set_ylim(0, max(top, 1.0) * 1.15)
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(result: PartResult) -> str:
    rows = [f"{'figure':<26} {'median':>12} {'min':>12} {'max':>12}  runs"]
    for f in result.figures:
        fmt = "{:>12,.0f}" if f.unit == "events/s" else "{:>12.3f}"
        rows.append(f"{f.name:<26} {fmt.format(f.median)} {fmt.format(f.min)} "
                    f"{fmt.format(f.max)}  {len(f.values)}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run this part alone on services of its own: ``python -m bench.throughput``."""
    p = argparse.ArgumentParser(description="the throughput part, on its own")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--profile", action="store_true",
                   help="run the touchstream contenders under py-spy (samples next to the "
                        "results; read them with python -m bench.profile_share)")
    args = p.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        brokers, redis_url = stack.enter_context(services(work / "services"))
        ctx = BenchContext(brokers, redis_url, args.quick, runs, args.results_dir, work,
                           datetime.now(UTC).strftime("%Y-%m-%d"))
        result = run(ctx, profile=args.profile)
    doc = result.to_json()
    out = ctx.results_path(PART)
    out.write_text(json.dumps(doc, indent=1, default=str) + os.linesep)
    print(_table(result))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {out} and {', '.join(str(p) for p in result.plots)}")
    # A median that is NaN means nothing was measured for that figure.
    return 0 if all(f.values for f in result.figures) else 1


if __name__ == "__main__":
    raise SystemExit(main())

