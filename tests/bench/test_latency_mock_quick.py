"""The latency part on librdkafka's mock cluster, quick mode: it starts its own broker,
the engine runs on it and pushes are measured (nothing about speed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import latency, latency_mock
from bench.latency import broker_pid
from bench.mock_kafka import PARTITIONS, ensure_topics, start_mock_kafka
from tests.bench import quick_ctx

pytestmark = pytest.mark.integration


def test_mock_kafka_serves_and_makes_topics(tmp_path: Path) -> None:
    broker = start_mock_kafka(tmp_path / "mock.log")
    try:
        assert broker.address.startswith("127.0.0.1:")
        assert ensure_topics(broker.address, ["a", "b"]) == {"a": PARTITIONS, "b": PARTITIONS}
        # The latency part reads the broker's CPU through its pid.
        assert broker_pid(broker.address) == broker.proc.pid
    finally:
        broker.stop()
    assert broker.proc.returncode == 0  # SIGTERM ends it cleanly


def test_latency_mock_quick(redis_server: str, tmp_path: Path) -> None:
    # No Tansu given: the part starts its own broker.
    ctx = quick_ctx(tmp_path, runs=1, brokers="unused:1", redis_url=redis_server)
    result = latency_mock.run(ctx)

    assert result.part == "latency_mock"
    (run,) = result.extra["runs"]
    (phase,) = latency.QUICK.phases
    assert run["sent"] == round(phase.rate * phase.duration_s)
    assert run["latency"]["count"] > 0
    assert run["drain_s"] is not None
    assert run["cpu"].get("broker") is not None  # the mock cluster's process was found
    assert any("mock cluster" in n for n in result.notes)
    assert any(f"{PARTITIONS} partitions" in n for n in result.notes)
    figures = {f.name: f for f in result.figures}
    label = latency._label(phase.name)
    assert figures[f"push latency p99 @ {label}"].values[0] > 0
    # The targets are judged on Tansu: no row of this part carries one.
    assert all(not f.target for f in result.figures)
    assert result.plots[0] == ctx.results_path("latency_mock", "-cdf.png")
    assert result.plots[0].is_file()
