"""The gateway's one frozen settings object, built only at the entry point.

Sources, highest priority first: command-line flags (init values), the environment
(``TOUCHSTREAM_GATEWAY_`` prefix, e.g. ``TOUCHSTREAM_GATEWAY_TOKEN_SECRET``), a TOML
file of top-level keys (``--config``), then the defaults below. Secrets
(``token_secret``, ``previous_token_secrets``, ``ops_token``, ``ops_password``,
``redis_password``, a password in ``redis_url``) are
:class:`~pydantic.SecretStr`: they never show in a ``repr`` or a log line. Secrets
come from the environment, the TOML file or a file (``redis_password_file``), never
from a flag: ``--redis`` refuses a URL that holds a password.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from flows.settings import LayeredSettings

__all__ = ["MIN_SECRET_CHARS", "GatewaySettings", "load_gateway_settings"]

MIN_SECRET_CHARS = 32
"""A token secret shorter than this is refused (HMAC-SHA256 wants >= 256 bits)."""
MIN_OPS_SECRET_CHARS = 12
"""An ops console token or password shorter than this is refused."""

_KID = re.compile(r"^[A-Za-z0-9._-]{1,16}$")


class GatewaySettings(LayeredSettings):
    """Everything the push gateway can be told; frozen once built."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix="TOUCHSTREAM_GATEWAY_",
        env_nested_delimiter="__",
        toml_file=None,
        hide_input_in_errors=True,  # a validation error must not print a secret
    )

    redis_url: SecretStr | None = Field(
        None, description="redis://HOST:PORT/DB of the push streams (required to serve); "
        "rediss:// for TLS"
    )
    redis_cluster: bool = Field(
        False, description="redis_url names one node of a Redis Cluster (redis-py's cluster "
        "client discovers the others); as the engine's redis.cluster"
    )
    redis_username: str | None = Field(None, description="Redis ACL user (AUTH user password)")
    redis_password: SecretStr | None = Field(
        None, description="Redis AUTH password (env or TOML; prefer redis_password_file)"
    )
    redis_password_file: Path | None = Field(
        None, description="file whose first line is the Redis AUTH password"
    )
    redis_tls_ca_file: Path | None = Field(
        None, description="CA bundle that verifies a rediss:// server (default: the system's)"
    )
    redis_tls_cert_file: Path | None = Field(
        None, description="client certificate for Redis mutual TLS"
    )
    redis_tls_key_file: Path | None = Field(None, description="client key for Redis mutual TLS")
    stream_prefix: str = Field("push:", description="push stream / pub-sub name prefix")
    redis_pool_size: int = Field(
        64, ge=2, le=10_000,
        description="Redis connections shared by all terminal connections (the pub/sub "
        "listener holds one of them); requests wait for a free one",
    )
    redis_timeout_s: float = Field(5.0, gt=0, description="Redis socket and pool timeout")
    token_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key that signs terminal tokens (env or TOML only)"
    )
    token_kid: str = Field("k1", description="key id written into new tokens")
    previous_token_secrets: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="kid -> secret still accepted when verifying (key rotation)",
    )
    token_ttl_s: int = Field(
        30 * 24 * 3600, ge=60, description="lifetime of an issued token (default 30 days)"
    )
    token_leeway_s: int = Field(
        30, ge=0, le=600, description="clock skew tolerated when checking expiry"
    )
    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8080, ge=0, le=65535, description="listen port (0 = any free port)")
    heartbeat_s: float = Field(
        15.0, gt=0, description="an SSE comment / WebSocket heartbeat after this much silence"
    )
    poll_interval_s: float = Field(
        30.0, gt=0,
        description="each connection re-reads its stream at least this often even without "
        "a pub/sub wake-up (covers a lost notification or a writer that does not PUBLISH)",
    )
    max_queued: int = Field(
        256, ge=1,
        description="pushes that may wait for one connection while it is still sending "
        "earlier ones; one more and the connection is closed as a slow consumer",
    )
    send_timeout_s: float = Field(
        30.0, gt=0, description="a write to one client blocked this long closes it"
    )
    read_batch: int = Field(100, ge=1, le=10_000, description="XREAD COUNT per read")
    max_connections: int = Field(
        10_000, ge=1, description="open push streams per process; more get 503"
    )
    tcp_user_timeout_s: float = Field(
        60.0, ge=0,
        description="Linux TCP_USER_TIMEOUT on accepted sockets: a peer that acknowledges "
        "nothing this long is dropped by the kernel (0 = the system default)",
    )
    backlog: int = Field(4096, ge=16, description="listen backlog")
    reuse_port: bool = Field(
        False, description="SO_REUSEPORT: several gateway processes share one port"
    )
    customer_id: Literal["mask", "drop"] = Field(
        "mask",
        description="what a terminal gets of the push's customer_id: its last four "
        "characters ('…1234') or nothing",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="origins whose pages may open push streams (for a kiosk page served "
        "elsewhere; the gateway's own /terminal page needs none)",
    )
    ops_token: SecretStr | None = Field(
        None, description="bearer token (or ?token=) of the /ops console; env or TOML only"
    )
    ops_user: str | None = Field(None, description="basic-auth user of the /ops console")
    ops_password: SecretStr | None = Field(
        None, description="basic-auth password of the /ops console; env or TOML only"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def redis_auth_password(self) -> str | None:
        """The Redis password: ``redis_password``, else the first line of its file.

        :raises ValueError: the file is empty or cannot be read (never shows its content).
        """
        if self.redis_password is not None:
            return self.redis_password.get_secret_value()
        if self.redis_password_file is None:
            return None
        try:
            lines = self.redis_password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"redis_password_file {self.redis_password_file} cannot be "
                             f"read: {exc.strerror}") from None
        password = lines[0].strip() if lines else ""
        if not password:
            raise ValueError(f"redis_password_file {self.redis_password_file} is empty")
        return password

    @field_validator("token_secret")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < MIN_SECRET_CHARS:
            raise ValueError(f"token_secret must have at least {MIN_SECRET_CHARS} characters")
        return v

    @field_validator("previous_token_secrets")
    @classmethod
    def _previous_ok(cls, v: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for kid, secret in v.items():
            if not _KID.match(kid):
                raise ValueError(f"key id {kid!r} is not 1-16 of [A-Za-z0-9._-]")
            if len(secret.get_secret_value()) < MIN_SECRET_CHARS:
                raise ValueError(f"secret of key id {kid!r} is shorter than "
                                 f"{MIN_SECRET_CHARS} characters")
        return v

    @field_validator("ops_token", "ops_password")
    @classmethod
    def _ops_secret_ok(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < MIN_OPS_SECRET_CHARS:
            raise ValueError(f"must have at least {MIN_OPS_SECRET_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _ops_basic_pair(self) -> GatewaySettings:
        if (self.ops_user is None) != (self.ops_password is None):
            raise ValueError("ops_user and ops_password go together")
        return self

    @field_validator("token_kid")
    @classmethod
    def _kid_ok(cls, v: str) -> str:
        if not _KID.match(v):
            raise ValueError("token_kid must be 1-16 of [A-Za-z0-9._-]")
        return v

    @field_validator("stream_prefix")
    @classmethod
    def _prefix_ok(cls, v: str) -> str:
        if not v or any(c in v for c in "*?[]\\"):
            raise ValueError("stream_prefix must be non-empty and free of glob characters")
        return v


def load_gateway_settings(config_file: Path | None = None, **overrides: Any) -> GatewaySettings:
    """Build the settings from flags (``overrides``; None = not given), env and TOML."""
    return GatewaySettings.load(config_file, **overrides)
