"""The gateway on a Redis Cluster (``redis_cluster``): terminal streams and the ops console.

The engine writes each terminal's push stream in that stream's slot and ``PUBLISH``es it
(a cluster delivers a ``PUBLISH`` to every node); the gateway listens on one node and
reads each stream from the node that holds it. The cluster comes from
``redis_cluster_url`` (tests/fixtures/redis_cluster.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import orjson
import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from connectors.ops_feed import OpsFeedConfig, OpsFeedOutput, write_rules
from connectors.redis_push import RedisPushConfig, RedisPushOutput
from flows.model import Alert, Push
from flows.rules import load_default_rules
from gateway.hub import Hub
from tests.gateway.conftest import (
    OPS_TOKEN,
    SSE,
    Running,
    close_stream,
    next_event,
    open_stream,
    running_gateway,
    settings_for,
)


@pytest.fixture
def rc(redis_cluster_url: str) -> Iterator[RedisCluster]:
    c = RedisCluster.from_url(redis_cluster_url)
    yield c
    c.close()


@pytest.fixture
def cluster_gateway(redis_cluster_url: str) -> Iterator[Running]:
    settings = settings_for(redis_cluster_url, redis_cluster=True, ops_token=OPS_TOKEN)
    with running_gateway(settings) as gw:
        yield gw


def _terminals_on_every_node(rc: RedisCluster) -> list[str]:
    """Terminal ids whose push streams live on three different nodes."""
    by_node: dict[str, str] = {}
    for i in range(1, 500):
        tid = f"H01-T{i:02d}"
        node = rc.get_node_from_key(f"push:terminal:{tid}").name
        by_node.setdefault(node, tid)
        if len(by_node) == 3:
            return sorted(by_node.values())
    raise AssertionError(f"the streams spread over {len(by_node)} node(s) only")


def _push(tid: str, n: int) -> Push:
    return Push(push_id=f"{tid}-p{n}", customer_id="13800000006", channel=f"terminal:{tid}",
                rule_id="help-sprite", rule_version=1,
                content={"kind": "help", "module": "remote_cam", "n": n},
                event_ts=1700000006000 + n, reason={"dwell_s": 90})


@pytest.mark.integration
def test_terminals_on_every_node_get_their_pushes(
    cluster_gateway: Running, rc: RedisCluster, redis_cluster_url: str
) -> None:
    gw = cluster_gateway
    ready = httpx.get(gw.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] == "ok"
    tids = _terminals_on_every_node(rc)
    streams = {tid: open_stream(gw, tid, gw.token(tid)) for tid in tids}
    part = RedisPushOutput(RedisPushConfig(url=redis_cluster_url, cluster=True)).build(
        "out", 0, 1)
    try:
        sses = {tid: SSE(resp) for tid, resp in streams.items()}
        for tid, sse in sses.items():
            assert streams[tid].status_code == 200
            first = sse.next()
            assert first is not None and first.event == "comment"  # ": connected"
        part.write_batch([_push(tid, 1) for tid in tids])
        for tid, sse in sses.items():
            (ev,) = sse.pushes(1)
            doc = json.loads(ev.data)
            assert doc["push_id"] == f"{tid}-p1" and doc["channel"] == f"terminal:{tid}"
            assert doc["customer"] == "…0006" and "reason" not in doc
        # woken by the engine's PUBLISH through the listener, whichever node held it
        assert gw.server.gateway.hub.stats["notifications"] >= len(tids)

        # a terminal that reconnects with its last id gets exactly what it missed
        tid = tids[-1]
        close_stream(streams.pop(tid))
        part.write_batch([_push(tid, 2), _push(tid, 3)])
        entries = rc.xrange(f"push:terminal:{tid}")
        assert len(entries) == 3
        missed_after = entries[0][0].decode()
        streams[tid] = again = open_stream(gw, tid, gw.token(tid), last_event_id=missed_after)
        sse = SSE(again)
        sse.next()
        got = sse.pushes(2)
        assert [json.loads(e.data)["content"]["n"] for e in got] == [2, 3]
        assert [e.id for e in got] == [e[0].decode() for e in entries[1:]]
    finally:
        part.close()
        for resp in streams.values():
            close_stream(resp)


@pytest.mark.integration
def test_ops_console_reads_a_feed_spread_over_slots(
    cluster_gateway: Running, rc: RedisCluster, redis_cluster_url: str
) -> None:
    """The feed's streams are in different slots: the console reads each on its own."""
    assert len({key_slot(k.encode()) for k in ("ops:pushes", "ops:alerts",
                                               "ops:stats:history")}) == 3
    part = OpsFeedOutput(OpsFeedConfig(url=redis_cluster_url, cluster=True)).build(
        "ops", 0, 1)
    t0 = 1_700_000_040_000
    alert = Alert(id="a1", type="touchstream.dwell.customer",
                  source="/touchstream/rules/help-sprite", time_ms=t0, subject="13800000006",
                  data={"customer_id": "13800000006", "module": "remote_cam", "dwell_s": 90})
    try:
        part.write_batch([_push("H01-T06", 1), alert, {"halls": {"H01": {"tries": 3}}}])
        write_rules(rc, load_default_rules())
        with httpx.Client(base_url=cluster_gateway.url, timeout=10.0,
                          headers={"authorization": f"Bearer {OPS_TOKEN}"}) as c:
            state = c.get("/ops/api/state")
            assert state.status_code == 200
            doc = state.json()
            assert doc["alerts"][0]["id"] == "a1" and doc["alerts"][0]["subject"] == "…0006"
            assert doc["stats"] == {"halls": {"H01": {"tries": 3}}}
            assert doc["rules"]["version"] == 1
            assert doc["latency"]["count"] == 1
            with c.stream("GET", "/ops/api/events") as resp:
                sse = SSE(resp)
                next_event(sse, "state")
                part.write_batch([Alert(id="a2", type=alert.type, source=alert.source,
                                        time_ms=t0 + 1, subject=alert.subject,
                                        data=alert.data)])
                assert orjson.loads(next_event(sse, "alert"))["id"] == "a2"
    finally:
        part.close()


