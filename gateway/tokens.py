"""Terminal tokens: signed, bound to one terminal id, expiring.

A token is ``base64url(payload) "." base64url(HMAC-SHA256(key, context "." payload_b64))``
(no padding), the payload a compact JSON object
``{"terminal_id": "H01-T06", "iat": 1700000000, "exp": 1702592000, "kid": "k1"}``
(times in whole seconds since the epoch, UTC). ``context`` is a fixed label, so a MAC
made with the same key for another purpose is never a valid token.

Verifying tries the current key and every previous key (rotation: new tokens are signed
with ``token_secret``/``token_kid``; tokens signed with a key listed in
``previous_token_secrets`` stay valid until they expire), compares in constant time
(:func:`hmac.compare_digest`), and only then reads the payload, whose ``kid`` must name
the key that matched. A :class:`TokenError` says why a token was refused by a short
reason code; it never carries the token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

import orjson

if TYPE_CHECKING:
    from gateway.settings import GatewaySettings

__all__ = [
    "MAX_TOKEN_CHARS",
    "TERMINAL_ID_RE",
    "TokenClaims",
    "TokenError",
    "TokenReason",
    "TokenSigner",
    "valid_terminal_id",
]

TERMINAL_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
"""Terminal ids the gateway accepts (they become part of a Redis key and a URL path)."""

MAX_TOKEN_CHARS = 1024
_CONTEXT = b"touchstream.gateway.terminal.v1"
_MAX_TS = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second a datetime holds
_SHAPE = re.compile(r"^[A-Za-z0-9_-]{1,900}\.[A-Za-z0-9_-]{43}$")

TokenReason = Literal["missing", "malformed", "bad_signature", "expired", "invalid_claims"]


def valid_terminal_id(terminal_id: str) -> bool:
    """True if ``terminal_id`` is 1-64 of ``[A-Za-z0-9._-]``."""
    return bool(TERMINAL_ID_RE.match(terminal_id))


class TokenError(Exception):
    """A token was refused; ``reason`` says why (the token itself is never kept)."""

    def __init__(self, reason: TokenReason) -> None:
        super().__init__(reason)
        self.reason: TokenReason = reason


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a valid token says: which terminal, until when, signed with which key."""

    terminal_id: str
    issued_at: datetime
    expires_at: datetime
    kid: str


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


class TokenSigner:
    """Issues and verifies terminal tokens with one current key and older ones.

    ``secret`` signs new tokens under ``kid``; ``previous`` (kid -> secret) are still
    accepted when verifying. ``leeway_s`` tolerates that much clock skew on expiry.
    """

    def __init__(
        self,
        secret: bytes,
        kid: str = "k1",
        previous: Mapping[str, bytes] | None = None,
        leeway_s: int = 30,
    ) -> None:
        if not secret:
            raise ValueError("the token secret is empty")
        self._kid = kid
        self._keys: dict[str, bytes] = {kid: secret}
        for k, v in (previous or {}).items():
            if k != kid:
                self._keys[k] = v
        self._leeway = timedelta(seconds=leeway_s)

    def __repr__(self) -> str:
        return f"TokenSigner(kid={self._kid!r}, keys={sorted(self._keys)!r})"

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> TokenSigner:
        """The signer of ``settings`` (which must have ``token_secret``)."""
        if settings.token_secret is None:
            raise ValueError("token_secret is not set (TOUCHSTREAM_GATEWAY_TOKEN_SECRET)")
        return cls(
            settings.token_secret.get_secret_value().encode(),
            kid=settings.token_kid,
            previous={k: v.get_secret_value().encode()
                      for k, v in settings.previous_token_secrets.items()},
            leeway_s=settings.token_leeway_s,
        )

    @staticmethod
    def _mac(key: bytes, payload_b64: str) -> bytes:
        return hmac.new(key, _CONTEXT + b"." + payload_b64.encode("ascii"),
                        hashlib.sha256).digest()

    def issue(self, terminal_id: str, ttl_s: int, now: datetime | None = None) -> str:
        """A token for ``terminal_id`` valid for ``ttl_s`` seconds from ``now`` (UTC)."""
        if not valid_terminal_id(terminal_id):
            raise ValueError("terminal id must be 1-64 of [A-Za-z0-9._-]")
        if ttl_s <= 0:
            raise ValueError("ttl must be positive")
        iat = int(_now(now).timestamp())
        payload = orjson.dumps({"terminal_id": terminal_id, "iat": iat, "exp": iat + ttl_s,
                                "kid": self._kid})
        p64 = _b64e(payload)
        return f"{p64}.{_b64e(self._mac(self._keys[self._kid], p64))}"

    def verify(self, token: str | None, now: datetime | None = None) -> TokenClaims:
        """The claims of a valid, unexpired token; else :class:`TokenError`."""
        if not token:
            raise TokenError("missing")
        if len(token) > MAX_TOKEN_CHARS or not _SHAPE.match(token):
            raise TokenError("malformed")
        p64, s64 = token.split(".")
        try:
            sig = _b64d(s64)
        except ValueError:
            raise TokenError("malformed") from None
        matched: str | None = None
        for kid, key in self._keys.items():  # every key, so the time does not tell which
            if hmac.compare_digest(self._mac(key, p64), sig):
                matched = kid
        if matched is None:
            raise TokenError("bad_signature")
        try:
            claims = orjson.loads(_b64d(p64))
        except (ValueError, orjson.JSONDecodeError):
            raise TokenError("invalid_claims") from None
        if not isinstance(claims, dict):
            raise TokenError("invalid_claims")
        tid, iat, exp, claim_kid = (claims.get(k) for k in ("terminal_id", "iat", "exp", "kid"))
        if (not isinstance(tid, str) or not valid_terminal_id(tid)
                or type(iat) is not int or type(exp) is not int or claim_kid != matched
                or not 0 <= iat <= exp <= _MAX_TS):
            raise TokenError("invalid_claims")
        expires = datetime.fromtimestamp(exp, UTC)
        if _now(now) >= expires + self._leeway:
            raise TokenError("expired")
        return TokenClaims(tid, datetime.fromtimestamp(iat, UTC), expires, matched)
