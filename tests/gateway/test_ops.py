"""The /ops console: its state, its authentication, its endpoints over real sockets."""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

import httpx
import orjson
import pytest
import redis
from pydantic import ValidationError
from starlette.requests import HTTPConnection

from connectors.ops_feed import OpsFeedConfig, OpsFeedOutput, write_rules
from flows.model import Alert, Push
from flows.rules import load_default_rules
from gateway.ops import COOKIE, LATENCY_BOUNDS_MS, OpsAuth, OpsState, alert_view, mask_ids
from gateway.settings import GatewaySettings
from tests.gateway.conftest import (
    OPS_TOKEN,
    SSE,
    add_push,
    close_stream,
    next_event,
    open_stream,
    running_gateway,
    settings_for,
)

MIN = 60_000
T0 = 1_700_000_040_000 // MIN * MIN


def _settings(**over: Any) -> GatewaySettings:
    return GatewaySettings(**({"token_secret": "x" * 32} | over))


def _conn(headers: dict[str, str] | None = None, query: str = "") -> HTTPConnection:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return HTTPConnection({"type": "http", "headers": raw, "query_string": query.encode(),
                           "path": "/ops", "method": "GET"})


def _basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


STEP_ALERT = {
    "specversion": "1.0", "id": "s1", "type": "touchstream.dwell.step",
    "source": "/touchstream/rules/step-friction", "time": "2023-11-14T22:15:16.000Z",
    "subject": "remote_cam/door_sensor_setup",
    "data": {"module": "remote_cam", "step": "door_sensor_setup", "n": 5, "mean_s": 104.0,
             "p90_s": 104.0, "share_subscribed": 0.4,
             "samples": [{"customer_id": "13800000007", "dwell_s": 104.0, "subscribed": False},
                         "…"]},
}
CUSTOMER_ALERT = {
    "specversion": "1.0", "id": "c1", "type": "touchstream.dwell.customer",
    "source": "/touchstream/rules/help-sprite", "time": "2023-11-14T22:14:56.000Z",
    "subject": "13800000006",
    "data": {"customer_id": "13800000006", "module": "remote_cam", "dwell_s": 90},
}


# --- no server needed --------------------------------------------------------------------


def test_customer_ids_are_masked_everywhere() -> None:
    assert alert_view(CUSTOMER_ALERT)["subject"] == "…0006"
    assert alert_view(CUSTOMER_ALERT)["data"]["customer_id"] == "…0006"
    step = alert_view(STEP_ALERT)
    assert step["subject"] == "remote_cam/door_sensor_setup"
    assert step["data"]["samples"][0]["customer_id"] == "…0007"
    assert "1380000000" not in orjson.dumps([alert_view(CUSTOMER_ALERT), step]).decode()
    assert mask_ids({"customer": "abc", "x": [{"customer_id": 5}]}) == {
        "customer": "…c", "x": [{"customer_id": 5}]}  # a short id is never shown whole


def test_pushes_per_rule_per_minute_and_window() -> None:
    st = OpsState(window_min=3)
    for at, rule in [(T0 - 3 * MIN, "old"), (T0 - 2 * MIN, "a"), (T0 - MIN + 5, "a"),
                     (T0 - MIN + 9, "b"), (T0 + 1, "a")]:
        st.add_push({"rule_id": rule, "delivered_at": at, "latency_ms": 5})
    st.add_push({"rule_id": "no time"})  # ignored
    snap = st.snapshot(T0 + 30_000)
    assert snap["pushes_per_minute"] == {"minutes": [T0 - 2 * MIN, T0 - MIN, T0],
                                         "rules": {"a": [1, 1, 1], "b": [0, 1, 0]}}
    assert snap["latency"]["count"] == 4  # "old" fell out of the window
    assert [p["rule_id"] for p in snap["recent_pushes"]] == ["a", "b", "a", "a"]


def test_latency_buckets_and_percentiles() -> None:
    st = OpsState()
    for v in [*range(1, 101), -3, 50_000]:
        st.add_push({"rule_id": "r", "delivered_at": T0, "latency_ms": v})
    lat = st.latency()
    assert lat["bounds_ms"] == list(LATENCY_BOUNDS_MS)
    assert sum(lat["counts"]) == lat["count"] == 102
    assert lat["counts"][0] == 6  # -3 (as 0) and 1..5
    assert lat["counts"][-1] == 1  # 50 s: beyond the last bound
    assert lat["p50"] == 51 and lat["p90"] == 91 and lat["max"] == 50_000  # 0, 1..100, 50000


