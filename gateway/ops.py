"""The operations console: ``/ops``, its JSON snapshot and its live feed.

Routes (:func:`ops_routes`, registered by :func:`gateway.app.create_app`):

* ``GET /ops`` -- the console page (``static/ops.html``, ``ops.js``, ``ops.css``: no
  external assets, charts drawn as inline SVG);
* ``GET /ops/api/state`` -- a JSON snapshot (:meth:`OpsState.snapshot`);
* ``GET /ops/api/events`` -- Server-Sent Events: ``event: state`` (the snapshot) on
  connect and again, at most once a second, when something changed or a minute
  turned; ``event: alert`` for each alert as it arrives; ``: hb`` comments after
  ``heartbeat_s`` of silence; ``event: bye`` when the gateway shuts down.

What it reads is the ops feed the engine writes to Redis (``connectors/ops_feed.py``):
``ops:stats`` (latest stats document), ``ops:stats:history``, ``ops:alerts``,
``ops:pushes`` (push summaries without personal data) and ``ops:rules``; a
``PUBLISH ops:events``, heard by the hub's one pub/sub listener (the consoles hold no
Redis connection of their own), wakes the feed (each connection also re-reads every
few seconds). On a Redis Cluster the reads share the hub's bound on reads in flight.
Customer ids in alerts are reduced to their last four characters (:func:`mask_ids`)
before they leave the gateway.

Authentication, separate from terminal tokens: ``TOUCHSTREAM_GATEWAY_OPS_TOKEN`` as
``Authorization: Bearer`` or ``?token=``, or HTTP basic auth with ``ops_user`` /
``ops_password``; anything else is 401 (also when neither is configured: the console
is then closed). The page opened with a valid ``?token=`` sets a session cookie
(HttpOnly, SameSite=Strict, path ``/ops``, 12 h; an HMAC under the ops token, so
changing the token ends every session) so the page's own requests and a reload need
no token in the address bar. Credentials are compared in constant time and never
logged (the access log masks ``token=``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import contextlib
import hashlib
import hmac
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from flows.masking import mask_id
from gateway.hub import GatewayRedis, Subscription
from gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["EVENTS_CHANNEL", "LATENCY_BOUNDS_MS", "OpsAuth", "OpsReader", "OpsState",
           "mask_ids", "ops_routes"]

log = logging.getLogger("touchstream.gateway.ops")

PREFIX = "ops:"
EVENTS_CHANNEL = PREFIX + "events"
"""The engine's ops sink publishes here after each batch; the hub listens for consoles."""
COOKIE = "touchstream_ops"
SESSION_S = 12 * 3600
MAX_STREAMS = 32
"""Open ``/ops/api/events`` streams per process (each re-reads the feed when woken)."""
POLL_S = 5.0
MIN_STATE_GAP_S = 1.0
LATENCY_BOUNDS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000)
"""Upper bounds of the latency histogram's buckets; one more bucket holds the rest."""

PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}
_SESSION_CONTEXT = b"touchstream.gateway.ops.session.v1"


# --- masking -----------------------------------------------------------------------------


