"""The shared reader's logic as units: wake-ups, the slow-consumer bound, parsing, views."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import redis
from redis.asyncio import Redis

from gateway.app import Gateway, terminal_view
from gateway.hub import Hub, Subscription, parse_xread
from tests.gateway.conftest import add_push, settings_for

PUSH = {"push_id": "p1", "customer_id": "13800000004", "channel": "terminal:T1",
        "rule_id": "setup-first", "rule_version": 1, "event_ts": 1700000000000,
        "content": {"kind": "setup_guide", "module": "care_link"},
        "reason": {"subscribed": True, "configured": False, "service": "care_link"}}


def test_terminal_view_masks_the_customer_and_drops_the_reason() -> None:
    view = terminal_view(PUSH)
    assert view == {"push_id": "p1", "channel": "terminal:T1", "rule_id": "setup-first",
                    "rule_version": 1, "event_ts": 1700000000000,
                    "content": {"kind": "setup_guide", "module": "care_link"},
                    "customer": "…0004"}
    assert "customer" not in terminal_view(PUSH, "drop")
    assert "13800000004" not in orjson.dumps(terminal_view(PUSH)).decode()


def test_parse_xread_shapes() -> None:
    data = orjson.dumps(PUSH)
    resp2 = [[b"push:terminal:T1", [(b"1-0", {b"data": data}), (b"2-0", {b"other": b"x"}),
                                    (b"3-0", {b"data": b"not json"}), (b"4-0", {b"data": b"[1]"})]]]
    assert parse_xread(resp2) == [("1-0", PUSH), ("2-0", None), ("3-0", None), ("4-0", None)]
    resp3 = {b"push:terminal:T1": [[(b"1-0", {b"data": data})]]}
    assert parse_xread(resp3) == [("1-0", PUSH)]
    assert parse_xread(None) == [] and parse_xread([]) == []


def test_notify_wakes_and_closes_a_slow_consumer() -> None:
    async def scenario() -> None:
        hub = Hub(Redis(), max_queued=3)  # never connects: only bookkeeping here
        blocked = asyncio.create_task(asyncio.sleep(3600))
        slow = Subscription("push:terminal:T1", "0-0", blocked)
        other = Subscription("push:terminal:T2", "0-0")
        hub.add(slow)
        hub.add(other)
        assert len(hub) == 2 and hub.streams() == 2
        for _ in range(3):
            hub.notify(b"push:terminal:T1")
        assert slow.wake.is_set() and slow.lag == 3 and slow.closed is None
        assert not other.wake.is_set()
        hub.notify("push:terminal:T1")  # the fourth push waiting for it: over the bound
        assert slow.closed == "slow_consumer"
        await asyncio.sleep(0)
        assert blocked.cancelled()
        assert hub.stats["slow_consumer"] == 1
        hub.notify(b"push:terminal:T1")  # closing is once
        assert hub.stats["slow_consumer"] == 1
        hub.discard(slow)
        hub.discard(slow)
        hub.notify(b"push:terminal:nobody")
        assert hub.close_all("shutdown") == 1 and other.closed == "shutdown"

    asyncio.run(scenario())


class _StuckSink:
    """A client that takes the first ``ok`` events and then never reads again."""

    def __init__(self, ok: int) -> None:
        self.ok = ok
        self.got: list[str] = []
        self.heartbeats = 0

    async def event(self, entry_id: str, data: bytes) -> None:
        if len(self.got) >= self.ok:
            await asyncio.Event().wait()  # blocks, as a send to a full socket does
        self.got.append(entry_id)

    async def heartbeat(self) -> None:
        self.heartbeats += 1


def test_run_stream_closes_a_consumer_over_the_bound(
        redis_url: str, redis_client: redis.Redis) -> None:
    """The bound, end to end in one process: pushes arrive while a send is blocked."""
    settings = settings_for(redis_url, max_queued=5, send_timeout_s=60)

    async def scenario() -> tuple[str, list[str], dict[str, int], int]:
        client = Redis.from_url(redis_url)
        gw = Gateway(settings, redis=client)
        await gw.start()
        for _ in range(100):  # wait for the listener
            if gw.hub.listening:
                break
            await asyncio.sleep(0.02)
        sink = _StuckSink(ok=2)

        async def stream() -> str:
            sub = Subscription(gw.stream_key("T1"), "0-0", asyncio.current_task())
            gw.hub.add(sub)
            try:
                return await gw.run_stream(sub, sink, datetime.now(UTC) + timedelta(hours=1))
            finally:
                gw.hub.discard(sub)

        task = asyncio.create_task(stream())
        ids: list[str] = []
        for n in range(20):  # 2 delivered, 1 stuck in send, then 6 more is over the bound
            ids += await asyncio.to_thread(add_push, redis_client, "T1", n)
            await asyncio.sleep(0.01)
            if task.done():
                break
        reason = await asyncio.wait_for(task, 5)
        stats = dict(gw.stats) | {f"hub_{k}": v for k, v in gw.hub.stats.items()}
        await gw.stop()
        return reason, sink.got, stats, len(ids)

    reason, got, stats, written = asyncio.run(scenario())
    assert reason == "slow_consumer"
    assert len(got) == 2
    assert stats["hub_slow_consumer"] == 1 and stats["closed_slow_consumer"] == 1
    assert written < 20  # closed as soon as the bound was passed, not at the end


def test_run_stream_send_timeout(redis_url: str, redis_client: redis.Redis) -> None:
    """A send blocked longer than send_timeout_s ends the stream even with no new pushes."""
    settings = settings_for(redis_url, max_queued=1000, send_timeout_s=0.3)
    add_push(redis_client, "T1", 1)

    async def scenario() -> str:
        gw = Gateway(settings, redis=Redis.from_url(redis_url))
        sub = Subscription(gw.stream_key("T1"), "0-0", None)

        async def stream() -> str:
            sub.task = asyncio.current_task()
            return await gw.run_stream(sub, _StuckSink(ok=0),
                                       datetime.now(UTC) + timedelta(hours=1))

        reason = await asyncio.wait_for(asyncio.create_task(stream()), 5)
        await gw.stop()
        return reason

    assert asyncio.run(scenario()) == "send_timeout"


@pytest.mark.parametrize("lag", [0, 1])
def test_subscription_close_is_idempotent(lag: int) -> None:
    sub = Subscription("k", "0-0")
    sub.lag = lag
    assert sub.close("a") and not sub.close("b") and sub.closed == "a" and sub.wake.is_set()
