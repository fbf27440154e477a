"""The one frozen settings object, built only at the entry point and passed down.

Sources, highest priority first: command-line flags (passed as init values), the
environment (``TOUCHSTREAM_`` prefix, ``__`` between nested names, e.g.
``TOUCHSTREAM_KAFKA__BROKERS``), a TOML file (``--config`` or ``TOUCHSTREAM_CONFIG``),
then the defaults below. Nothing under ``flows/`` logic or ``state/`` reads the
environment itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = [
    "EngineSettings",
    "KafkaSettings",
    "LayeredSettings",
    "RecoverySettings",
    "RedisSettings",
    "Settings",
    "WebhookTarget",
    "load_settings",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class EngineSettings(BaseModel):
    """How the dataflow runs."""

    model_config = _FROZEN

    shards: int = Field(64, ge=1, le=4096, description="keyed state shards (customer hash)")
    allowed_lateness_s: float = Field(300.0, ge=0, description="event-time lateness accepted")
    tick_interval_s: float = Field(
        30.0, gt=0, description="replay: event-time step between watermark ticks"
    )
    idle_ttl_s: float = Field(
        8 * 24 * 3600.0, gt=0, description="evict a customer idle this long (event time)"
    )
    sweep_interval_s: float = Field(
        600.0,
        gt=0,
        description="how often each shard looks for idle customers to evict (event time); "
        "a sweep reads every customer of the shard",
    )
    session_idle_s: float = Field(
        1800.0, gt=0,
        description="a customer's terminal session ends after this long without a click "
        "(event time); while it is open, pushes go to the terminal, after it to the customer",
    )
    conversion_window_s: float = Field(
        1800.0, gt=0,
        description="an order of the pushed module this soon after a push (or a control-group "
        "hold-out) counts as its conversion",
    )
    stats_interval_s: float = Field(5.0, gt=0, description="live: how often stats are emitted")
    stats_max_names: int = Field(
        10_000, ge=1,
        description="stats: distinct hall, module and step names kept of each kind; counts "
        "of further names go to '(other)'",
    )
    max_clock_skew_s: float = Field(
        3600.0, ge=0, description="live: events further in the future are dead letters"
    )
    history_horizon_s: float = Field(
        8 * 24 * 3600.0,
        gt=0,
        description="live: older events are dead letters (late); fresher ones update history",
    )
    epoch_interval_s: float = Field(1.0, gt=0, description="Bytewax epoch length")
    workers: int = Field(1, ge=1, le=64, description="worker threads in this process")
    epoch_quiet_ms: float = Field(
        20.0, ge=0,
        description="with more than one worker in all: the input pauses this long before "
        "each epoch end, so that every worker's epochs end on its own fixed schedule "
        "instead of drifting apart (connectors.wrapped.EpochGrid); 0 = off",
    )
    max_message_bytes: int = Field(65_536, ge=256)
    max_attrs_bytes: int = Field(4_096, ge=0)
    gc_threshold: int = Field(
        50_000, ge=0,
        description="Python's generation-0 GC threshold while the flow runs (0 = Python's "
        "default of 700); long-lived state is frozen out of collections at start",
    )
    process_id: int | None = Field(
        None, ge=0, description="multi-process cluster: this process's index in addresses"
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="live: serve Prometheus /metrics on this port (0 = a free port, logged; "
        "in a multi-process cluster each process listens on metrics_port + process_id); "
        "None = no metrics server",
    )
    addresses: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="multi-process cluster: host:port of every process, the same list in the "
        "same order on each (a list, or one string separated by ';'); empty = one process",
    )

    @field_validator("addresses", mode="before")
    @classmethod
    def _split_addresses(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v.lstrip().startswith("["):  # a JSON list, as other list settings take
                return json.loads(v)
            return [a.strip() for a in v.replace(",", ";").split(";") if a.strip()]
        return v

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, v: list[str]) -> list[str]:
        for a in v:
            host, sep, port = a.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"address {a!r} is not host:port")
        if len(set(v)) != len(v):
            raise ValueError("addresses are not all different")
        return v

    @model_validator(mode="after")
    def _check_cluster(self) -> EngineSettings:
        if self.addresses and self.process_id is None:
            raise ValueError("addresses need process_id (this process's index in them)")
        if self.process_id is not None and self.process_id >= len(self.addresses):
            if not self.addresses:
                raise ValueError("process_id needs addresses (every process's host:port)")
            raise ValueError(f"process_id {self.process_id} is not an index of the "
                             f"{len(self.addresses)} addresses")
        return self


class KafkaSettings(BaseModel):
    """Kafka connection and topics (used when ``brokers`` is set)."""

    model_config = _FROZEN

    brokers: str | None = None
    clicks_topic: str = "touch.clicks"
    location_topic: str = "net.location"
    calls_topic: str = "net.calls"
    pushes_topic: str = "exp.pushes"
    alerts_topic: str = "ops.alerts"
    alerts_dlq_topic: str = "ops.alerts.dlq"
    dead_letters_topic: str = "exp.dead_letters"
    stats_topic: str = "exp.stats"
    rules_topic: str = Field("ops.rules", description="rule changes (one partition)")
    rules_status_topic: str = Field(
        "ops.rules.status", description="every rule-change decision (one partition)"
    )
    formats: dict[str, Literal["json", "msgpack"]] = Field(
        default_factory=dict, description="input topic -> wire format (default json)"
    )
    start: Literal["earliest", "latest"] = Field(
        "earliest", description="where input starts without a snapshot"
    )
    on_out_of_range: Literal["earliest", "latest", "fail"] = Field(
        "earliest",
        description="when the broker has less data than the input's position: re-read from "
        "the earliest offset, skip to the end, or stop the flow (each is logged and counted)",
    )
    eof_when_idle_s: float | None = Field(
        None, description="stop when every input partition is idle this long (tests, backfills)"
    )
    poll_rest_ms: float = Field(
        1.0, gt=0, le=1000,
        description="how long an input partition that found nothing queued rests before it "
        "is asked again: lower answers an idle input sooner, for more CPU while idle",
    )
    idle_rest_ms: float = Field(
        10.0, gt=0, le=1000,
        description="the rest instead (if larger than poll_rest_ms) once a partition has "
        "found no record for idle_after_s: an idle engine costs less CPU, the first record "
        "after a quiet spell waits up to this long more",
    )
    idle_after_s: float = Field(
        1.0, ge=0, description="how long a partition goes without a record before it takes "
        "the idle rest",
    )
    partitions: dict[str, int] = Field(default_factory=dict)
    default_partitions: int = 3
    replication_factor: int = 1
    config: dict[str, str | int | float | bool] = Field(
        default_factory=dict, repr=False,
        description="passed to every librdkafka client untouched (SASL, SSL, ...); never "
        "shown in a repr",
    )
    consumer_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict, repr=False,
        description="passed to the consumers only (the event input, the rule reader), over "
        "config: fetch.wait.max.ms, fetch.queue.backoff.ms, ...; never shown in a repr",
    )
    producer_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict, repr=False,
        description="passed to the producers only (the outputs, the alert dead letters, the "
        "rule publisher), over config: linger.ms, compression.type, ...; never shown in a repr",
    )

    def for_consumers(self) -> dict[str, str | int | float | bool]:
        """The librdkafka properties a consumer gets: ``config``, then ``consumer_config``.

        A producer-only property (``linger.ms``) in ``config`` reaches consumers too, and
        librdkafka logs a ``CONFWARN`` for it at every start: put it in
        ``producer_config`` instead.
        """
        return {**self.config, **self.consumer_config}

    def for_producers(self) -> dict[str, str | int | float | bool]:
        """The librdkafka properties a producer gets: ``config``, then ``producer_config``."""
        return {**self.config, **self.producer_config}


class RedisSettings(BaseModel):
    """Redis for profiles, guards and push channels (used when ``url`` is set)."""

    model_config = _FROZEN

    url: SecretStr | None = None
    cluster: bool = Field(
        False,
        description="use redis-py's cluster client (redis.cluster.RedisCluster): url names "
        "any node of a Redis Cluster, the others are discovered",
    )
    profile_cache_ttl_s: float = 5.0
    stream_maxlen: int = 1000
    stream_ttl_s: int = 7 * 24 * 3600
    rules_key: str = Field("touchstream:rules", description="a published rule set or change")
    rules_channel: str = Field(
        "touchstream:rules", description="pub/sub channel that says rules_key changed"
    )
    username: str | None = Field(None, description="ACL user (AUTH username password)")
    password: SecretStr | None = Field(
        None, description="AUTH password (env or TOML; prefer password_file, never a flag)"
    )
    password_file: Path | None = Field(None, description="file holding the AUTH password")
    tls_ca_file: Path | None = Field(None, description="CA bundle to verify a rediss:// server")
    tls_cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    tls_key_file: Path | None = Field(None, description="client key (mutual TLS)")
    max_held_effects: int = Field(
        10_000, ge=1,
        description="pushes held per worker while Redis is unreachable; when full the flow "
        "waits (back-pressure) instead of dropping",
    )
    retry_interval_s: float = Field(
        0.5, gt=0, description="how often held effects are retried while Redis is down"
    )

    def auth_password(self) -> str | None:
        """The AUTH password: ``password``, else the first line of ``password_file``."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").splitlines()[0].strip()
        return None