def mask_ids(obj: Any) -> Any:
    """A copy of ``obj`` with every ``customer_id``/``customer`` string cut to ``…1234``."""
    if isinstance(obj, dict):
        return {k: (mask_id(v) if k in ("customer_id", "customer") and isinstance(v, str)
                    else mask_ids(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [mask_ids(v) for v in obj]
    return obj


def alert_view(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What the console shows of an alert (CloudEvents JSON), customer ids masked."""
    out: dict[str, Any] = mask_ids(dict(doc))
    data = doc.get("data")
    subject = doc.get("subject")
    if (isinstance(subject, str) and isinstance(data, dict)
            and data.get("customer_id") == subject):
        out["subject"] = mask_id(subject)
    return out


# --- authentication ----------------------------------------------------------------------


class OpsAuth:
    """Checks ops credentials (token, basic auth or session cookie)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._token = (settings.ops_token.get_secret_value().encode()
                       if settings.ops_token is not None else None)
        self._user = settings.ops_user.encode() if settings.ops_user is not None else None
        self._password = (settings.ops_password.get_secret_value().encode()
                          if settings.ops_password is not None else None)

    def __repr__(self) -> str:
        return f"OpsAuth(token={self._token is not None}, basic={self._user is not None})"

    @property
    def configured(self) -> bool:
        """True if any credential is set (else the console is closed)."""
        return self._token is not None or self._user is not None

    def session_cookie(self, now: float | None = None) -> str:
        """A session value valid for :data:`SESSION_S` (needs the ops token)."""
        assert self._token is not None
        exp = int(time.time() if now is None else now) + SESSION_S
        return f"{exp}.{self._mac(str(exp))}"

    def _mac(self, exp: str) -> str:
        assert self._token is not None
        return hmac.new(self._token, _SESSION_CONTEXT + b"." + exp.encode(),
                        hashlib.sha256).hexdigest()

    def _cookie_ok(self, value: str | None, now: float | None) -> bool:
        if self._token is None or not value or len(value) > 100:
            return False
        exp, _, mac = value.partition(".")
        if not exp.isdigit() or not hmac.compare_digest(self._mac(exp), mac):
            return False
        return (time.time() if now is None else now) < int(exp)

    def check(self, conn: HTTPConnection, now: float | None = None) -> str | None:
        """How ``conn`` authenticated (``token``, ``basic``, ``cookie``), or None."""
        auth = conn.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        value = value.strip()
        if self._token is not None:
            given = value if scheme.lower() == "bearer" else conn.query_params.get("token")
            if given and hmac.compare_digest(given.encode(), self._token):
                return "token"
            if self._cookie_ok(conn.cookies.get(COOKIE), now):
                return "cookie"
        if self._user is not None and self._password is not None and scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(value, validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return None
            user_ok = hmac.compare_digest(user, self._user)
            password_ok = hmac.compare_digest(password, self._password)
            if sep and user_ok and password_ok:
                return "basic"
        return None

    def deny(self) -> Response:
        """The 401 (a browser asks for a user and password when basic auth is on)."""
        challenge = ('Basic realm="touchstream ops", charset="UTF-8"' if self._user is not None
                     else 'Bearer realm="touchstream ops"')
        detail = "ops credentials required" if self.configured else \
            "the ops console has no credentials configured (TOUCHSTREAM_GATEWAY_OPS_TOKEN)"
        return JSONResponse({"error": "unauthorized", "detail": detail}, 401,
                            headers={"www-authenticate": challenge, "cache-control": "no-store"})


# --- the state a console shows -----------------------------------------------------------


def _num(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class OpsState:
    """The console's view, built from the ops feed; :meth:`snapshot` is what it sends.

    Keeps the push summaries of the last ``window_min`` minutes (at most
    ``max_pushes``), the last ``max_alerts`` alerts (masked), the latest stats
    document and the active rule set.
    """

    def __init__(self, *, window_min: int = 30, max_pushes: int = 20_000,
                 max_alerts: int = 50) -> None:
        self.window_min = window_min
        self.pushes: deque[dict[str, Any]] = deque(maxlen=max_pushes)
        self.alerts: deque[dict[str, Any]] = deque(maxlen=max_alerts)
        self.stats: dict[str, Any] | None = None
        self.stats_at: int | None = None
        self.rules: dict[str, Any] | None = None
        self.cursors = {"pushes": "0-0", "alerts": "0-0", "stats:history": "0-0"}

    def add_push(self, doc: Mapping[str, Any]) -> None:
        """Add a push summary (``ops:pushes`` entry)."""
        if _num(doc.get("delivered_at")) is not None:
            self.pushes.append(dict(doc))

    def add_alert(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """Add an alert (CloudEvents JSON); its masked view."""
        view = alert_view(doc)
        self.alerts.append(view)
        return view

    def set_stats(self, doc: Mapping[str, Any], at_ms: int | None) -> None:
        """The latest stats document, written at ``at_ms`` (wall clock)."""
        self.stats = dict(doc)
        self.stats_at = at_ms

    def prune(self, now_ms: int) -> None:
        """Drop push summaries older than the window."""
        start = (now_ms // 60_000 - self.window_min + 1) * 60_000
        while self.pushes and self.pushes[0]["delivered_at"] < start:
            self.pushes.popleft()

    def per_minute(self, now_ms: int) -> dict[str, Any]:
        """Pushes per rule per minute over the window, oldest minute first."""
        last = now_ms // 60_000
        first = last - self.window_min + 1
        series: dict[str, list[int]] = {}
        for p in self.pushes:
            m = p["delivered_at"] // 60_000
            if first <= m <= last:
                rule = str(p.get("rule_id"))
                series.setdefault(rule, [0] * self.window_min)[m - first] += 1
        return {"minutes": [(first + i) * 60_000 for i in range(self.window_min)],
                "rules": dict(sorted(series.items()))}

    def latency(self) -> dict[str, Any]:
        """Event-to-push latency of the pushes in the window: buckets and percentiles."""
        values = sorted(max(0, v) for p in self.pushes
                        if (v := _num(p.get("latency_ms"))) is not None)
        counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        for v in values:
            counts[bisect.bisect_left(LATENCY_BOUNDS_MS, v)] += 1
        out: dict[str, Any] = {"count": len(values), "bounds_ms": list(LATENCY_BOUNDS_MS),
                               "counts": counts}
        if values:
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                out[name] = values[min(len(values) - 1, int(q * len(values)))]
            out["max"] = values[-1]
        return out

    def recent_pushes(self, n: int = 15) -> list[dict[str, Any]]:
        """The newest ``n`` push summaries, newest first."""
        return [self.pushes[-1 - i] for i in range(min(n, len(self.pushes)))]

    def snapshot(self, now_ms: int, *, alerts: bool = True) -> dict[str, Any]:
        """The JSON-ready view (``alerts`` newest first, if asked for)."""
        self.prune(now_ms)
        out: dict[str, Any] = {
            "now_ms": now_ms,
            "rules": self.rules,
            "stats": self.stats,
            "stats_at_ms": self.stats_at,
            "pushes_per_minute": self.per_minute(now_ms),
            "latency": self.latency(),
            "recent_pushes": self.recent_pushes(),
        }
        if alerts:
            out["alerts"] = list(reversed(self.alerts))
        return out


# --- reading the feed --------------------------------------------------------------------


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _field(fields: Any, name: str) -> Any:
    if not isinstance(fields, dict):
        return None
    return fields.get(name.encode(), fields.get(name))


def _json(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _streams(reply: Any) -> dict[str, list[tuple[str, Any]]]:
    """``{stream: [(id, fields), ...]}`` of an XREAD reply (RESP2 or RESP3 shape)."""
    out: dict[str, list[tuple[str, Any]]] = {}
    if not reply:
        return out
    items = reply.items() if isinstance(reply, dict) else reply
    for key, raw in items:
        entries = raw
        if (entries and isinstance(entries[0], list) and len(entries) == 1
                and entries[0] and isinstance(entries[0][0], (list, tuple))):
            entries = entries[0]  # RESP3 nesting
        out[_text(key)] = [(_text(i), f) for i, f in entries]
    return out


class OpsReader:
    """Loads and follows the ops feed in Redis into an :class:`OpsState`.

    ``slot`` is held around each round trip (the hub's :meth:`~gateway.hub.Hub.read_slot`,
    which bounds reads on a cluster); none by default.
    """

    def __init__(self, redis: GatewayRedis, prefix: str = PREFIX, *,
                 slot: Callable[[], AbstractAsyncContextManager[Any]] | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self._slot = slot if slot is not None else contextlib.nullcontext

    def _apply(self, state: OpsState, stream: str, entry_id: str, fields: Any,
               new_alerts: list[dict[str, Any]]) -> None:
        doc = _json(_field(fields, "data"))
        if doc is not None:
            if stream == "pushes":
                state.add_push(doc)
            elif stream == "alerts":
                new_alerts.append(state.add_alert(doc))
            else:
                at = _field(fields, "at")
                state.set_stats(doc, int(_text(at)) if at is not None and
                                _text(at).isdigit() else None)
        state.cursors[stream] = entry_id

    async def load(self, state: OpsState, max_pushes: int = 20_000) -> None:
        """Fill ``state`` from what the feed holds now."""
        p = self.prefix
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(p + "rules")
        pipe.xrevrange(p + "pushes", "+", "-", count=max_pushes)
        pipe.xrevrange(p + "alerts", "+", "-", count=state.alerts.maxlen or 50)
        pipe.xrevrange(p + "stats:history", "+", "-", count=1)
        pipe.get(p + "stats")
        async with self._slot():
            rules, pushes, alerts, history, stats = await pipe.execute()
        state.rules = _json(rules)
        ignored: list[dict[str, Any]] = []
        for name, entries in (("pushes", pushes), ("alerts", alerts),
                              ("stats:history", history)):
            for entry_id, fields in reversed(entries or []):
                self._apply(state, name, _text(entry_id), fields, ignored)
        if state.stats is None and (doc := _json(stats)) is not None:
            state.set_stats(doc, None)

    async def poll(self, state: OpsState, count: int = 1000) -> tuple[bool, list[dict[str, Any]]]:
        """Read what is new; (anything changed, the new alerts' views)."""
        p = self.prefix
        pipe = self.redis.pipeline(transaction=False)
        # One XREAD per stream: on a Redis Cluster the streams are in different slots
        # (one command may not span them); on one Redis it is the same round trip.
        for k, v in state.cursors.items():
            pipe.xread({p + k: v}, count=count)
        pipe.get(p + "rules")
        async with self._slot():
            *replies, rules = await pipe.execute()
        read: dict[str, list[tuple[str, Any]]] = {}
        for reply in replies:
            read.update(_streams(reply))
        new_alerts: list[dict[str, Any]] = []
        changed = False
        for key, entries in read.items():
            name = key.removeprefix(p)
            if name not in state.cursors:
                continue
            for entry_id, fields in entries:
                self._apply(state, name, entry_id, fields, new_alerts)
                changed = True
        doc = _json(rules)
        if doc is not None and doc != state.rules:
            state.rules = doc
            changed = True
        return changed, new_alerts


# --- routes --------------------------------------------------------------------------------


def _auth(conn: HTTPConnection) -> OpsAuth:
    auth: OpsAuth | None = getattr(conn.app.state, "ops_auth", None)
    if auth is None:
        gw: Gateway = conn.app.state.gateway
        auth = conn.app.state.ops_auth = OpsAuth(gw.settings)
    return auth


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def ops_page(request: Request) -> Response:
    """``GET /ops``: the console page (sets the session cookie after a ``?token=``)."""
    auth = _auth(request)
    how = auth.check(request)
    if how is None:
        return auth.deny()
    page = resources.files("gateway").joinpath("static/ops.html").read_bytes()
    response = HTMLResponse(page, headers=PAGE_HEADERS)
    if how == "token":
        response.set_cookie(COOKIE, auth.session_cookie(), max_age=SESSION_S, path="/ops",
                            httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
    return response


async def ops_state(request: Request) -> Response:
    """``GET /ops/api/state``: the snapshot as JSON."""
    auth = _auth(request)
    if auth.check(request) is None:
        return auth.deny()
    gw: Gateway = request.app.state.gateway
    state = OpsState()
    try:
        await OpsReader(gw.redis, slot=gw.hub.read_slot).load(state)
    except (RedisError, OSError):
        return JSONResponse({"error": "unavailable", "detail": "redis unavailable"}, 503,
                            headers={"retry-after": "2"})
    return Response(orjson.dumps(state.snapshot(_now_ms())), media_type="application/json",
                    headers={"cache-control": "no-store"})


async def ops_events(request: Request) -> Response:
    """``GET /ops/api/events``: the live feed as Server-Sent Events."""
    auth = _auth(request)
    if auth.check(request) is None:
        return auth.deny()
    gw: Gateway = request.app.state.gateway
    if getattr(request.app.state, "ops_streams", 0) >= MAX_STREAMS:
        return JSONResponse({"error": "unavailable", "detail": "too many ops consoles"}, 503,
                            headers={"retry-after": "5"})
    return OpsStream(gw)


async def _watch(receive: Receive, sub: Subscription) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            sub.close("client_closed")
            return


class OpsStream(Response):
    """The SSE response of one console (runs until the client leaves or shutdown)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the feed (see the module docstring)."""
        app_state = scope["app"].state
        app_state.ops_streams = getattr(app_state, "ops_streams", 0) + 1
        try:
            await self._serve(scope, receive, send)
        finally:
            app_state.ops_streams -= 1

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        reader = OpsReader(gw.redis, slot=gw.hub.read_slot)
        state = OpsState()
        try:
            await reader.load(state)
        except (RedisError, OSError):
            await JSONResponse({"error": "unavailable", "detail": "redis unavailable"}, 503,
                               headers={"retry-after": "2"})(scope, receive, send)
            return
        sub = Subscription(EVENTS_CHANNEL, "0-0", asyncio.current_task(), coalesce=True)
        gw.hub.add(sub)  # woken by the hub's listener; a shutdown closes it with the rest
        watcher = asyncio.create_task(_watch(receive, sub))
        reason = "client_closed"
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no"),
            ]})
            reason = await self._pump(sub, reader, state, send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if sub.closed is None or task is None or task.uncancel() > 0:
                raise
            reason = sub.closed
        except (TimeoutError, OSError):
            reason = "send_failed"
        finally:
            gw.hub.discard(sub)
            watcher.cancel()
        if reason == "shutdown":
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(1.0):
                    await send({"type": "http.response.body", "more_body": True,
                                "body": b"event: bye\ndata: {\"reason\":\"shutdown\"}\n\n"})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _pump(self, sub: Subscription, reader: OpsReader, state: OpsState,
                    send: Send) -> str:
        s = self.gateway.settings
        loop = asyncio.get_running_loop()

        async def emit(chunk: bytes) -> None:
            async with asyncio.timeout(s.send_timeout_s):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

        def event(name: str, doc: Any) -> bytes:
            return b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(doc))

        await emit(b"retry: 2000\n: connected\n\n" + event("state", state.snapshot(_now_ms())))
        last_send = last_state = loop.time()
        minute = _now_ms() // 60_000
        while sub.closed is None:
            deadline = min(last_send + s.heartbeat_s, loop.time() + POLL_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await sub.wake.wait()
            if sub.closed is not None:
                break
            sub.wake.clear()
            # coalesce bursts: at most one state a second
            await asyncio.sleep(max(0.0, last_state + MIN_STATE_GAP_S - loop.time()))
            try:
                changed, alerts = await reader.poll(state)
            except (RedisError, OSError):
                changed, alerts = False, []
            now_ms = _now_ms()
            chunk = b"".join(event("alert", a) for a in alerts)
            if changed or now_ms // 60_000 != minute:
                minute = now_ms // 60_000
                chunk += event("state", state.snapshot(now_ms, alerts=False))
                last_state = loop.time()
            if not chunk and loop.time() - last_send >= s.heartbeat_s:
                chunk = b": hb\n\n"
            if chunk:
                await emit(chunk)
                last_send = loop.time()
        return sub.closed or "client_closed"


def ops_routes() -> list[Route]:
    """The console's routes (``app.state.gateway`` is what they read)."""
    return [
        Route("/ops", ops_page, methods=["GET"]),
        Route("/ops/api/state", ops_state, methods=["GET"]),
        Route("/ops/api/events", ops_events, methods=["GET"]),
    ]
