"""What a person may see of identifiers and secrets: log lines and the live console.

Customer ids are often phone numbers. Wherever a person reads them (log lines, the
``make run`` console) they are cut to their last four characters, ``…1234``; the data
paths that need them (Kafka and Redis payloads, the replay files an operator asked
for) carry them whole. Terminal ids and hall ids are not personal data and are shown
as they are. URLs are shown without their password.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["ELLIPSIS", "SHOWN", "mask_channel", "mask_id", "mask_numbers", "redact_url"]

ELLIPSIS = "…"
SHOWN = 4
"""Characters of a customer id left visible (never more than half of it)."""


def mask_id(value: str) -> str:
    """``13800001234`` → ``…1234``: the last four characters, and never more than half.

    A short id keeps less (``C12`` → ``…2``, ``A`` → ``…``), so no id is ever shown
    whole, and the result always starts with ``…`` (a masked id is recognisable).
    """
    keep = min(SHOWN, len(value) // 2)
    return ELLIPSIS + value[len(value) - keep:]


_NUMBER = re.compile(r"(?<![0-9])\+?[0-9]{7,}(?![0-9])")


def mask_numbers(text: str) -> str:
    """Free text with every run of 7 or more digits (a phone number) masked by :func:`mask_id`.

    For text that is not supposed to hold a customer id but might quote one (an
    error detail, a parser message).
    """
    return _NUMBER.sub(lambda m: mask_id(m.group(0)), text)


def mask_channel(channel: str) -> str:
    """A push channel for display: ``customer:<id>`` masked, ``terminal:<id>`` as is."""
    kind, sep, ident = channel.partition(":")
    return f"{kind}{sep}{mask_id(ident)}" if sep and kind == "customer" else channel


def redact_url(url: str) -> str:
    """``redis://user:pw@host:6379/0`` → ``redis://user:***@host:6379/0`` (and query dropped).

    The query may carry secrets too (``?password=``, tokens), so it is left out.
    Something that does not parse as a URL is returned as ``***``.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "***"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    if parts.username is not None or parts.password is not None:
        user = parts.username or ""
        netloc = f"{user}:***@{netloc}" if parts.password is not None else f"{user}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