def test_alerts_newest_first_and_bounded() -> None:
    st = OpsState(max_alerts=3)
    for i in range(5):
        st.add_alert(CUSTOMER_ALERT | {"id": f"c{i}"})
    assert [a["id"] for a in st.snapshot(T0)["alerts"]] == ["c4", "c3", "c2"]
    assert "alerts" not in st.snapshot(T0, alerts=False)


def test_auth_token_basic_cookie() -> None:
    auth = OpsAuth(_settings(ops_token=OPS_TOKEN, ops_user="ops", ops_password="pass-word-123"))
    assert auth.check(_conn({"authorization": f"Bearer {OPS_TOKEN}"})) == "token"
    assert auth.check(_conn(query=f"token={OPS_TOKEN}")) == "token"
    assert auth.check(_conn(_basic("ops", "pass-word-123"))) == "basic"
    assert auth.check(_conn(_basic("ops", "wrong-password"))) is None
    assert auth.check(_conn(_basic("other", "pass-word-123"))) is None
    assert auth.check(_conn({"authorization": "Basic !!!"})) is None
    assert auth.check(_conn({"authorization": "Bearer nope"})) is None
    assert auth.check(_conn()) is None
    cookie = auth.session_cookie(now=1000.0)
    assert auth.check(_conn({"cookie": f"{COOKIE}={cookie}"}), now=1001.0) == "cookie"
    assert auth.check(_conn({"cookie": f"{COOKIE}={cookie}"}), now=1000.0 + 13 * 3600) is None
    assert auth.check(_conn({"cookie": f"{COOKIE}={cookie[:-1]}0"}), now=1001.0) is None
    other = OpsAuth(_settings(ops_token="another-token-4567"))
    assert other.check(_conn({"cookie": f"{COOKIE}={cookie}"}), now=1001.0) is None
    assert OPS_TOKEN not in repr(auth) and "pass-word" not in repr(auth)
    closed = OpsAuth(_settings())
    assert not closed.configured and closed.check(_conn(query="token=")) is None
    assert closed.deny().status_code == 401


def test_ops_settings_validation() -> None:
    with pytest.raises(ValidationError, match="go together"):
        _settings(ops_user="ops")
    with pytest.raises(ValidationError, match="at least 12"):
        _settings(ops_token="short")
    s = _settings(ops_token=OPS_TOKEN, ops_user="ops", ops_password="pass-word-123")
    assert OPS_TOKEN not in repr(s) and "pass-word-123" not in repr(s)


# --- over real sockets -----------------------------------------------------------------------


def _push(i: int) -> Push:
    return Push(push_id=f"p{i}", customer_id="13800000006", channel="terminal:H01-T06",
                rule_id="help-sprite", rule_version=1,
                content={"module": "remote_cam", "kind": "help"}, event_ts=T0,
                reason={"hall_id": "H01"})


def _alert(i: int) -> Alert:
    return Alert(id=f"a{i}", type="touchstream.dwell.customer",
                 source="/touchstream/rules/help-sprite", time_ms=T0, subject="13800000006",
                 data={"customer_id": "13800000006", "module": "remote_cam", "dwell_s": 90})


