"""The gateway's /metrics: connections, pushes sent, auth failures (gateway/metrics.py)."""

from __future__ import annotations

import time

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import SSE, Running, add_push

pytestmark = pytest.mark.integration

PATH = "/v1/terminals/{}/pushes"


def scrape(gw: Running) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the gateway's /metrics: (name, sorted labels) -> value."""
    r = httpx.get(gw.url + "/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(gw: Running, name: str, want: float, timeout_s: float = 5.0,
             **labels: str) -> None:
    deadline = time.monotonic() + timeout_s
    got = None
    while time.monotonic() < deadline:
        got = sample(scrape(gw), name, **labels)
        if got == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name}{labels} = {got}, not {want}")


def test_metrics_answers_and_counts_a_connection(gateway: Running,
                                                 redis_url: str) -> None:
    first = scrape(gateway)
    assert sample(first, "touchstream_gateway_connections") == 0
    assert sample(first, "touchstream_gateway_listener_up") in (0, 1)
    assert ("process_cpu_seconds_total", ()) in first  # the process collector (Linux)

    # a refused token is counted by code and reason
    assert httpx.get(gateway.url + PATH.format("T1"), timeout=5).status_code == 401
    after_401 = scrape(gateway)
    assert sample(after_401, "touchstream_gateway_auth_failures_total",
                  code="401", reason="missing") == 1
    r = httpx.get(gateway.url + PATH.format("T1"), timeout=5,
                  headers={"authorization": f"Bearer {gateway.token('T2')}"})
    assert r.status_code == 403
    assert sample(scrape(gateway), "touchstream_gateway_auth_failures_total",
                  code="403", reason="forbidden") == 1

    client = httpx.Client(timeout=httpx.Timeout(5.0))
    request = client.build_request("GET", gateway.url + PATH.format("T1"), headers={
        "authorization": f"Bearer {gateway.token('T1')}"}, params={"since": "0"})
    response = client.send(request, stream=True)
    try:
        assert response.status_code == 200
        wait_for(gateway, "touchstream_gateway_connections", 1)
        wait_for(gateway, "touchstream_gateway_connections_opened_total", 1, transport="sse")
        rc = redis.Redis.from_url(redis_url)
        try:
            add_push(rc, "T1", 1)
        finally:
            rc.close()
        SSE(response).pushes(1)
        wait_for(gateway, "touchstream_gateway_pushes_sent_total", 1)
    finally:
        response.close()
        client.close()
    wait_for(gateway, "touchstream_gateway_connections", 0)
    wait_for(gateway, "touchstream_gateway_connections_closed_total", 1,
             reason="client_closed")
