"""``touchstream gateway token TERMINAL_ID`` and ``touchstream gateway serve``.

:func:`add_commands` adds the group to the ``touchstream`` parser (``flows/cli.py``);
the web stack is imported only when ``serve`` runs. Secrets come from the environment
(``TOUCHSTREAM_GATEWAY_TOKEN_SECRET``), the TOML file or a file
(``redis_password_file``), never from a flag: a command line shows in ``ps`` and in
shell history, so ``--redis`` refuses a URL that holds a password.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from gateway.settings import load_gateway_settings
from gateway.tokens import TokenSigner, valid_terminal_id

__all__ = ["add_commands", "cmd_serve", "cmd_token", "parse_ttl", "redis_url_flag"]

_TTL = re.compile(r"^(\d+)\s*(s|m|h|d)?$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """``3600``, ``90s``, ``60m``, ``24h``, ``30d`` -> seconds."""
    m = _TTL.match(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 3600, 12h, 30d)")
    return int(m.group(1)) * _UNIT_S[m.group(2) or "s"]


def redis_url_flag(text: str) -> str:
    """The ``--redis`` value: a URL without a password (it would show in ``ps``)."""
    try:
        has_password = urlsplit(text).password is not None
    except ValueError:
        has_password = False  # not a URL: the settings reject it later
    if has_password:
        raise argparse.ArgumentTypeError(
            "the URL holds a password, which a command line shows to every user (ps) and "
            "keeps in shell history: give the URL without it and the password in "
            "TOUCHSTREAM_GATEWAY_REDIS_PASSWORD_FILE (a file) or "
            "TOUCHSTREAM_GATEWAY_REDIS_PASSWORD, or the whole URL in "
            "TOUCHSTREAM_GATEWAY_REDIS_URL")
    return text


def cmd_token(args: argparse.Namespace) -> int:
    """Print a token for one terminal on stdout (its expiry on stderr)."""
    settings = load_gateway_settings(args.config)
    if settings.token_secret is None:
        print("touchstream gateway: TOUCHSTREAM_GATEWAY_TOKEN_SECRET (or token_secret in "
              "--config) must be set", file=sys.stderr)
        return 2
    if not valid_terminal_id(args.terminal_id):
        print("touchstream gateway: a terminal id is 1-64 of [A-Za-z0-9._-]", file=sys.stderr)
        return 2
    ttl = args.ttl or settings.token_ttl_s
    now = datetime.now(UTC)
    token = TokenSigner.from_settings(settings).issue(args.terminal_id, ttl, now=now)
    expires = (now.replace(microsecond=0) + timedelta(seconds=ttl)).isoformat()
    print(f"touchstream gateway: token for terminal {args.terminal_id}, key "
          f"{settings.token_kid}, expires {expires}", file=sys.stderr)
    print(token)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gateway until SIGINT/SIGTERM."""
    from gateway.server import serve  # noqa: PLC0415 (the web stack only when serving)

    settings = load_gateway_settings(args.config, host=args.host, port=args.port,
                                     redis_url=args.redis,
                                     redis_cluster=True if args.redis_cluster else None)
    return serve(settings)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``gateway token`` and ``gateway serve`` to a subcommand set."""
    gw = sub.add_parser("gateway", help="push gateway for terminals (SSE / WebSocket)")
    gsub = gw.add_subparsers(dest="gateway_command", required=True)

    tok = gsub.add_parser("token", help="issue a token for one terminal (stdout)")
    tok.add_argument("terminal_id", metavar="TERMINAL_ID")
    tok.add_argument("--ttl", type=parse_ttl, metavar="DURATION",
                     help="lifetime: seconds, or 90s / 60m / 24h / 30d (default: token_ttl_s)")
    tok.add_argument("--config", type=Path, help="gateway TOML settings file")
    tok.set_defaults(func=cmd_token)

    srv = gsub.add_parser("serve", help="run the gateway")
    srv.add_argument("--host", help="listen address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="listen port (default 8080)")
    srv.add_argument("--redis", metavar="URL", type=redis_url_flag,
                     help="redis://[USER@]HOST:PORT/DB (rediss:// for TLS) of the push streams; "
                     "no password here: TOUCHSTREAM_GATEWAY_REDIS_PASSWORD_FILE")
    srv.add_argument("--redis-cluster", action="store_true",
                     help="--redis names one node of a Redis Cluster (default: redis_cluster)")
    srv.add_argument("--config", type=Path, help="gateway TOML settings file")
    srv.set_defaults(func=cmd_serve)