class _SlowRedis:
    """Stands for a client whose reads wait until ``go`` is set."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.in_flight = 0

    async def xread(self, streams: dict[str, str], count: int) -> list[object]:
        self.in_flight += 1
        try:
            await self.go.wait()
            return []
        finally:
            self.in_flight -= 1


def test_hub_bounds_the_reads_in_flight() -> None:
    """A cluster client's node pool fails a read past its size instead of waiting, so
    the hub holds the reads to ``max_reads``: one more waits, up to ``read_wait_s``."""

    async def main() -> None:
        slow = _SlowRedis()
        hub = Hub(slow, max_reads=2, read_wait_s=0.2)  # type: ignore[arg-type]
        first = [asyncio.create_task(hub.read(f"k{i}", "0-0", 10)) for i in range(2)]
        await asyncio.sleep(0.05)
        assert slow.in_flight == 2
        with pytest.raises(TimeoutError):  # an OSError: the stream ends as if Redis failed
            await hub.read("k3", "0-0", 10)
        third = asyncio.create_task(hub.read("k3", "0-0", 10))
        await asyncio.sleep(0.05)
        assert slow.in_flight == 2  # still waiting for a slot
        slow.go.set()
        assert await asyncio.gather(*first, third) == [[], [], []]

        unbounded = Hub(_SlowRedis(), read_wait_s=0.2)  # type: ignore[arg-type]
        tasks = [asyncio.create_task(unbounded.read(f"k{i}", "0-0", 10)) for i in range(5)]
        await asyncio.sleep(0.05)
        assert unbounded._redis.in_flight == 5  # type: ignore[union-attr]
        unbounded._redis.go.set()  # type: ignore[union-attr]
        await asyncio.gather(*tasks)

    asyncio.run(main())
