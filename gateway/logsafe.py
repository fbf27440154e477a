"""Keep tokens out of logs.

Terminals pass their token as ``?token=`` (a browser's ``EventSource`` and ``WebSocket``
cannot send headers), so any log line that shows a request target could carry one.
The gateway turns uvicorn's own access log off and writes its own lines with
:func:`redact`; uvicorn still logs WebSocket handshakes with the full target on
``uvicorn.error``, so :class:`RedactFilter` is put on uvicorn's loggers (and on the
root handlers by :func:`install`) to mask them too.
"""

from __future__ import annotations

import logging
import re

__all__ = ["RedactFilter", "install", "redact", "redact_query"]

_QUERY_SECRET = re.compile(r"(?i)((?:^|[?&;\s\"'])(?:token|access_token)=)[^&\s\"';#]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
# The shape of a token, wherever it appears (a path, an error message...).
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")

MASK = "***"


def redact(text: str) -> str:
    """``text`` with token query values, bearer credentials and token-shaped words masked."""
    text = _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, text)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    return _TOKEN_SHAPE.sub(MASK, text)


def redact_query(query: str) -> str:
    """A query string (without ``?``) with ``token`` values masked."""
    return redact("?" + query)[1:] if query else ""


class RedactFilter(logging.Filter):
    """Masks tokens in a record's message (formatted once, arguments dropped)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record`` in place; never drops it."""
        try:
            msg = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler to report
            return True
        clean = redact(msg)
        if clean != msg or record.args:
            record.msg = clean
            record.args = None
        if "color_message" in record.__dict__:  # uvicorn's coloured copy: drop it
            del record.__dict__["color_message"]
        return True


_FILTER = RedactFilter()
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def install(root_handlers: bool = True) -> None:
    """Put the filter on uvicorn's loggers and, if asked, on every root handler."""
    for name in UVICORN_LOGGERS:
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
    if root_handlers:
        for h in logging.getLogger().handlers:
            if _FILTER not in h.filters:
                h.addFilter(_FILTER)