class RecoverySettings(BaseModel):
    """Bytewax recovery: snapshots of state and input offsets, for restarts.

    ``enabled`` None means "on in Kafka mode, off otherwise" (demo traffic and replays
    have nothing to resume). The worst-case replay window after a crash is about one
    ``snapshot_interval_s``: what arrived since the last snapshot is read again, and the
    idempotency keys keep it from being delivered twice.
    """

    model_config = _FROZEN

    enabled: bool | None = Field(None, description="None = on with Kafka input, off without")
    dir: Path = Field(Path("touchstream-recovery"), description="recovery database directory")
    partitions: int = Field(
        1, ge=1, le=1024, description="recovery partitions made on first start"
    )
    snapshot_interval_s: float = Field(
        10.0, gt=0, description="snapshot (and epoch) interval: the worst-case replay window"
    )
    backup_interval_s: float = Field(
        0.0, ge=0, description="keep superseded snapshots this long (for off-host backups)"
    )
    outbox_max_bytes: int = Field(
        64 * 1_048_576, ge=65_536,
        description="webhook outbox journal size at which it is compacted",
    )


class WebhookTarget(BaseModel):
    """One on-call webhook receiver."""

    model_config = _FROZEN

    url: str
    secret: SecretStr | None = None
    secret_file: Path | None = Field(None, description="file holding the whsec_... secret")
    types: list[str] = Field(default_factory=list, description="alert types; empty = all")
    body: Literal["cloudevents", "pagerduty", "slack"] = "cloudevents"

    def resolved(self) -> WebhookTarget:
        """This target with ``secret`` read from ``secret_file`` when only that is set."""
        if self.secret is not None or self.secret_file is None:
            return self
        text = self.secret_file.read_text(encoding="utf-8").splitlines()[0].strip()
        return self.model_copy(update={"secret": SecretStr(text), "secret_file": None})


