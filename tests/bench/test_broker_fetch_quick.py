"""The broker-fetch part in quick mode: all three variants run and every window is counted.

Nothing is asserted about speed: only that the producer's records were consumed (all
of them, across the windows), that each variant had its own broker and that the
figures and the plot are there.
"""

from __future__ import annotations

from pathlib import Path

from bench import broker_fetch
from tests.bench import quick_ctx


def test_broker_fetch_quick(tmp_path: Path) -> None:
    ctx = quick_ctx(tmp_path)
    result = broker_fetch.run(ctx)

    sent = int(broker_fetch.QUICK["rate"] * broker_fetch.QUICK["seconds"])
    labels = ["3 topics x 3 partitions", "3 topics x 1 partition",
              "3 topics x 3 partitions, one consumer"]
    for label in labels:
        (windows,) = result.extra[label]
        consumed = sum(w["records"] for w in windows)
        assert consumed == sent, (label, consumed)  # the consumer drains after the last send
        assert any(w["broker_cores"] > 0 for w in windows)  # the broker's CPU was read
    assert {p.name for p in result.plots} == {"2000-01-01-broker_fetch-windows.png"}
    assert all(p.stat().st_size > 0 for p in result.plots)
    names = [f.name for f in result.figures]
    assert any(n.startswith("send→consume p99, last window") for n in names)
    assert (tmp_path / "work" / "run0" / "tansu-3p" / "tansu.log").exists()
    assert (tmp_path / "work" / "run0" / "tansu-1p" / "tansu.log").exists()
    assert (tmp_path / "work" / "run0" / "tansu-3p-shared" / "tansu.log").exists()
    per_s = [f for f in result.figures if f.name.startswith("records consumed per s")]
    assert len(per_s) == len(labels) and all(f.values[0] > 0 for f in per_s)
