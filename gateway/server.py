"""Run the gateway under uvicorn on a socket it binds itself.

The listening socket gets ``SO_REUSEADDR``, a deep backlog and, on Linux,
``TCP_USER_TIMEOUT`` (inherited by every accepted socket): a peer that acknowledges
nothing for that long -- a kiosk that vanished, or a client that stopped reading and
left the gateway's writes queued -- is dropped by the kernel, so its file descriptor and
write buffer do not linger. uvicorn runs with its access log off (the gateway logs each
request itself with tokens masked), WebSocket compression off (a deflate context costs
hundreds of KiB per connection), and on shutdown the gateway ends every stream first
(each client reconnects with its last id) instead of waiting for them to end.
WebSocket protocol pings are off: the gateway's heartbeats do that job for both SSE and
WebSocket.
"""

from __future__ import annotations

import logging
import resource
import socket
import sys

import uvicorn
from starlette.applications import Starlette

from gateway import logsafe
from gateway.app import Gateway, create_app
from gateway.settings import GatewaySettings

__all__ = ["GatewayServer", "listen_socket", "raise_nofile_limit", "serve"]

log = logging.getLogger("touchstream.gateway")


def listen_socket(host: str, port: int, backlog: int = 4096,
                  tcp_user_timeout_s: float = 0.0, reuse_port: bool = False) -> socket.socket:
    """A bound, listening TCP socket (IPv6 if ``host`` has a colon).

    ``reuse_port`` sets ``SO_REUSEPORT``: several gateway processes may then listen on
    the same port and the kernel spreads new connections over them.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
        if tcp_user_timeout_s > 0 and user_timeout is not None:
            sock.setsockopt(socket.IPPROTO_TCP, user_timeout, int(tcp_user_timeout_s * 1000))
        sock.bind((host, port))
        sock.listen(backlog)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def raise_nofile_limit(wanted: int) -> int:
    """Raise the soft open-files limit towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


class _Server(uvicorn.Server):
    """uvicorn, ending the gateway's streams before it waits for connections to close."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self._gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """End every stream, then shut down as uvicorn does."""
        n = self._gateway.close_streams("shutdown")
        if n:
            log.info("ending %d open streams", n)
        await super().shutdown(sockets)


class GatewayServer:
    """A gateway bound to its socket; :meth:`run` blocks, :meth:`serve` is a coroutine.

    ``gateway`` defaults to one built from ``settings`` (a test may pass its own).
    :meth:`stop` asks it to stop (from any thread).
    """

    def __init__(self, settings: GatewaySettings, gateway: Gateway | None = None) -> None:
        self.settings = settings
        self.app: Starlette = create_app(settings, gateway)
        self.gateway: Gateway = self.app.state.gateway
        self.socket = listen_socket(settings.host, settings.port, settings.backlog,
                                    settings.tcp_user_timeout_s, settings.reuse_port)
        config = uvicorn.Config(
            self.app,
            access_log=False,
            log_config=None,
            log_level=settings.log_level,
            ws="wsproto",  # its denial responses (401/403 before the upgrade) are clean
            ws_per_message_deflate=False,
            # no protocol pings: the gateway's own heartbeats keep proxies from timing
            # out and, with TCP_USER_TIMEOUT, find dead peers (pings doubled idle CPU)
            ws_ping_interval=None,
            ws_ping_timeout=None,
            server_header=False,
            date_header=True,
            lifespan="on",
            backlog=settings.backlog,
            timeout_graceful_shutdown=5,
        )
        self.server = _Server(config, self.gateway)

    @property
    def port(self) -> int:
        """The port it listens on."""
        port: int = self.socket.getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """``http://host:port``."""
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def started(self) -> bool:
        """True once it accepts connections."""
        return bool(self.server.started)

    def run(self) -> None:
        """Serve until stopped (SIGINT/SIGTERM in the main thread, or :meth:`stop`)."""
        self.server.run(sockets=[self.socket])

    async def serve(self) -> None:
        """Serve in the running event loop until stopped."""
        await self.server.serve(sockets=[self.socket])

    def stop(self) -> None:
        """Ask the server to stop (it ends every stream first)."""
        self.server.should_exit = True


def serve(settings: GatewaySettings) -> int:
    """The ``touchstream gateway serve`` entry: log safely, raise the fd limit, serve."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logsafe.install(root_handlers=True)
    logging.getLogger("touchstream.gateway").setLevel(settings.log_level.upper())
    if settings.redis_url is None or settings.token_secret is None:
        missing = [n for n, v in (("TOUCHSTREAM_GATEWAY_REDIS_URL", settings.redis_url),
                                  ("TOUCHSTREAM_GATEWAY_TOKEN_SECRET", settings.token_secret))
                   if v is None]
        print(f"touchstream gateway: {' and '.join(missing)} must be set "
              "(environment or --config TOML)", file=sys.stderr)
        return 2
    limit = raise_nofile_limit(settings.max_connections + 256)
    if limit < settings.max_connections + 64:
        log.warning("open-files limit %d is below max_connections %d; raise ulimit -n",
                    limit, settings.max_connections)
    server = GatewayServer(settings)
    log.info("push gateway on %s (max %d streams, heartbeat %g s)", server.url,
             settings.max_connections, settings.heartbeat_s)
    server.run()
    return 0
