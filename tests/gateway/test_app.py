"""The gateway over real sockets: a uvicorn server in a thread, the test redis-server."""

from __future__ import annotations

import json
import logging
import socket
import time

import httpx
import orjson
import pytest
import redis
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from bench.services import free_port
from tests.gateway.conftest import (
    SSE,
    Running,
    add_push,
    close_stream,
    open_stream,
    running_gateway,
    settings_for,
)

pytestmark = pytest.mark.integration

PATH = "/v1/terminals/{}/pushes"


def _wait(cond: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_health_and_readiness(gateway: Running) -> None:
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(gateway.url + "/readyz")
    assert r.status_code == 200 and r.json()["redis"] == "ok"


def test_readyz_503_when_redis_is_down() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with running_gateway(settings_for(dead, redis_timeout_s=1.0)) as gw:
        assert httpx.get(gw.url + "/healthz").status_code == 200
        r = httpx.get(gw.url + "/readyz")
        assert r.status_code == 503 and r.json()["redis"] == "unreachable"
        # a terminal is told to come back (503) rather than left hanging
        resp = httpx.get(gw.url + PATH.format("T1"), headers={
            "authorization": f"Bearer {gw.token('T1')}"}, timeout=5)
        assert resp.status_code == 503


def test_auth_401_403(gateway: Running) -> None:
    url = gateway.url + PATH.format("T1")
    r = httpx.get(url)
    assert r.status_code == 401 and r.json()["detail"] == "missing"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(url, params={"token": "garbage"}).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer x.y"}).status_code == 401
    forged = gateway.token("T1")[:-3] + "AAA"
    assert httpx.get(url, params={"token": forged}).json()["detail"] == "bad_signature"
    expired = gateway.signer.issue("T1", 60, now=__import__("datetime").datetime(
        2020, 1, 1, tzinfo=__import__("datetime").UTC))
    assert httpx.get(url, params={"token": expired}).json()["detail"] == "expired"
    other = httpx.get(url, params={"token": gateway.token("T2")})
    assert other.status_code == 403 and other.json()["error"] == "forbidden"
    bad_id = httpx.get(gateway.url + PATH.format("a%20b"), params={"token": gateway.token("T1")})
    assert bad_id.status_code == 404
    bad_since = httpx.get(url, params={"token": gateway.token("T1"), "since": "yesterday"})
    assert bad_since.status_code == 400


def test_sse_delivers_new_pushes_in_order(gateway: Running, redis_client: redis.Redis) -> None:
    add_push(redis_client, "T1", 0)  # before connecting: not replayed without since
    add_push(redis_client, "T2", 0)  # another terminal: never seen here
    resp = open_stream(gateway, "T1", gateway.token("T1"), bearer=False)
    try:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        sse = SSE(resp)
        first = sse.next()
        assert first is not None and first.event == "comment"  # ": connected"
        ids = [add_push(redis_client, "T1", n)[0] for n in range(1, 6)]
        add_push(redis_client, "T2", 99)
        got = sse.pushes(5)
        assert [e.id for e in got] == ids
        docs = [json.loads(e.data) for e in got]
        assert [d["content"]["n"] for d in docs] == [1, 2, 3, 4, 5]
        assert all(d["customer"] == "…0004" and "customer_id" not in d and "reason" not in d
                   for d in docs)
        assert "13800000004" not in "".join(e.data for e in got)
    finally:
        close_stream(resp)


def test_sse_reconnect_gets_exactly_the_missed_ones(
        gateway: Running, redis_client: redis.Redis) -> None:
    token = gateway.token("T1")
    resp = open_stream(gateway, "T1", token)
    try:
        sse = SSE(resp)
        sse.next()
        ids = [add_push(redis_client, "T1", n)[0] for n in range(3)]
        got = sse.pushes(3)
        assert [e.id for e in got] == ids
    finally:
        close_stream(resp)
    _wait(lambda: gateway.server.gateway.open_streams == 0)
    missed = [add_push(redis_client, "T1", n)[0] for n in range(3, 7)]
    # what EventSource does: Last-Event-ID header (it wins over a stale ?since=)
    resp = open_stream(gateway, "T1", token, last_event_id=ids[-1], since=ids[0])
    try:
        sse = SSE(resp)
        again = sse.pushes(4)
        assert [e.id for e in again] == missed
        later = add_push(redis_client, "T1", 7)
        rest = sse.pushes(1)
        assert [e.id for e in rest] == later
        # nothing twice: only heartbeats follow
        tail = sse.until_comment(2, timeout_s=3)
        assert not [e for e in tail if e.event == "push"]
    finally:
        close_stream(resp)
    # ?since= alone, and since=0 for everything the stream holds
    resp = open_stream(gateway, "T1", token, since=missed[1])
    try:
        assert [e.id for e in SSE(resp).pushes(3)] == [*missed[2:], *later]
    finally:
        close_stream(resp)
    resp = open_stream(gateway, "T1", token, since="0")
    try:
        assert [e.id for e in SSE(resp).pushes(8)] == [*ids, *missed, *later]
    finally:
        close_stream(resp)


def test_sse_pushes_without_publish_arrive_by_polling(
        redis_url: str, redis_client: redis.Redis) -> None:
    """A writer that does not PUBLISH: the stream is re-read every poll_interval_s."""
    with running_gateway(settings_for(redis_url, poll_interval_s=0.3)) as gw:
        resp = open_stream(gw, "T1", gw.token("T1"))
        try:
            sse = SSE(resp)
            sse.next()
            ids = [add_push(redis_client, "T1", n, publish=False)[0] for n in range(2)]
            assert [e.id for e in sse.pushes(2, timeout_s=3)] == ids
        finally:
            close_stream(resp)


def test_heartbeats_when_idle(gateway: Running) -> None:
    resp = open_stream(gateway, "T1", gateway.token("T1"))
    try:
        t0 = time.monotonic()
        seen = SSE(resp).until_comment(3, timeout_s=3)
        assert time.monotonic() - t0 >= 0.6  # about one per heartbeat_s (0.3 s)
        assert [e.comment for e in seen if e.event == "comment"][-3:] == ["hb", "hb", "hb"]
    finally:
        close_stream(resp)


def test_the_engine_sink_feeds_the_gateway(gateway: Running, redis_url: str) -> None:
    """Pushes written by the engine's own Redis sink arrive as the terminal view."""
    from connectors.redis_push import RedisPushConfig, RedisPushOutput
    from flows.model import Push

    resp = open_stream(gateway, "H01-T06", gateway.token("H01-T06"))
    try:
        sse = SSE(resp)
        sse.next()
        part = RedisPushOutput(RedisPushConfig(url=redis_url)).build("out", 0, 1)
        push = Push(push_id="abc", customer_id="13800000006", channel="terminal:H01-T06",
                    rule_id="help-sprite", rule_version=1,
                    content={"kind": "help", "module": "remote_cam", "step": "door_sensor_setup"},
                    event_ts=1700000006000, reason={"dwell_s": 90})
        part.write_batch([push])
        part.close()
        (ev,) = sse.pushes(1)
        assert json.loads(ev.data) == {
            "push_id": "abc", "channel": "terminal:H01-T06", "rule_id": "help-sprite",
            "rule_version": 1, "event_ts": 1700000006000, "customer": "…0006",
            "content": {"kind": "help", "module": "remote_cam", "step": "door_sensor_setup"}}
    finally:
        close_stream(resp)


def test_token_expiry_ends_the_stream(redis_url: str) -> None:
    with running_gateway(settings_for(redis_url, token_leeway_s=0)) as gw:
        # exp is whole seconds after a truncated iat: a 1 s token may have expired before
        # the stream opens on a loaded host (seen in CI: 401, no stream); 2 s leave >= 1 s
        resp = open_stream(gw, "T1", gw.signer.issue("T1", 2))
        try:
            assert resp.status_code == 200
            sse = SSE(resp)
            events = []
            while (ev := sse.next()) is not None:
                events.append(ev)
            bye = [e for e in events if e.event == "bye"]
            assert bye and json.loads(bye[0].data) == {"reason": "token_expired"}
        finally:
            close_stream(resp)


def test_shutdown_says_bye(redis_url: str) -> None:
    with running_gateway(settings_for(redis_url)) as gw:
        resp = open_stream(gw, "T1", gw.token("T1"))
        sse = SSE(resp)
        sse.next()
        gw.server.stop()
        events = []
        while (ev := sse.next()) is not None:
            events.append(ev)
        close_stream(resp)
    assert [json.loads(e.data) for e in events if e.event == "bye"] == [{"reason": "shutdown"}]


def test_connection_limit(redis_url: str) -> None:
    with running_gateway(settings_for(redis_url, max_connections=1)) as gw:
        first = open_stream(gw, "T1", gw.token("T1"))
        try:
            sse = SSE(first)  # keep it referenced: a collected line iterator closes the stream
            sse.next()
            second = httpx.get(gw.url + PATH.format("T2"),
                               headers={"authorization": f"Bearer {gw.token('T2')}"})
            assert second.status_code == 503 and second.headers["retry-after"]
        finally:
            close_stream(first)


def test_websocket(gateway: Running, redis_client: redis.Redis) -> None:
    url = gateway.ws_url + PATH.format("T1")
    with pytest.raises(InvalidStatus) as exc:
        ws_connect(url, open_timeout=5)
    assert exc.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as exc:
        ws_connect(url + "?token=" + gateway.token("T2"), open_timeout=5)
    assert exc.value.response.status_code == 403

    with ws_connect(url + "?token=" + gateway.token("T1"), open_timeout=5) as ws:
        ids = [add_push(redis_client, "T1", n)[0] for n in range(3)]
        got = []
        heartbeats = 0
        while len(got) < 3 or heartbeats < 1:
            msg = json.loads(ws.recv(timeout=5))
            if msg["type"] == "push":
                got.append(msg)
            elif msg["type"] == "heartbeat":
                heartbeats += 1
        assert [m["id"] for m in got] == ids
        assert [m["push"]["content"]["n"] for m in got] == [0, 1, 2]
        assert all("customer_id" not in m["push"] for m in got)
    missed = [add_push(redis_client, "T1", n)[0] for n in range(3, 5)]
    with ws_connect(f"{url}?since={ids[-1]}", open_timeout=5,
                    additional_headers={"authorization": f"Bearer {gateway.token('T1')}"}) as ws:
        again = []
        while len(again) < 2:
            msg = json.loads(ws.recv(timeout=5))
            if msg["type"] == "push":
                again.append(msg["id"])
        assert again == missed
        for _ in range(2):  # nothing twice
            assert json.loads(ws.recv(timeout=5))["type"] == "heartbeat"


def test_slow_consumer_is_disconnected(redis_url: str, redis_client: redis.Redis) -> None:
    """A client that stops reading is cut off once max_queued pushes wait for it."""
    with running_gateway(settings_for(redis_url, max_queued=8, send_timeout_s=30)) as gw:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gw.server.port))
        sock.sendall(f"GET {PATH.format('T1')} HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {gw.token('T1')}\r\n\r\n".encode())
        _wait(lambda: gw.server.gateway.open_streams == 1)
        written = 0
        for n in range(400):  # ~200 KB each: kernel and transport buffers fill up quickly
            add_push(redis_client, "T1", n, pad=200_000)
            written += 1
            if gw.stats().get("closed_slow_consumer"):
                break
            time.sleep(0.005)
        _wait(lambda: gw.stats().get("closed_slow_consumer") == 1)
        assert written < 400
        _wait(lambda: gw.server.gateway.open_streams == 0)
        # the server closed its end: reading what was buffered ends in EOF
        sock.settimeout(5)
        received = 0
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
        sock.close()
        assert received < written * 200_000


