"""Gateway fixtures: a real uvicorn server on a free port, against the test redis-server."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import redis

from gateway.server import GatewayServer
from gateway.settings import GatewaySettings
from gateway.tokens import TokenSigner

SECRET = "test-only-secret-" + "0123456789abcdef" * 2
OPS_TOKEN = "ops-token-for-tests-0123"
"""The ops console's token in the tests that open it."""


def settings_for(redis_url: str, **over: Any) -> GatewaySettings:
    """Test settings: short heartbeat, small queue bound, any free port."""
    base: dict[str, Any] = {
        "redis_url": redis_url, "token_secret": SECRET, "host": "127.0.0.1", "port": 0,
        "heartbeat_s": 0.3, "poll_interval_s": 5.0, "max_queued": 8, "send_timeout_s": 3.0,
        "log_level": "debug",
    }
    return GatewaySettings(**(base | over))


@dataclass
class Running:
    """A gateway serving in a thread."""

    server: GatewayServer
    thread: threading.Thread
    signer: TokenSigner = field(init=False)

    def __post_init__(self) -> None:
        self.signer = TokenSigner.from_settings(self.server.settings)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ws_url(self) -> str:
        return self.server.url.replace("http://", "ws://")

    def token(self, terminal_id: str, ttl_s: int = 3600) -> str:
        return self.signer.issue(terminal_id, ttl_s)

    def stats(self) -> dict[str, int]:
        return dict(self.server.gateway.stats)


@contextlib.contextmanager
def running_gateway(settings: GatewaySettings) -> Iterator[Running]:
    """Start a gateway with ``settings`` in a thread; stop it on exit."""
    server = GatewayServer(settings)
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.02)
    try:
        yield Running(server, thread)
    finally:
        server.stop()
        thread.join(15)


@pytest.fixture
def gateway(redis_url: str) -> Iterator[Running]:
    """A gateway on the flushed test Redis with :func:`settings_for` defaults."""
    with running_gateway(settings_for(redis_url)) as running:
        yield running


def add_push(client: redis.Redis, terminal_id: str, n: int, *, customer: str = "13800000004",
             publish: bool = True, pad: int = 0) -> list[str]:
    """XADD (and PUBLISH, as the engine does) a push to a terminal's stream; its id."""
    key = f"push:terminal:{terminal_id}"
    doc = {"push_id": f"p{n}", "customer_id": customer, "channel": f"terminal:{terminal_id}",
           "rule_id": "help-sprite", "rule_version": 1, "event_ts": 1700000000000 + n,
           "content": {"kind": "help", "module": "remote_cam", "n": n, "pad": "x" * pad},
           "reason": {"dwell_s": 90, "subscribed": True}}
    data = orjson.dumps(doc)
    entry_id = client.xadd(key, {"data": data})
    if publish:
        client.publish(key, data)
    return [entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)]


@dataclass
class SSEEvent:
    """One parsed SSE event or comment."""

    event: str = "message"
    id: str | None = None
    data: str = ""
    comment: str | None = None


class SSE:
    """A minimal SSE parser over an httpx streaming response."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.iter_lines()

    def next(self) -> SSEEvent | None:
        """The next event or comment; None at the end of the stream."""
        ev = SSEEvent()
        seen = False
        for line in self._lines:
            if line == "":
                if seen:
                    return ev
                continue
            if line.startswith(":"):
                if not seen:
                    return SSEEvent(event="comment", comment=line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "retry":
                continue
            seen = True
            if name == "id":
                ev.id = value
            elif name == "event":
                ev.event = value
            elif name == "data":
                ev.data = value if not ev.data else ev.data + "\n" + value
        return ev if seen else None

    def pushes(self, n: int, timeout_s: float = 5.0) -> list[SSEEvent]:
        """The next ``n`` push events (comments skipped)."""
        out: list[SSEEvent] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(out)} of {n} pushes arrived")
            ev = self.next()
            if ev is None:
                raise AssertionError(f"stream ended after {len(out)} of {n} pushes")
            if ev.event == "push":
                out.append(ev)
        return out

    def until_comment(self, count: int, timeout_s: float = 5.0) -> list[SSEEvent]:
        """Everything up to and including the ``count``-th heartbeat comment."""
        seen: list[SSEEvent] = []
        deadline = time.monotonic() + timeout_s
        hb = 0
        while hb < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{hb} of {count} heartbeats")
            ev = self.next()
            if ev is None:
                raise AssertionError("stream ended")
            seen.append(ev)
            if ev.event == "comment" and ev.comment == "hb":
                hb += 1
        return seen


PUSHES_PATH = "/v1/terminals/{}/pushes"


def open_stream(gw: Running, tid: str, token: str | None = None, *, since: str | None = None,
                last_event_id: str | None = None, bearer: bool = True) -> httpx.Response:
    """Open a terminal's SSE stream (close it with :func:`close_stream`). The token goes
    in a header unless told."""
    headers = {}
    params = {}
    if token is not None:
        if bearer:
            headers["authorization"] = f"Bearer {token}"
        else:
            params["token"] = token
    if since is not None:
        params["since"] = since
    if last_event_id is not None:
        headers["last-event-id"] = last_event_id
    client = httpx.Client(timeout=httpx.Timeout(5.0))
    request = client.build_request("GET", gw.url + PUSHES_PATH.format(tid), headers=headers,
                                   params=params)
    response = client.send(request, stream=True)
    response.extensions["test_client"] = client
    return response


def close_stream(response: httpx.Response) -> None:
    """Close a stream :func:`open_stream` opened, and its client."""
    response.close()
    response.extensions["test_client"].close()


def next_event(sse: SSE, name: str, timeout_s: float = 8.0) -> str:
    """The data of the next ``name`` event (others are skipped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ev = sse.next()
        if ev is None:
            raise AssertionError("stream ended")
        if ev.event == name:
            return ev.data
    raise AssertionError(f"no {name} event")
