"""The gateway's Prometheus metrics, served at ``GET /metrics`` of its ASGI app.

Nothing is counted twice and nothing is added on the push path: :class:`GatewayCollector`
reads, at scrape time, the counters the gateway already keeps (``Gateway.stats``,
``Gateway.open_streams`` and ``Hub.stats``). Each app has its own registry
(:func:`gateway_registry`), holding that collector and the process, platform and GC
collectors, so two gateways in one process (tests) do not collide, and an engine in the
same process does not leak into it.

Label values are bounded: transport (``sse``, ``websocket``), close reasons, token
refusal reasons. Never a terminal id.

``/metrics`` is served on the gateway's own port, without a token (it holds counts
only); keep it off the public ingress if that matters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["GatewayCollector", "gateway_registry", "metrics_endpoint"]

TRANSPORTS = ("sse", "websocket")


class GatewayCollector(Collector):
    """Exposes one :class:`~gateway.app.Gateway`'s counters as Prometheus metrics."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterable[Metric]:
        """The metric families, read from the gateway's counters now."""
        gw = self.gateway
        stats = dict(gw.stats)
        hub_stats = dict(gw.hub.stats)

        yield GaugeMetricFamily("touchstream_gateway_connections",
                                "Open push streams (SSE and WebSocket)", value=gw.open_streams)
        yield GaugeMetricFamily("touchstream_gateway_streams",
                                "Distinct terminal streams with at least one connection",
                                value=gw.hub.streams())

        opened = CounterMetricFamily("touchstream_gateway_connections_opened",
                                     "Push streams opened, by transport", labels=["transport"])
        for t in TRANSPORTS:
            opened.add_metric([t], stats.get(f"opened_{t}", 0))
        yield opened

        closed = CounterMetricFamily(
            "touchstream_gateway_connections_closed",
            "Push streams closed, by reason (client_closed, slow_consumer, send_timeout, "
            "token_expired, shutdown)", labels=["reason"])
        for key, n in sorted(stats.items()):
            if key.startswith("closed_"):
                closed.add_metric([key[7:]], n)
        yield closed

        rejected = CounterMetricFamily(
            "touchstream_gateway_connections_rejected",
            "Connections refused before streaming, by reason (full: max_connections)",
            labels=["reason"])
        rejected.add_metric(["full"], stats.get("rejected_full", 0))
        yield rejected

        auth = CounterMetricFamily(
            "touchstream_gateway_auth_failures",
            "Requests refused by token checks, by HTTP code (401: no or bad token; 403: a "
            "token for another terminal) and reason", labels=["code", "reason"])
        for key, n in sorted(stats.items()):
            if key == "auth_forbidden":
                auth.add_metric(["403", "forbidden"], n)
            elif key.startswith("auth_"):
                auth.add_metric(["401", key[5:]], n)
        yield auth

        yield CounterMetricFamily("touchstream_gateway_pushes_sent",
                                  "Pushes sent to terminals", value=stats.get("pushes_sent", 0))
        yield CounterMetricFamily("touchstream_gateway_heartbeats",
                                  "Heartbeats sent to terminals",
                                  value=stats.get("heartbeats", 0))
        yield CounterMetricFamily("touchstream_gateway_read_errors",
                                  "Stream reads from Redis that failed (retried)",
                                  value=stats.get("read_errors", 0))
        yield CounterMetricFamily("touchstream_gateway_notifications",
                                  "Push notifications heard on pub/sub for a connected stream",
                                  value=hub_stats.get("notifications", 0))
        yield CounterMetricFamily("touchstream_gateway_listener_errors",
                                  "Times the pub/sub listener lost Redis and reconnected",
                                  value=hub_stats.get("listener_errors", 0))
        yield GaugeMetricFamily("touchstream_gateway_listener_up",
                                "1 while the pub/sub listener is subscribed",
                                value=1 if gw.hub.listening else 0)


def gateway_registry(gateway: Gateway) -> CollectorRegistry:
    """A registry with ``gateway``'s collector plus process, platform and GC metrics."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(GatewayCollector(gateway))
    for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(c)
    return registry


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``: the Prometheus text exposition of ``app.state.metrics``."""
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), headers={"content-type": CONTENT_TYPE_LATEST})