def test_no_token_in_logs(gateway: Running, redis_client: redis.Redis,
                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the test client's own log
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    token, other = gateway.token("T1"), gateway.token("T2")
    url = gateway.url + PATH.format("T1")
    httpx.get(url, params={"token": other})
    httpx.get(url, params={"token": token + "x"})
    httpx.get(url, headers={"authorization": f"Bearer {other}"})
    resp = open_stream(gateway, "T1", token, bearer=False)
    SSE(resp).next()
    close_stream(resp)
    with ws_connect(gateway.ws_url + PATH.format("T1") + "?token=" + token, open_timeout=5):
        pass
    with pytest.raises(InvalidStatus):
        ws_connect(gateway.ws_url + PATH.format("T1") + "?token=" + other, open_timeout=5)
    _wait(lambda: gateway.server.gateway.open_streams == 0)
    time.sleep(0.2)
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for secret in (token, other, token.split(".")[1], other.split(".")[1], token.split(".")[0],
                   gateway.server.settings.token_secret.get_secret_value()):
        assert secret not in text
    assert "token=***" in text  # the request lines are there, masked
    assert "WebSocket" in text  # uvicorn's handshake line, masked too


def test_terminal_page(gateway: Running) -> None:
    r = httpx.get(gateway.url + "/terminal/H01-T06")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "/static/terminal.js" in r.text
    js = httpx.get(gateway.url + "/static/terminal.js")
    assert js.status_code == 200 and "EventSource" in js.text and "innerHTML" not in js.text
    assert httpx.get(gateway.url + "/static/terminal.css").status_code == 200
    assert httpx.get(gateway.url + "/terminal/bad%20id").status_code == 404


def test_orjson_view_is_compact() -> None:
    """SSE data lines must not contain newlines: the view is one compact line."""
    assert b"\n" not in orjson.dumps({"content": {"text": "a\nb"}})


def test_listener_reconnects_after_losing_redis(
        gateway: Running, redis_client: redis.Redis) -> None:
    """The pub/sub connection is killed: the hub reconnects and pushes still arrive fast."""
    resp = open_stream(gateway, "T1", gateway.token("T1"))
    try:
        sse = SSE(resp)
        sse.next()
        hub = gateway.server.gateway.hub
        _wait(lambda: hub.listening)
        assert redis_client.client_kill_filter(_type="pubsub") == 1
        _wait(lambda: hub.stats["listener_errors"] >= 1)
        _wait(lambda: hub.listening)
        # well before poll_interval_s (5 s): delivered by a pub/sub wake-up again
        t0 = time.monotonic()
        ids = add_push(redis_client, "T1", 1)
        assert [e.id for e in sse.pushes(1, timeout_s=3)] == ids
        assert time.monotonic() - t0 < 2
    finally:
        close_stream(resp)
