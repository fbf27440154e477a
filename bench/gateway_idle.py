"""Gateway part: idle terminal connections one push-gateway process holds, and their cost.

Each run is :func:`gateway.loadtest.measure`: a fresh gateway process (``python -m
gateway serve``) on the bench's redis-server (its own db, 9), N idle SSE connections
(quick: 200) opened from this process, then the gateway's RSS per connection, its CPU
while they sit idle for one poll interval, the push latency with them open, and the
gateway CPU each new connection costs. The WebSocket figure is one extra run.

Run alone: ``python -m gateway.loadtest -n 5000`` (the same measurement, printed).
To run it under ``python -m bench``, ``gateway_idle`` must be listed in
``bench/__main__.py``'s ``PARTS``.
"""

from __future__ import annotations

import statistics

from bench.core import BenchContext, PartResult
from bench.services import redis_db_url
from gateway.loadtest import LoadResult, measure

__all__ = ["FULL_N", "QUICK_N", "run"]

PART = "gateway_idle"
QUICK_N = 200
FULL_N = 5000


def _add(result: PartResult, res: LoadResult, suffix: str = "") -> None:
    n = res.connections
    result.figure(f"idle connections held{suffix}", "connections",
                  target=f"{n} of {n}").values.append(res.opened)
    result.figure(f"RSS per idle connection{suffix}", "KiB",
                  higher_is_better=False).values.append(round(res.per_connection_kib, 1))
    result.figure(f"gateway RSS with {n} idle{suffix}", "MiB",
                  higher_is_better=False).values.append(round(res.rss_loaded_kib / 1024, 1))
    result.figure(f"idle CPU with {n} connections{suffix}", "% of a core",
                  higher_is_better=False).values.append(round(res.idle_cpu_percent, 2))
    result.figure(f"gateway CPU per new connection{suffix}", "ms",
                  higher_is_better=False).values.append(round(res.open_cpu_ms_per_connection, 2))
    if res.push_latency_ms:
        result.figure(f"push latency p50 with {n} idle{suffix}", "ms",
                      higher_is_better=False).values.append(
            round(statistics.median(res.push_latency_ms), 2))


def run(ctx: BenchContext) -> PartResult:
    """``ctx.runs`` SSE runs of N idle connections, and one WebSocket run."""
    n = QUICK_N if ctx.quick else FULL_N
    hold = 2.0 if ctx.quick else 30.0
    runs = ctx.run_count
    url = redis_db_url(ctx.redis_url, 9)
    result = PartResult(PART)
    for i in range(runs):
        res = measure(n, mode="sse", redis_url=url, hold_s=hold,
                      log_file=ctx.work_dir / f"gateway-sse-{i}.log")
        _add(result, res)
        result.notes.extend(res.notes)
        result.extra.setdefault("sse", []).append(res.summary())
    res = measure(n, mode="ws", redis_url=url, hold_s=hold,
                  log_file=ctx.work_dir / "gateway-ws.log")
    _add(result, res, " (websocket)")
    result.notes.extend(res.notes)
    result.extra["ws"] = res.summary()
    result.notes.append("per connection = (RSS with N open - RSS after a warm-up) / N; "
                        "heartbeat 15 s, poll interval 30 s")
    return result
