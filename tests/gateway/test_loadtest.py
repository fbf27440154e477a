"""The idle-connection load test runs (tiny: its figures are measured by hand, see README)."""

from __future__ import annotations

import pytest

from gateway.loadtest import measure

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["sse", "ws"])
def test_loadtest_runs(redis_url: str, mode: str) -> None:
    result = measure(40, mode=mode, redis_url=redis_url, hold_s=0.5, heartbeat_s=0.2,
                     settle_s=0.2)
    assert result.opened == 40 and not result.notes
    assert result.rss_loaded_kib > 0 and result.per_connection_kib > -1000
    assert len(result.push_latency_ms) == 40  # every sampled terminal got its push
    assert result.heartbeats_received > 0
    assert 1 <= result.redis_clients <= 64 + 1
    assert "per idle connection" in result.summary()
