"""``python -m bench [PART ...] [--quick] [--runs N]``: the benchmark suite.

Starts one Tansu broker and one redis-server (never a server it did not start), runs
the parts asked for (default: all, in the order below) against them, writes
``bench/results/<date>-<part>.json`` and the parts' PNG plots, and prints one table:
each figure's median over the runs with min and max, and its target. The table is
also written as Markdown to ``bench/results/<date>-table.md`` (what README shows).

``--quick`` is the CI mode: tiny inputs, a few seconds per part, proving the suite
works; its numbers mean nothing and nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench.core import BenchContext, PartResult, free_path
from bench.host import add_reference
from bench.services import services

PARTS = ("throughput", "latency", "memory")
# run only when named
EXTRA_PARTS = ("gateway_idle", "broker_fetch", "engine_idle", "input_drift", "decode",
               "profile_reads", "snapshot", "epoch_grid", "latency_mock", "timer_reads")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def table_rows(results: list[PartResult]) -> list[list[str]]:
    """One row per figure: part, figure, median, min, max, unit, runs, target."""
    rows = []
    for r in results:
        for f in r.figures:
            rows.append([r.part, f.name, _fmt(f.median), _fmt(f.min), _fmt(f.max), f.unit,
                         str(len(f.values)), f.target])
    return rows


HEADER = ["part", "figure", "median", "min", "max", "unit", "runs", "target"]


def render_text(rows: list[list[str]]) -> str:
    """A fixed-width table."""
    widths = [max(len(x) for x in col) for col in zip(HEADER, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def render_markdown(rows: list[list[str]]) -> str:
    """The same table in Markdown."""
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; exit 1 if a part failed (after running the others)."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="*",
                   help=f"parts to run: {', '.join(PARTS + EXTRA_PARTS)} "
                   f"(default: {', '.join(PARTS)})")
    p.add_argument("--quick", action="store_true", help="CI mode: tiny, proves the suite runs")
    p.add_argument("--runs", type=int, default=None, help="runs per figure (default 3)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--date", default=datetime.now(UTC).strftime("%Y-%m-%d"))
    args = p.parse_args(argv)
    unknown = [x for x in args.parts if x not in PARTS + EXTRA_PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; "
                f"choose from {', '.join(PARTS + EXTRA_PARTS)}")
    parts = args.parts or list(PARTS)
    runs = args.runs or 3
    started = time.monotonic()
    results: list[PartResult] = []
    failed: list[str] = []
    host = PartResult("host")
    add_reference(host, "before", quick=args.quick)
    with tempfile.TemporaryDirectory(prefix="touchstream-bench-") as tmp:
        work = Path(tmp)
        with services(work / "services") as (brokers, redis_url):
            for name in parts:
                ctx = BenchContext(brokers=brokers, redis_url=redis_url, quick=args.quick,
                                   runs=runs, results_dir=args.results_dir,
                                   work_dir=work / name, date=args.date)
                ctx.work_dir.mkdir(parents=True, exist_ok=True)
                t0 = time.monotonic()
                print(f"== {name} ({'quick' if args.quick else f'{runs} runs'})", flush=True)
                try:
                    module = importlib.import_module(f"bench.{name}")
                    result: PartResult = module.run(ctx)
                except Exception:
                    traceback.print_exc()
                    failed.append(name)
                    continue
                result.extra.setdefault("seconds", round(time.monotonic() - t0, 1))
                ctx.results_path(name).write_text(json.dumps(result.to_json(), indent=1,
                                                             default=str))
                results.append(result)
                print(f"   {name} done in {time.monotonic() - t0:.0f} s", flush=True)
    add_reference(host, "after", quick=args.quick)
    host.notes.append("the same two references (bench/host.py) before the first part and "
                      "after the last: how fast this host was during the run (compare "
                      "tables by them)")
    results.insert(0, host)
    rows = table_rows(results)
    text = render_text(rows)
    print()
    print(text)
    for r in results:
        for note in r.notes:
            print(f"note ({r.part}): {note}")
    if len(results) > 1:  # a part besides the host reference
        # make bench's table is <date>-table.md; a run of named parts gets its own name,
        # so that it never replaces the full table README shows
        suffix = "" if not args.parts else "-" + "-".join(parts)
        md = free_path(args.results_dir / f"{args.date}-table{suffix}.md")
        md.parent.mkdir(parents=True, exist_ok=True)
        cmd = "make bench" if not args.parts and not args.quick else \
            "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
        md.write_text(f"Made by `{cmd}` on {args.date} "
                      f"({time.monotonic() - started:.0f} s).\n\n{render_markdown(rows)}\n")
    print(f"\nbench finished in {time.monotonic() - started:.0f} s"
          + (f"; FAILED parts: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
