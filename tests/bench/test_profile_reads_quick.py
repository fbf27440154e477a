"""The profile reads part in quick mode, against the test session's redis-server.

Nothing is asserted about speed: only that every way was timed in every run, that the
three ways read the same profiles (the part raises otherwise), that the part removes
the profiles it loaded, and that the plot is there.
"""

from __future__ import annotations

from pathlib import Path

import redis

from bench import profile_reads
from tests.bench import quick_ctx


def test_profile_reads_quick(tmp_path: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("someone-else", "1")
    ctx = quick_ctx(tmp_path, runs=2, redis_url=redis_url)
    result = profile_reads.run(ctx)

    sizes = profile_reads.QUICK.sizes
    names = {f.name for f in result.figures}
    for way in profile_reads.WAYS:
        for n in sizes:
            assert f"{way}, batch {n:,}, wall per profile" in names
            assert f"{way}, batch {n:,}, CPU per profile" in names
    assert all(len(f.values) == 2 and all(v > 0 for v in f.values) for f in result.figures)
    assert 0 < result.extra["distinct_value_tuples"] <= profile_reads.QUICK.customers
    assert client.keys(profile_reads.PREFIX + "*") == []  # its own keys are gone
    assert client.get("someone-else") == b"1"  # and nothing else was touched
    client.close()
    assert [p.name for p in result.plots] == ["2000-01-01-profile_reads.png"]
    assert result.plots[0].stat().st_size > 0