_TOML_PATH: list[Path | None] = [None]


class LayeredSettings(BaseSettings):
    """A settings object built from flags, then the environment, then a TOML file.

    :meth:`load` is the one way to build one: flags are the keyword arguments (``None``
    means "not given"), the TOML file is optional. The engine's :class:`Settings` and
    the gateway's settings both use it.
    """

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init) win over the environment, which wins over the TOML file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _TOML_PATH[0] is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_TOML_PATH[0]))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Self:
        """Build from flags (``overrides``; None = not given), environment and TOML."""
        _TOML_PATH[0] = config_file
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _TOML_PATH[0] = None


class Settings(LayeredSettings):
    """Everything touchstream can be told; frozen once built."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        hide_input_in_errors=True,  # a validation error must not echo a secret
        env_prefix="TOUCHSTREAM_",
        env_nested_delimiter="__",
        toml_file=None,
    )

    mode: Literal["live", "replay"] = "live"
    rules_file: Path | None = None
    profiles_file: Path | None = None
    out_dir: Path | None = None
    engine: EngineSettings = Field(default_factory=EngineSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    webhooks: list[WebhookTarget] = Field(default_factory=list)
    webhook_url: str | None = Field(None, description="shorthand for one webhook target")
    webhook_secret: SecretStr | None = Field(
        None, description="whsec_... signing secret for webhook_url (env or TOML, never a flag)"
    )
    webhook_secret_file: Path | None = Field(
        None, description="file holding the whsec_... secret for webhook_url"
    )
    recovery: RecoverySettings = Field(default_factory=RecoverySettings)
    alerts_dlq_file: Path = Field(
        Path("alerts-dlq.jsonl"), description="undeliverable alerts when Kafka is not used"
    )
    demo_seed: int = 7
    demo_rate: float = Field(20.0, gt=0, description="demo: background events per second")

    def webhook_targets(self) -> list[WebhookTarget]:
        """``webhooks`` plus the ``webhook_url`` shorthand."""
        targets = [t.resolved() for t in self.webhooks]
        if self.webhook_url:
            targets.append(WebhookTarget(url=self.webhook_url, secret=self.webhook_secret,
                                         secret_file=self.webhook_secret_file).resolved())
        return targets

    def recovery_on(self) -> bool:
        """Whether this run snapshots and resumes (default: when Kafka is the input)."""
        if self.recovery.enabled is not None:
            return self.recovery.enabled
        return self.mode == "live" and self.kafka.brokers is not None



def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from flags (``overrides``), environment and TOML file."""
    return Settings.load(config_file, **overrides)
