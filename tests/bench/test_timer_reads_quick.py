"""The timer reads part in quick mode, against the test session's redis-server.

Nothing is asserted about speed: only that both ways were timed in every run, that they
fired the same outputs, one help-sprite push per timer (the part raises otherwise),
that one due per call read one profile per round trip and all at once read them in one,
that the part removes the profiles it loaded, and that the plot is there.
"""

from __future__ import annotations

from pathlib import Path

import redis

from bench import timer_reads
from tests.bench import quick_ctx


def test_timer_reads_quick(tmp_path: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("someone-else", "1")
    ctx = quick_ctx(tmp_path, runs=2, redis_url=redis_url)
    result = timer_reads.run(ctx)

    by_name = {f.name: f for f in result.figures}
    for n in timer_reads.QUICK.timers:
        for way in timer_reads.WAYS:
            for what in ("wall", "CPU"):
                f = by_name[f"{way}, {n:,} timers, {what} per timer"]
                assert len(f.values) == 2 and all(v > 0 for v in f.values)
        one = by_name[f"one due per call, {n:,} timers, Redis round trips per timer"]
        once = by_name[f"all due at once, {n:,} timers, Redis round trips per timer"]
        assert one.values == [1.0, 1.0]  # a read per fired timer
        assert once.values == [1 / n, 1 / n]  # one read for all of them
    assert client.keys(timer_reads.PREFIX + "*") == []  # its own keys are gone
    assert client.get("someone-else") == b"1"  # and nothing else was touched
    client.close()
    assert [p.name for p in result.plots] == ["2000-01-01-timer_reads.png"]
    assert result.plots[0].stat().st_size > 0
