"""Where a profiled contender's worker spent its time.

``python -m bench.profile_share FILE NAME... [--worker FUNC]``

``FILE`` holds py-spy's raw samples of one contender (``python -m bench.throughput
--profile`` writes them, see :func:`bench.contenders.profiled`; ``.xz`` files are read
compressed, as the ones kept under ``bench/results/``): one line per distinct
stack, ``frame;frame;...;frame count``. The stack starts with a ``process PID:...``
frame for each process from the contender down to the one sampled (a cluster's
processes are children of the contender's) and a ``thread (TID): NAME`` frame.

For each process it prints the share of its **worker's samples** whose stack holds
``NAME`` (a function as py-spy prints it, ``_KafkaPartition.next_batch``) anywhere: the
time spent in it and below it, waiting included (the samples were taken with
``--idle``). The worker's samples are those of the threads that ever ran ``--worker``
(default ``_ShardLogic.on_batch``, the flow's keyed step), leaving out the stacks of the
process's entry point that do not hold ``run_dataflow``: in a 1-process run the worker
is the main thread, which loads the profiles before the flow starts and counts pushes
after it ends. Other threads (the rules poller, a cluster process's main thread waiting
in ``cluster_main``) do not count. The samples include the flow's start and its idle
second before a finite source ends; in a run of many seconds both are small.
"""

from __future__ import annotations

import argparse
import lzma
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["ENTRY", "WORKER", "shares"]

WORKER = "_ShardLogic.on_batch"
"""A function only the worker thread runs: the threads that ran it are the worker."""

ENTRY = "_run_module_as_main"
"""The root of a process's main-thread stacks (``python -m``)."""

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*)\)$")
_PROCESS = re.compile(r"^process (?P<pid>\d+):")
_THREAD = re.compile(r"^thread \((?P<tid>[0-9a-fA-Fx]+)\)")


def _function(frame: str) -> str:
    m = _FRAME.match(frame)
    return m.group("func") if m else frame


def _split(line: str) -> tuple[str, str, list[str], int] | None:
    """``(pid, tid, functions, count)`` of one raw line, or None for a blank one."""
    stack, _, count = line.rstrip("\n").rpartition(" ")
    if not stack or not count.isdigit():
        return None
    frames = stack.split(";")
    pid = tid = "-"
    while frames and (m := _PROCESS.match(frames[0])):  # the innermost process wins
        pid = m.group("pid")
        frames = frames[1:]
    if frames and (t := _THREAD.match(frames[0])):
        tid = t.group("tid")
        frames = frames[1:]
    return pid, tid, [_function(f) for f in frames], int(count)


def shares(lines: Iterable[str], names: Sequence[str], *,
           worker: str = WORKER) -> dict[str, dict[str, float]]:
    """``{pid: {"samples": n, name: share, ...}}``: the shares of ``names`` in the
    worker's samples of each process of py-spy raw ``lines`` (see the module doc).

    ``pid`` is ``"-"`` for samples taken without ``--subprocesses``; a process with no
    thread that ran ``worker`` is left out.
    """
    stacks = [s for s in map(_split, lines) if s is not None]
    workers = {(pid, tid) for pid, tid, funcs, _ in stacks if worker in funcs}
    totals: Counter[str] = Counter()
    hits: dict[str, Counter[str]] = {}
    for pid, tid, funcs, n in stacks:
        if (pid, tid) not in workers:
            continue
        if funcs and funcs[0] == ENTRY and "run_dataflow" not in funcs:
            continue  # the 1-process worker's set-up and wind-down
        totals[pid] += n
        held = set(funcs)
        per = hits.setdefault(pid, Counter())
        for name in names:
            if name in held:
                per[name] += n
    return {
        pid: {"samples": float(total),
              **{name: hits[pid][name] / total for name in names}}
        for pid, total in totals.items()
    }


def main(argv: list[str] | None = None) -> int:
    """Print the shares of ``NAME`` s in each process's worker samples of ``FILE``."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("file", type=Path)
    p.add_argument("names", nargs="+", help="functions, as py-spy prints them")
    p.add_argument("--worker", default=WORKER, metavar="FUNC",
                   help=f"the threads that ran FUNC are the worker (default {WORKER})")
    args = p.parse_args(argv)
    opener = lzma.open if args.file.suffix == ".xz" else open
    with opener(args.file, "rt") as f:
        result = shares(f, args.names, worker=args.worker)
    if not result:
        print(f"no thread ran {args.worker}")
        return 1
    for pid, row in sorted(result.items()):
        print(f"process {pid}: {int(row['samples'])} worker samples")
        for name in args.names:
            print(f"  {100 * row[name]:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
