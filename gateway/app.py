"""The push gateway's ASGI application (Starlette).

Routes:

* ``GET /v1/terminals/{terminal_id}/pushes`` -- Server-Sent Events: every push for the
  terminal as ``id: <stream entry id>`` / ``event: push`` / ``data: <JSON>``, a
  ``: hb`` comment after ``heartbeat_s`` of silence, and ``event: bye`` (with the reason)
  when the gateway ends the stream (token expired, shutdown). Resumes after the
  ``Last-Event-ID`` header (what ``EventSource`` sends on reconnect), else after the
  ``since`` query parameter (an entry id, or ``0`` for everything the stream holds),
  else from now;
* the same path as a WebSocket: text frames ``{"type": "push", "id": ..., "push": {...}}``,
  ``{"type": "heartbeat"}``, ``{"type": "bye", "reason": ...}``; resumes after ``since``;
* ``GET /terminal/{terminal_id}`` -- the reference kiosk page (``static/``);
* ``GET /healthz`` (the process is up) and ``GET /readyz`` (Redis answers PING: 200,
  else 503).
* ``GET /metrics`` -- Prometheus metrics (:mod:`gateway.metrics`).

Authentication: ``Authorization: Bearer <token>`` or ``?token=<token>`` (browsers cannot
set headers on ``EventSource``/``WebSocket``). No or a bad token: 401; a valid token for
another terminal: 403. Tokens never reach a log line: uvicorn's access log is off and
:class:`AccessLog` writes one line per request with the query masked
(:mod:`gateway.logsafe`).

What a terminal receives is :func:`terminal_view` of the push: its ``customer_id`` (a
phone number) reduced to the last four characters (``"customer": "…1234"``, or left out
with ``customer_id = "drop"``) and its ``reason`` (the rule's evidence, profile facts
included) left out; ``content`` is sent as the engine wrote it.

:class:`Gateway` holds what the process shares (Redis client, :class:`~gateway.hub.Hub`,
token signer, counters) on ``app.state.gateway``, for a later ``/metrics`` and ``/ops``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Protocol

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from flows.masking import mask_id
from gateway import logsafe
from gateway.hub import GatewayRedis, Hub, Subscription
from gateway.metrics import gateway_registry, metrics_endpoint
from gateway.ops import EVENTS_CHANNEL, ops_routes
from gateway.settings import GatewaySettings
from gateway.tokens import TokenClaims, TokenError, TokenSigner, valid_terminal_id
from state.redis_store import redis_options

__all__ = ["AccessLog", "Gateway", "create_app", "make_redis", "terminal_view"]

log = logging.getLogger("touchstream.gateway")
access_log = logging.getLogger("touchstream.gateway.access")

_ENTRY_ID = re.compile(r"^(?:\d{1,20}-\d{1,20}|0|\$)$")
SSE_RETRY_MS = 2000
_PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}
WS_CLOSE = {"shutdown": 1012, "token_expired": 4401, "slow_consumer": 1013,
            "send_timeout": 1013}


def terminal_view(doc: Mapping[str, Any], customer_id: str = "mask") -> dict[str, Any]:
    """What a terminal may see of a push document (see the module docstring)."""
    out = {k: doc[k] for k in ("push_id", "channel", "rule_id", "rule_version", "event_ts",
                               "content") if k in doc}
    cid = doc.get("customer_id")
    if customer_id == "mask" and isinstance(cid, str) and cid:
        out["customer"] = mask_id(cid)
    return out


def make_redis(settings: GatewaySettings) -> GatewayRedis:
    """The shared async client: a blocking pool of ``redis_pool_size`` connections.

    With ``redis_cluster``, redis-py's async cluster client, at most
    ``redis_pool_size`` connections per node (the hub bounds its reads to fit, see
    :class:`~gateway.hub.Hub`). With the ACL user, password and TLS files of the
    settings (:func:`state.redis_store.redis_options` checks them as the engine's).
    """
    if settings.redis_url is None:
        raise ValueError("redis_url is not set (TOUCHSTREAM_GATEWAY_REDIS_URL)")
    url = settings.redis_url.get_secret_value()
    options = redis_options(
        url, username=settings.redis_username, password=settings.redis_auth_password(),
        tls_ca_file=settings.redis_tls_ca_file, tls_cert_file=settings.redis_tls_cert_file,
        tls_key_file=settings.redis_tls_key_file, names="redis_")
    if settings.redis_cluster:
        return RedisCluster.from_url(
            url,
            **options,
            max_connections=settings.redis_pool_size,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            socket_keepalive=True,
        )
    pool = BlockingConnectionPool.from_url(
        url,
        **options,
        max_connections=settings.redis_pool_size,
        timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_keepalive=True,
    )
    return Redis(connection_pool=pool)


class Sink(Protocol):
    """Where one connection's events go (SSE or WebSocket framing)."""

    async def event(self, entry_id: str, data: bytes) -> None:
        """Send one push (``data`` is its terminal view as JSON)."""

    async def heartbeat(self) -> None:
        """Send a keep-alive."""


class ClientGone(Exception):
    """The client went away while we were sending."""


class Gateway:
    """What one gateway process shares between connections.

    ``redis`` and ``signer`` default to the ones ``settings`` describe. :meth:`start`
    runs the hub's listener; :meth:`stop` closes every stream and the client.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        redis: GatewayRedis | None = None,
        signer: TokenSigner | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis if redis is not None else make_redis(settings)
        self.signer = signer if signer is not None else TokenSigner.from_settings(settings)
        cluster = isinstance(self.redis, RedisCluster)
        self.hub = Hub(self.redis, prefix=settings.stream_prefix,
                       max_queued=settings.max_queued,
                       idle_ping_s=max(settings.heartbeat_s, 5.0),
                       # a node's pool: the listener's connection, the rest for reads
                       max_reads=settings.redis_pool_size - 1 if cluster else None,
                       read_wait_s=settings.redis_timeout_s,
                       channels=(EVENTS_CHANNEL,))  # the ops consoles' wake-ups
        self.stats: Counter[str] = Counter()
        self.open_streams = 0
        self.started_at = datetime.now(UTC)
        self._hub_task: asyncio.Task[None] | None = None

    def stream_key(self, terminal_id: str) -> str:
        """The Redis stream (and pub/sub channel) of a terminal."""
        return f"{self.settings.stream_prefix}terminal:{terminal_id}"

    async def start(self) -> None:
        """Start listening for push notifications."""
        if self._hub_task is None:
            self._hub_task = asyncio.create_task(self.hub.run(), name="gateway-hub")

    def close_streams(self, reason: str = "shutdown") -> int:
        """End every open stream (each client reconnects, to this or another process)."""
        return self.hub.close_all(reason)

    async def stop(self) -> None:
        """Close every stream, stop the listener, close the Redis client and its pool."""
        self.close_streams("shutdown")
        if self._hub_task is not None:
            self._hub_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hub_task
            self._hub_task = None
        await self.redis.aclose()
        if isinstance(self.redis, Redis):
            await self.redis.connection_pool.disconnect()

    async def ready(self) -> bool:
        """True if Redis answers PING within ``redis_timeout_s``."""
        try:
            async with asyncio.timeout(self.settings.redis_timeout_s):
                return bool(await self.redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    def authorize(self, terminal_id: str, token: str | None) -> TokenClaims | Response:
        """The token's claims if it may read ``terminal_id``'s pushes, else a 401/403."""
        try:
            claims = self.signer.verify(token)
        except TokenError as exc:
            self.stats[f"auth_{exc.reason}"] += 1
            return _error(401, "unauthorized", exc.reason,
                          {"www-authenticate": 'Bearer error="invalid_token"'})
        if claims.terminal_id != terminal_id:
            self.stats["auth_forbidden"] += 1
            return _error(403, "forbidden", "token is for another terminal")
        return claims

    async def start_id(self, terminal_id: str, since: str | None) -> str:
        """Where a new stream starts: after ``since``, or after the newest entry."""
        if since is None or since == "$":
            return await self.hub.tail_id(self.stream_key(terminal_id))
        return "0-0" if since == "0" else since

    def render(self, doc: Mapping[str, Any]) -> bytes:
        """The JSON a terminal gets for one push."""
        return orjson.dumps(terminal_view(doc, self.settings.customer_id))

    async def run_stream(self, sub: Subscription, sink: Sink, expires_at: datetime) -> str:
        """Send ``sub``'s pushes to ``sink`` until the stream ends; the reason it ended.

        Reasons: ``client_closed``, ``slow_consumer`` (from the hub), ``send_timeout``,
        ``token_expired``, ``shutdown``. Must run in ``sub.task``.
        """
        try:
            reason = await self._pump(sub, sink, expires_at)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if sub.closed is None or task is None or task.uncancel() > 0:
                raise
            reason = sub.closed
        except TimeoutError:
            reason = "send_timeout"
        except ClientGone:
            reason = "client_closed"
        sub.close(reason)  # the current task: nothing is cancelled from here on
        self.stats[f"closed_{sub.closed}"] += 1
        return sub.closed or reason

    async def _pump(self, sub: Subscription, sink: Sink, expires_at: datetime) -> str:
        s = self.settings
        loop = asyncio.get_running_loop()
        # the same leeway as the token check, or a reconnect inside it would bounce at once
        exp = loop.time() + (expires_at - datetime.now(UTC)).total_seconds() + s.token_leeway_s
        last_send = loop.time()
        retry_s = 0.1
        while True:
            if sub.closed is not None:
                return sub.closed
            sub.wake.clear()
            sub.lag = 0
            try:
                entries = await self.hub.read(sub.key, sub.last_id, s.read_batch)
                retry_s = 0.1
                last_read = loop.time()
            except (RedisError, OSError):
                # keep the client; read again soon (heartbeats go on meanwhile)
                self.stats["read_errors"] += 1
                entries = []
                last_read = loop.time() - s.poll_interval_s + retry_s
                retry_s = min(retry_s * 2, 5.0)
            for entry_id, doc in entries:
                if doc is not None:
                    async with asyncio.timeout(s.send_timeout_s):
                        await sink.event(entry_id, self.render(doc))
                    last_send = loop.time()
                    self.stats["pushes_sent"] += 1
                sub.last_id = entry_id
            if len(entries) >= s.read_batch:
                continue
            while not sub.wake.is_set():
                now = loop.time()
                if now >= exp:
                    return "token_expired"
                if now - last_send >= s.heartbeat_s:
                    async with asyncio.timeout(s.send_timeout_s):
                        await sink.heartbeat()
                    last_send = now = loop.time()
                    self.stats["heartbeats"] += 1
                if now - last_read >= s.poll_interval_s:
                    break
                deadline = min(last_send + s.heartbeat_s, last_read + s.poll_interval_s, exp)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await sub.wake.wait()


def _error(status: int, error: str, detail: str,
           headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": error, "detail": detail}, status, headers=dict(headers or {}))


def _token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query.get("token") or None


def _since(headers: Mapping[str, str], query: Mapping[str, str]) -> str | Response | None:
    since = headers.get("last-event-id") or query.get("since") or None
    if since is not None and not _ENTRY_ID.match(since):
        return _error(400, "bad_request", "Last-Event-ID / since is not a stream entry id")
    return since


async def _watch(receive: Receive, sub: Subscription, disconnect: str) -> None:
    """Close ``sub`` when the client disconnects."""
    while True:
        message = await receive()
        if message["type"] == disconnect:
            sub.close("client_closed")
            return


class _SSESink:
    __slots__ = ("_send",)

    def __init__(self, send: Send) -> None:
        self._send = send

    async def event(self, entry_id: str, data: bytes) -> None:
        body = b"id: %s\nevent: push\ndata: %s\n\n" % (entry_id.encode(), data)
        await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def heartbeat(self) -> None:
        await self._send({"type": "http.response.body", "body": b": hb\n\n", "more_body": True})


class _WSSink:
    __slots__ = ("_ws",)

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws

    async def _text(self, text: str) -> None:
        try:
            await self._ws.send_text(text)
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:
            raise ClientGone from exc

    async def event(self, entry_id: str, data: bytes) -> None:
        await self._text(f'{{"type":"push","id":"{entry_id}","push":{data.decode()}}}')

    async def heartbeat(self) -> None:
        await self._text('{"type":"heartbeat"}')


class PushStream(Response):
    """The SSE response of one terminal connection (runs until the stream ends)."""

    def __init__(self, gateway: Gateway, terminal_id: str, claims: TokenClaims,
                 since: str | None) -> None:
        self.gateway = gateway
        self.terminal_id = terminal_id
        self.claims = claims
        self.since = since
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the stream (see the module docstring)."""
        gw = self.gateway
        if gw.open_streams >= gw.settings.max_connections:
            gw.stats["rejected_full"] += 1
            await _error(503, "unavailable", "too many connections",
                         {"retry-after": "5"})(scope, receive, send)
            return
        gw.open_streams += 1
        try:
            await self._serve(scope, receive, send)
        finally:
            gw.open_streams -= 1

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        try:
            start = await gw.start_id(self.terminal_id, self.since)
        except (RedisError, OSError):
            await _error(503, "unavailable", "redis unavailable",
                         {"retry-after": "2"})(scope, receive, send)
            return
        sub = Subscription(gw.stream_key(self.terminal_id), start, asyncio.current_task())
        gw.hub.add(sub)
        watcher = asyncio.create_task(_watch(receive, sub, "http.disconnect"))
        t0 = time.monotonic()
        log.info("stream open: terminal %s (sse) after %s", self.terminal_id, start)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no"),
            ]})
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"retry: %d\n: connected\n\n" % SSE_RETRY_MS})
            gw.stats["opened_sse"] += 1
            reason = await gw.run_stream(sub, _SSESink(send), self.claims.expires_at)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if sub.closed is None or task is None or task.uncancel() > 0:
                raise
            reason = sub.closed
        finally:
            gw.hub.discard(sub)
            watcher.cancel()
        log.info("stream closed: terminal %s (sse) %s after %.0f s at %s", self.terminal_id,
                 reason, time.monotonic() - t0, sub.last_id)
        if reason in ("token_expired", "shutdown"):
            bye = b"event: bye\ndata: %s\n\n" % orjson.dumps({"reason": reason})
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(1.0):
                    await send({"type": "http.response.body", "body": bye, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        # slow_consumer / send_timeout: the client does not read, so a last write would
        # only wait; returning with the response open makes the server drop the connection.


async def pushes_sse(request: Request) -> Response:
    """``GET /v1/terminals/{terminal_id}/pushes`` as Server-Sent Events."""
    gw: Gateway = request.app.state.gateway
    terminal_id = request.path_params["terminal_id"]
    if not valid_terminal_id(terminal_id):
        return _error(404, "not_found", "no such terminal id")
    claims = gw.authorize(terminal_id, _token(request.headers, request.query_params))
    if isinstance(claims, Response):
        return claims
    since = _since(request.headers, request.query_params)
    if isinstance(since, Response):
        return since
    return PushStream(gw, terminal_id, claims, since)


async def _deny(ws: WebSocket, response: Response) -> None:
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(response)
    else:
        await ws.close(1008)


async def pushes_ws(ws: WebSocket) -> None:
    """``/v1/terminals/{terminal_id}/pushes`` as a WebSocket."""
    gw: Gateway = ws.app.state.gateway
    terminal_id = ws.path_params["terminal_id"]
    if not valid_terminal_id(terminal_id):
        await _deny(ws, _error(404, "not_found", "no such terminal id"))
        return
    claims = gw.authorize(terminal_id, _token(ws.headers, ws.query_params))
    if isinstance(claims, Response):
        await _deny(ws, claims)
        return
    since = _since(ws.headers, ws.query_params)
    if isinstance(since, Response):
        await _deny(ws, since)
        return
    if gw.open_streams >= gw.settings.max_connections:
        gw.stats["rejected_full"] += 1
        await _deny(ws, _error(503, "unavailable", "too many connections"))
        return
    gw.open_streams += 1
    try:
        try:
            start = await gw.start_id(terminal_id, since)
        except (RedisError, OSError):
            await _deny(ws, _error(503, "unavailable", "redis unavailable"))
            return
        await _serve_ws(gw, ws, terminal_id, claims, start)
    finally:
        gw.open_streams -= 1


async def _serve_ws(gw: Gateway, ws: WebSocket, terminal_id: str, claims: TokenClaims,
                    start: str) -> None:
    sub = Subscription(gw.stream_key(terminal_id), start, asyncio.current_task())
    gw.hub.add(sub)
    watcher: asyncio.Task[None] | None = None
    t0 = time.monotonic()
    log.info("stream open: terminal %s (websocket) after %s", terminal_id, start)
    try:
        await ws.accept()
        watcher = asyncio.create_task(_watch(ws.receive, sub, "websocket.disconnect"))
        gw.stats["opened_websocket"] += 1
        reason = await gw.run_stream(sub, _WSSink(ws), claims.expires_at)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if sub.closed is None or task is None or task.uncancel() > 0:
            raise
        reason = sub.closed
    finally:
        gw.hub.discard(sub)
        if watcher is not None:
            watcher.cancel()
    log.info("stream closed: terminal %s (websocket) %s after %.0f s at %s", terminal_id,
             reason, time.monotonic() - t0, sub.last_id)
    if reason == "client_closed":
        return
    with contextlib.suppress(TimeoutError, OSError, RuntimeError, WebSocketDisconnect):
        async with asyncio.timeout(1.0):
            if reason in ("token_expired", "shutdown"):
                await ws.send_text(orjson.dumps({"type": "bye", "reason": reason}).decode())
            await ws.close(WS_CLOSE.get(reason, 1011), reason)


async def healthz(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: Redis answers PING (503 if not)."""
    gw: Gateway = request.app.state.gateway
    ok = await gw.ready()
    body = {"status": "ready" if ok else "unavailable",
            "redis": "ok" if ok else "unreachable",
            "listener": gw.hub.listening,
            "streams": gw.open_streams}
    return JSONResponse(body, 200 if ok else 503)


def _page() -> bytes:
    return resources.files("gateway").joinpath("static/terminal.html").read_bytes()


async def terminal_page(request: Request) -> Response:
    """``GET /terminal/{terminal_id}``: the reference kiosk page."""
    if not valid_terminal_id(request.path_params["terminal_id"]):
        return _error(404, "not_found", "no such terminal id")
    page: bytes = request.app.state.page
    return HTMLResponse(page, headers=PAGE_HEADERS)


class AccessLog:
    """One log line per request, query masked (:func:`gateway.logsafe.redact`).

    Streams are logged when they end, with their duration. Probes (``/healthz``,
    ``/readyz``) are logged at DEBUG.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on and log it when it is done."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        status = [0]

        async def logged_send(message: Message) -> None:
            t = message["type"]
            if t in ("http.response.start", "websocket.http.response.start"):
                status[0] = message["status"]
            elif t == "websocket.accept":
                status[0] = 101
            elif t == "websocket.close" and not status[0]:
                status[0] = 403
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            path = scope.get("path", "")
            query = scope.get("query_string", b"").decode("latin-1")
            target = logsafe.redact(path + ("?" + logsafe.redact_query(query) if query else ""))
            client = scope.get("client") or ("-", 0)
            method = scope.get("method", "WS") if scope["type"] == "http" else "WS"
            access_log.log(logging.DEBUG if path in _PROBES else logging.INFO,
                           '%s "%s %s" %d %.0fms', client[0], method, target, status[0],
                           (time.monotonic() - t0) * 1000)


def create_app(settings: GatewaySettings, gateway: Gateway | None = None) -> Starlette:
    """The Starlette app; ``gateway`` defaults to one built from ``settings``.

    The gateway's listener starts and stops with the app's lifespan. Routes for a later
    ``/ops`` console or ``/metrics`` go into the same list; ``app.state.gateway`` is
    what they read.
    """
    logsafe.install(root_handlers=False)
    gw = gateway if gateway is not None else Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/terminals/{terminal_id}/pushes", pushes_sse, methods=["GET"]),
        WebSocketRoute("/v1/terminals/{terminal_id}/pushes", pushes_ws),
        Route("/terminal/{terminal_id}", terminal_page, methods=["GET"]),
        *ops_routes(),  # /ops console (gateway/ops.py)
        Mount("/static", StaticFiles(packages=[("gateway", "static")]), name="static"),
    ]
    middleware = [Middleware(AccessLog)]
    if settings.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET"],
            allow_headers=["Authorization", "Last-Event-ID"], max_age=600))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.gateway = gw
    app.state.metrics = gateway_registry(gw)
    app.state.page = _page()
    return app