@pytest.mark.integration
def test_endpoints_auth_and_state(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    part = OpsFeedOutput(OpsFeedConfig(url=redis_url)).build("ops", 0, 1)
    r = redis.Redis.from_url(redis_url)
    try:
        part.write_batch([_push(1), _alert(1), {"halls": {"H01": {"tries": 3}}}])
        write_rules(r, load_default_rules())
        settings = settings_for(redis_url, ops_token=OPS_TOKEN, ops_user="ops",
                                ops_password="pass-word-123")
        with running_gateway(settings) as gw, httpx.Client(base_url=gw.url) as c:
            for path in ("/ops", "/ops/api/state", "/ops/api/events"):
                denied = c.get(path)
                assert denied.status_code == 401
                assert denied.headers["www-authenticate"].startswith("Basic")
            assert c.get("/ops", params={"token": "wrong-token-000"}).status_code == 401
            page = c.get("/ops", params={"token": OPS_TOKEN})
            assert page.status_code == 200 and "/static/ops.js" in page.text
            assert "script-src 'self'" in page.headers["content-security-policy"]
            assert COOKIE in page.headers["set-cookie"]
            assert "httponly" in page.headers["set-cookie"].lower()
            state = c.get("/ops/api/state")  # the session cookie from the page
            assert state.status_code == 200
            doc = state.json()
            assert doc["rules"]["version"] == 1 and len(doc["rules"]["rules"]) == 7
            assert doc["stats"] == {"halls": {"H01": {"tries": 3}}}
            assert doc["alerts"][0]["subject"] == "…0006"
            assert "13800000006" not in state.text
            assert doc["latency"]["count"] == 1
            for static in ("ops.js", "ops.css"):
                assert c.get(f"/static/{static}").status_code == 200
            with httpx.Client(base_url=gw.url) as fresh:
                assert fresh.get("/ops/api/state", headers=_basic("ops", "pass-word-123")
                                 ).status_code == 200
                assert fresh.get("/ops/api/state", headers={
                    "authorization": f"Bearer {OPS_TOKEN}"}).status_code == 200
    finally:
        part.close()
        r.close()
    logged = "\n".join(rec.getMessage() for rec in caplog.records
                       if not rec.name.startswith("httpx"))  # the client logs its own URL
    assert "/ops" in logged and OPS_TOKEN not in logged


@pytest.mark.integration
def test_not_configured_is_closed(redis_url: str) -> None:
    with running_gateway(settings_for(redis_url)) as gw:
        resp = httpx.get(gw.url + "/ops/api/state", params={"token": ""})
        assert resp.status_code == 401
        assert "no credentials configured" in resp.json()["detail"]


@pytest.mark.integration
def test_live_feed_sends_alerts_as_they_fire(redis_url: str) -> None:
    part = OpsFeedOutput(OpsFeedConfig(url=redis_url)).build("ops", 0, 1)
    try:
        with running_gateway(settings_for(redis_url, ops_token=OPS_TOKEN)) as gw, \
                httpx.Client(timeout=10.0) as c, \
                c.stream("GET", gw.url + "/ops/api/events",
                         headers={"authorization": f"Bearer {OPS_TOKEN}"}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            sse = SSE(resp)
            first = next_event(sse, "state")
            assert orjson.loads(first)["alerts"] == []
            t0 = time.monotonic()
            part.write_batch([_alert(7), _push(7)])
            alert = orjson.loads(next_event(sse, "alert"))
            assert time.monotonic() - t0 < 3.0  # woken by PUBLISH, not the 5 s poll
            assert alert["id"] == "a7" and alert["subject"] == "…0006"
            state = orjson.loads(next_event(sse, "state"))
            assert "alerts" not in state
            assert sum(state["pushes_per_minute"]["rules"]["help-sprite"]) >= 0
            assert state["recent_pushes"][0]["rule_id"] == "help-sprite"
    finally:
        part.close()


@pytest.mark.integration
def test_shutdown_ends_the_feed_with_bye(redis_url: str) -> None:
    with running_gateway(settings_for(redis_url, ops_token=OPS_TOKEN)) as gw, \
            httpx.Client(timeout=10.0) as c, \
            c.stream("GET", gw.url + "/ops/api/events", params={"token": OPS_TOKEN}) as resp:
        sse = SSE(resp)
        next_event(sse, "state")
        t0 = time.monotonic()
        gw.server.stop()
        assert orjson.loads(next_event(sse, "bye")) == {"reason": "shutdown"}
        assert time.monotonic() - t0 < 3.0


@pytest.mark.integration
def test_consoles_hold_no_redis_connection_of_their_own(redis_url: str) -> None:
    """Open consoles share the hub's one pub/sub listener: more consoles than the pool
    has connections leave the terminals their reads, and each is still woken."""
    client = redis.Redis.from_url(redis_url)
    part = OpsFeedOutput(OpsFeedConfig(url=redis_url)).build("ops", 0, 1)
    consoles: list[tuple[httpx.Client, Any, SSE]] = []
    settings = settings_for(redis_url, ops_token=OPS_TOKEN, redis_pool_size=3, redis_timeout_s=2.0)
    try:
        with running_gateway(settings) as gw:
            for _ in range(4):
                c = httpx.Client(timeout=10.0)
                cm = c.stream("GET", gw.url + "/ops/api/events", params={"token": OPS_TOKEN})
                sse = SSE(cm.__enter__())
                next_event(sse, "state")
                consoles.append((c, cm, sse))
            subscribers = [x for x in client.client_list()
                           if int(x.get("sub", 0)) + int(x.get("psub", 0)) > 0]
            assert len(subscribers) == 1  # the hub's listener, whatever the consoles
            resp = open_stream(gw, "H01-T01", gw.token("H01-T01"))
            try:
                assert resp.status_code == 200
                sse_t = SSE(resp)
                add_push(client, "H01-T01", 1)
                assert orjson.loads(next_event(sse_t, "push"))["push_id"] == "p1"
            finally:
                close_stream(resp)
            part.write_batch([_alert(8)])
            for _, _, sse in consoles:
                assert orjson.loads(next_event(sse, "alert"))["id"] == "a8"
    finally:
        for c, cm, _ in consoles:
            cm.__exit__(None, None, None)
            c.close()
        part.close()
        client.close()
