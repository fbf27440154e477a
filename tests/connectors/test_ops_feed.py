"""OpsFeedOutput: the ops feed in Redis, in a real Bytewax dataflow and batch by batch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import bytewax.operators as op
import orjson
import pytest
import redis
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, run_main
from pydantic import SecretStr

from connectors.ops_feed import (
    OpsFeedConfig,
    OpsFeedOutput,
    push_summary,
    rules_summary,
    write_rules,
)
from flows.model import Alert, Push
from flows.rules import load_default_rules
from flows.settings import RedisSettings

T0 = 1_700_000_000_000
NOW = T0 + 42


def push(i: int, *, channel: str = "terminal:H01-T06", hall: str | None = "H01") -> Push:
    reason: dict[str, Any] = {"dwell_s": 90, "subscribed": True}
    if hall is not None:
        reason["hall_id"] = hall
    return Push(push_id=f"p{i}", customer_id="13800000006", channel=channel,
                rule_id="help-sprite", rule_version=3,
                content={"module": "remote_cam", "kind": "help", "step": "door"},
                event_ts=T0 + i, reason=reason)


def alert(i: int) -> Alert:
    return Alert(id=f"a{i}", type="touchstream.dwell.customer",
                 source="/touchstream/rules/help-sprite", time_ms=T0 + i,
                 subject="13800000006",
                 data={"customer_id": "13800000006", "module": "remote_cam", "dwell_s": 90})


STATS = {"halls": {"H01": {"tries": 2, "orders": 1}}, "dead_letters": {"invalid_json": 2},
         "dead_letters_total": 2}


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def docs(r: redis.Redis, key: str) -> list[dict[str, Any]]:
    return [orjson.loads(f[b"data"]) for _, f in r.xrange(key)]


def test_config_from_settings_hides_url() -> None:
    cfg = OpsFeedConfig.from_settings(RedisSettings(url=SecretStr("redis://:pw@h:1/0")))
    assert "pw" not in repr(cfg)
    assert cfg.key("stats") == "ops:stats"
    with pytest.raises(ValueError, match="url"):
        OpsFeedConfig.from_settings(RedisSettings())
    with pytest.raises(ValueError, match="at least 1"):
        OpsFeedConfig(url="redis://h", pushes_maxlen=0)


def test_push_summary_has_no_personal_data() -> None:
    s = push_summary(push(1), NOW)
    assert s == {"rule_id": "help-sprite", "rule_version": 3, "module": "remote_cam",
                 "kind": "help", "channel_kind": "terminal", "hall": "H01",
                 "event_ts": T0 + 1, "delivered_at": NOW, "latency_ms": 41}
    assert "13800000006" not in orjson.dumps(s).decode()
    assert push_summary(push(2, channel="customer:13800000006", hall=None), NOW)["hall"] is None


def test_rules_summary_of_the_defaults() -> None:
    doc = rules_summary(load_default_rules(), now_ms=NOW)
    assert doc["version"] == 1 and doc["loaded_at"] == NOW
    by_id = {r["id"]: r for r in doc["rules"]}
    assert by_id["help-sprite"]["trigger"] == {"kind": "step_dwell", "dwell": 90_000}
    assert by_id["help-sprite"]["alert"] == "touchstream.dwell.customer"
    assert by_id["cinema-pay"]["once_per"] == "24h"
    assert by_id["step-friction"]["once_per"] == "1h"
    assert by_id["music-pref"]["once_per"] == "session"
    assert by_id["cinema-pay"]["push"] == {"kind": "offer", "module": "mobile_pay"}
    assert doc["guards"]["max_pushes_per_customer"] == 3
    orjson.dumps(doc)  # JSON-ready


@pytest.mark.integration
def test_sink_writes_every_key_and_wakes_consoles(r: redis.Redis, redis_url: str) -> None:
    sink = OpsFeedOutput(OpsFeedConfig(url=redis_url), now_ms=lambda: NOW)
    part = sink.build("ops", 0, 1)
    pubsub = r.pubsub()
    pubsub.subscribe("ops:events")
    assert (pubsub.get_message(timeout=5.0) or {}).get("type") == "subscribe"  # confirmed
    try:
        part.write_batch([push(1), push(2), alert(1), STATS, "ignored"])
        part.write_batch([])
        part.write_batch(["only junk"])
        woken = set()
        deadline = time.monotonic() + 5
        while len(woken) < 3 and time.monotonic() < deadline:
            msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if msg is not None:
                woken.add(msg["data"])
        assert woken == {b"pushes", b"alerts", b"stats"}
    finally:
        pubsub.close()
        part.close()
    pushes = docs(r, "ops:pushes")
    assert [p["event_ts"] for p in pushes] == [T0 + 1, T0 + 2]
    assert all("customer_id" not in p for p in pushes)
    assert docs(r, "ops:alerts")[0]["subject"] == "13800000006"  # kept whole in Redis
    assert docs(r, "ops:alerts")[0]["specversion"] == "1.0"
    assert orjson.loads(r.get("ops:stats") or b"") == STATS
    ((_, fields),) = r.xrange("ops:stats:history")
    assert fields[b"at"] == str(NOW).encode() and orjson.loads(fields[b"data"]) == STATS


@pytest.mark.integration
def test_streams_are_capped(r: redis.Redis, redis_url: str) -> None:
    part = OpsFeedOutput(OpsFeedConfig(url=redis_url, pushes_maxlen=10,
                                       publish=False)).build("ops", 0, 1)
    try:
        for i in range(20):
            part.write_batch([push(j) for j in range(i * 100, i * 100 + 100)])
    finally:
        part.close()
    assert r.xlen("ops:pushes") < 2000  # MAXLEN ~ trims whole nodes (100 entries each)


@pytest.mark.integration
def test_in_a_dataflow_and_write_rules(r: redis.Redis, redis_url: str) -> None:
    sink = OpsFeedOutput(OpsFeedConfig(url=redis_url))
    flow = Dataflow("ops_feed_test")
    items: list[Any] = [push(1), alert(1), STATS, push(2)]
    s = op.input("in", flow, TestingSource(items))
    op.output("out", s, sink)
    run_main(flow)
    assert len(docs(r, "ops:pushes")) == 2 and len(docs(r, "ops:alerts")) == 1
    write_rules(r, load_default_rules())
    doc = orjson.loads(r.get("ops:rules") or b"")
    assert doc["version"] == 1 and len(doc["rules"]) == 7
