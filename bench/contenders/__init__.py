"""The contender protocol of the throughput part.

A contender is a module ``bench.contenders.<name>`` with ``CONTENDER = True`` that runs
as its own process::

    python -m bench.contenders.<name> --brokers B --topics a,b,c --expect N \\
        --result FILE [--redis URL] [--processes P]

It reads the topics from the beginning, stops by itself once it has consumed all
``N`` events (or gives up when the input stays idle), and writes a JSON result
``{"events": .., "seconds": .., "rate": .., ...}`` to ``FILE``, measured as
:mod:`bench.timing` describes (first record received to last record processed).
Extra keys are kept and shown in the bench's ``extra``. Scratch files (timing files,
state directories, logs of child processes) go to :func:`scratch_dir`. A contender
that cannot run with the given ``--processes`` exits with an error.

A module (or its ``CONTENDER`` flag) may be missing: :func:`contender_available`
tells the throughput part to skip it with a note. :func:`run_contender` launches one
contender with a timeout and returns its checked result.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import gcstats
from bench.timing import Timing

__all__ = [
    "ContenderArgs",
    "ContenderError",
    "contender_available",
    "parse_args",
    "run_contender",
    "scratch_dir",
    "write_result",
]

REPO_ROOT = Path(__file__).resolve().parents[2]


class ContenderError(RuntimeError):
    """A contender failed, timed out, or did not read the expected events."""


@dataclass(frozen=True)
class ContenderArgs:
    """The parsed protocol arguments (plus a contender's own, in ``extra``)."""

    brokers: str
    topics: list[str]
    expect: int
    result: Path
    redis: str | None
    processes: int
    extra: argparse.Namespace


def parse_args(
    argv: Sequence[str] | None = None,
    description: str | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> ContenderArgs:
    """Parse the protocol arguments; ``add_arguments`` may add a contender's own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--brokers", required=True, help="bootstrap servers")
    p.add_argument("--topics", required=True, help="comma-separated input topics")
    p.add_argument("--expect", required=True, type=int, help="events to consume, then stop")
    p.add_argument("--result", required=True, type=Path, help="where to write the JSON result")
    p.add_argument("--redis", default=None, help="redis URL (for contenders that need one)")
    p.add_argument("--processes", type=int, default=1, help="processes to run on")
    if add_arguments is not None:
        add_arguments(p)
    ns = p.parse_args(argv)
    topics = [t for t in ns.topics.split(",") if t]
    if not topics:
        p.error("--topics is empty")
    if ns.expect < 1 or ns.processes < 1:
        p.error("--expect and --processes must be positive")
    return ContenderArgs(ns.brokers, topics, ns.expect, ns.result, ns.redis, ns.processes, ns)


def scratch_dir(result: Path) -> Path:
    """A directory next to the result file for a contender's scratch files (created)."""
    d = result.with_name(result.stem + ".d")
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_result(result: Path, timing: Timing, gc_dir: Path | None = None,
                 **extra: Any) -> dict[str, Any]:
    """Write ``{"events", "seconds", "rate", "first", "last", **extra}`` to ``result``.

    Where the contender called :func:`bench.gcstats.install`, the time its processes
    spent in the garbage collector within the window is added (``gc_s``, ``gc_full_s``,
    ``gc_collections``; other processes' records are read from ``gc_dir``).
    """
    doc = {**timing.to_json(), **extra}
    if gcstats.installed():
        doc.update(gcstats.in_window(timing.first, timing.last, gc_dir))
    result.parent.mkdir(parents=True, exist_ok=True)
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(result)
    return doc


def contender_available(name: str) -> tuple[bool, str]:
    """Whether ``bench.contenders.<name>`` exists and says ``CONTENDER = True``.

    Imports the module (in this process) to read the flag; returns ``(ok, why not)``.

    :raises ContenderError: the module exists but cannot be imported (broken, not
        merely absent).
    """
    modname = f"{__name__}.{name}"
    if importlib.util.find_spec(modname) is None:
        return False, f"{modname} does not exist"
    try:
        mod = importlib.import_module(modname)
    except Exception as exc:
        raise ContenderError(
            f"{modname} cannot be imported: {type(exc).__name__}: {exc}"
        ) from exc
    if getattr(mod, "CONTENDER", False) is not True:
        return False, f"{modname} does not set CONTENDER = True"
    return True, ""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The contender runs in its own session (process group id == its pid), so this
    # ends it and any worker processes it started, and nothing else.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def profiled(cmd: Sequence[str], out: Path, rate: int = 100) -> list[str]:
    """``cmd`` run under ``py-spy record``, its samples written to ``out``.

    The samples are py-spy's raw collapsed stacks, one ``stack count`` line each, with
    every process of the contender (``--subprocesses``: the processes of a cluster),
    each thread named (``--threads``) and the time threads spend waiting (``--idle``),
    so a worker idling in a call shows as much as one working. py-spy reads the stacks
    without stopping the process (``--nonblocking``): stopping it 100 times a second
    slowed touchstream markedly on this host, and a slowed worker finds its input
    queues full, which hides the waits a profile looks for. Only the contender is
    recorded (py-spy over the whole bench also samples the bench's own process and
    every contender, nested under it). Read the file with
    ``python -m bench.profile_share``.

    :raises ContenderError: py-spy is not installed (``pip install py-spy``).
    """
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        raise ContenderError(f"profiling needs py-spy next to {sys.executable} "
                             "(pip install py-spy)")
    return [str(spy), "record", "--subprocesses", "--threads", "--idle", "--nonblocking",
            "--rate", str(rate), "--format", "raw", "--output", str(out), "--", *cmd]


def run_contender(
    name: str,
    *,
    brokers: str,
    topics: Sequence[str],
    expect: int,
    result: Path,
    redis_url: str | None = None,
    processes: int = 1,
    timeout_s: float = 300.0,
    extra_args: Sequence[str] = (),
    profile: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python -m bench.contenders.<name>`` and return its checked result.

    ``env`` is set in the contender's environment over this process's (settings such as
    ``TOUCHSTREAM_ENGINE__EPOCH_QUIET_MS``, which the touchstream contender reads).

    The process's output goes to ``<result>.log``. The returned dict is the
    contender's result plus ``wall_s`` (the whole process, start-up included).
    With ``profile``, the contender runs under py-spy (:func:`profiled`), which writes
    its samples there.

    :raises ContenderError: non-zero exit, timeout (the process group is killed), no
        result, a result with another event count than ``expect``, or no rate.
    """
    result = Path(result)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    log_path = result.with_suffix(".log")
    cmd = [
        sys.executable, "-m", f"{__name__}.{name}",
        "--brokers", brokers,
        "--topics", ",".join(topics),
        "--expect", str(expect),
        "--result", str(result),
        "--processes", str(processes),
    ]
    if redis_url:
        cmd += ["--redis", redis_url]
    cmd += list(extra_args)
    if profile is not None:
        cmd = profiled(cmd, profile)
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    label = f"{name}" + (f" ({processes} processes)" if processes > 1 else "")
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise ContenderError(
                f"{label} timed out after {timeout_s:.0f}s; log {log_path}:\n{_tail(log_path)}"
            ) from None
        finally:
            _kill_group(proc)  # leftover children, if any
    wall_s = time.monotonic() - t0
    if rc != 0:
        raise ContenderError(
            f"{label} exited with {rc}; log {log_path}:\n{_tail(log_path)}"
        )
    try:
        doc: dict[str, Any] = json.loads(result.read_text())
    except (OSError, ValueError) as exc:
        raise ContenderError(f"{label} wrote no result ({exc}); log {log_path}") from exc
    if doc.get("events") != expect:
        raise ContenderError(
            f"{label} consumed {doc.get('events')} events, expected {expect}; log {log_path}"
        )
    if not doc.get("rate") or doc["rate"] <= 0:
        raise ContenderError(f"{label} measured no rate: {doc}")
    doc["wall_s"] = wall_s
    return doc
