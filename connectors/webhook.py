"""Signed webhook delivery of operations alerts (Standard Webhooks, with retries).

:class:`WebhookOutput` is a Bytewax :class:`~bytewax.outputs.DynamicSink` of
:class:`~flows.model.Alert`. Each worker builds one private partition that owns a
bounded queue and one background thread; ``write_batch`` only enqueues, so a slow or
dead receiver never blocks the dataflow. Every (target, alert) pair ends in exactly one
of two places: delivered (a 2xx answer) or the dead-letter path
(:class:`DeadLetterHandler`, e.g. :class:`JsonlDeadLetterFile`) with a reason:

``queue_full``
    the partition's queue was full when ``write_batch`` was called (spilled at once);
``rejected``
    a non-retryable answer (a 4xx other than 408/429, or a 3xx);
``retries_exhausted``
    ``RetryPolicy.max_attempts`` attempts all failed with retryable errors;
``retry_budget_exhausted``
    the next backoff would end after ``RetryPolicy.budget_s`` since the first attempt;
``shutdown``
    still queued (or waiting to retry) when ``close()`` ran out of drain time;
``encode_error`` / ``error``
    the body could not be encoded, or an unexpected exception while sending.

Requests are signed per the Standard Webhooks spec: ``webhook-id`` is the alert's
CloudEvents id (identical on every retry, so receivers can drop repeats),
``webhook-timestamp`` the unix time of the attempt, and ``webhook-signature``
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed with the
base64-decoded part of the ``whsec_`` secret. Secrets, signatures and URL paths
(Slack webhook URLs are credentials) are never logged.

**Durable outbox.** With ``outbox_dir``, each worker partition journals its (target,
alert) pairs to ``outbox_dir/worker-<index>.log`` and fsyncs the journal once per
``write_batch`` before returning, so an alert handed to the sink survives a SIGKILL
(Bytewax commits the epoch once ``write_batch`` returned and will not replay it). The
sender appends a *done* record after each outcome (delivered or dead-lettered). On
:meth:`~WebhookOutput.build` after a restart, entries without a done record are sent
again (same ``webhook-id``), and a replayed alert (Bytewax replays the epochs after
the last snapshot, with the same CloudEvents id) whose (target, id) is pending or done
is not sent a second time. There is no ``queue_full`` spill then: the journal holds
whatever the sender has not reached; ``queue_size`` only bounds how many pending
alerts are kept decoded in memory (the rest are re-read from the journal by offset),
and ``close()`` leaves undelivered alerts in the journal for the next start instead of
dead-lettering them as ``shutdown``. One more dead-letter reason exists with an
outbox: ``target_removed``, a pending entry whose target is no longer configured.
See :class:`WebhookOutput` for the bounds.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import queue
import random
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from pydantic import SecretStr

from flows import metrics
from flows.codec import DecodeError, EncodeError, json_dumps, json_loads
from flows.model import Alert, ms_to_rfc3339
from flows.settings import WebhookTarget

__all__ = [
    "DeadLetterHandler",
    "JsonlDeadLetterFile",
    "RetryPolicy",
    "WebhookCounts",
    "WebhookOutput",
    "sign_webhook",
]

logger = logging.getLogger(__name__)
# httpx logs "HTTP Request: POST <full URL>" at INFO; a Slack-style webhook URL is itself
# the credential, so its logger never goes below WARNING.
_httpx_log = logging.getLogger("httpx")
_httpx_log.setLevel(max(logging.WARNING, _httpx_log.level))

_SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - a prefix, not a secret
_PD_SEVERITIES: Final = frozenset({"critical", "error", "warning", "info"})
_USER_AGENT: Final = "touchstream-webhook/0.1"
_POLL_S: Final = 0.05
_COUNT_NAMES: Final = ("sent", "retried", "failed", "spilled", "duplicates")


# --- public configuration -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try one (target, alert) delivery.

    Delay before retry ``n`` (1-based) is uniform in ``[0, min(max_backoff_s,
    base_backoff_s * 2 ** (n - 1))]`` (full jitter), unless the receiver sent
    ``Retry-After`` (on 429/503), which is used as is, capped at ``max_retry_after_s``.
    The delivery is dead-lettered once ``max_attempts`` attempts failed or the next
    delay would end more than ``budget_s`` after the first attempt started.
    """

    max_attempts: int = 6
    base_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    budget_s: float = 120.0
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        """Reject nonsensical policies early."""
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_backoff_s < 0 or self.max_backoff_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("backoff values must not be negative")
        if self.budget_s <= 0:
            raise ValueError("budget_s must be positive")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """The full-jitter delay before retry number ``retry`` (1-based)."""
        cap = min(self.max_backoff_s, self.base_backoff_s * (2 ** max(retry - 1, 0)))
        return rng.uniform(0.0, cap)


class DeadLetterHandler(Protocol):
    """Where undeliverable alerts go (a JSONL file, the ``ops.alerts.dlq`` topic, ...).

    Called from the partition's sender thread (or from ``write_batch`` for
    ``queue_full``), possibly from several workers at once: implementations must be
    thread-safe. ``last_status`` is the last HTTP status seen (``None`` if there was no
    answer), ``attempts`` how many requests were made, ``error`` the last transport
    error or a short description.
    """

    def __call__(
        self,
        alert: Alert,
        target_url: str,
        reason: str,
        last_status: int | None,
        *,
        attempts: int = 0,
        error: str | None = None,
    ) -> None:
        """Record one undeliverable (target, alert) pair."""
        ...


def dead_letter_record(
    alert: Alert,
    target_url: str,
    reason: str,
    last_status: int | None,
    *,
    attempts: int = 0,
    error: str | None = None,
) -> bytes:
    """The JSON record of one undeliverable alert (file and Kafka dead-letter paths)."""
    record: dict[str, Any] = {
        "cloudevent": alert.to_cloudevent(),
        "target": target_url,
        "reason": reason,
        "last_status": last_status,
        "attempts": attempts,
        "error": error,
        "dead_lettered_at": ms_to_rfc3339(int(time.time() * 1000)),
    }
    try:
        return json_dumps(record)
    except EncodeError:
        record["cloudevent"] = {**alert.to_cloudevent(), "data": repr(alert.data)}
        return json_dumps(record)


class JsonlDeadLetterFile:
    """A :class:`DeadLetterHandler` appending one JSON object per line to ``path``.

    Each line holds ``cloudevent``, ``target``, ``reason``, ``last_status``,
    ``attempts``, ``error`` and ``dead_lettered_at`` (RFC 3339). Note that ``target``
    is the full URL, which for Slack-style receivers is itself a credential.
    """

    def __init__(self, path: Path | str) -> None:
        """Append to ``path`` (created with its parent directories on first write)."""
        self.path = Path(path)
        self._lock = threading.Lock()

    def __call__(
        self,
        alert: Alert,
        target_url: str,
        reason: str,
        last_status: int | None,
        *,
        attempts: int = 0,
        error: str | None = None,
    ) -> None:
        """Append one dead letter."""
        line = dead_letter_record(alert, target_url, reason, last_status,
                                  attempts=attempts, error=error)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as f:
                f.write(line + b"\n")

    def read(self) -> list[dict[str, Any]]:
        """All dead letters written so far (for tests and tooling)."""
        if not self.path.exists():
            return []
        with self._lock:
            lines = self.path.read_bytes().splitlines()
        return [json_loads(line) for line in lines if line.strip()]


@dataclass(frozen=True, slots=True)
class WebhookCounts:
    """Delivery counters for one target (or the total).

    ``retried`` counts retry attempts (not alerts); ``failed`` alerts dead-lettered
    after trying (or at shutdown); ``spilled`` alerts dead-lettered because the queue
    was full. Every alert routed to a target ends in ``sent + failed + spilled``, or,
    with an outbox, stays pending in the journal for the next start. ``duplicates``
    counts alerts handed to the sink again (a Bytewax replay) whose (target, id) the
    outbox already held, pending or done: they are not sent again.
    """

    sent: int = 0
    retried: int = 0
    failed: int = 0
    spilled: int = 0
    duplicates: int = 0


def sign_webhook(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value (``v1,<base64>``).

    ``secret`` is ``whsec_<base64 key>`` (the prefix is optional).
    """
    key = _decode_secret(secret)
    return _sign(key, msg_id, timestamp, body)


# --- the sink ---------------------------------------------------------------------------


ClientSource = httpx.Client | Callable[[], httpx.Client] | None


class WebhookOutput(DynamicSink[Alert]):
    """Deliver alerts to on-call webhooks, signed, retried, dead-lettered when all fails.

    ``targets`` are the configured receivers; an alert goes to each target whose
    ``types`` is empty or contains ``alert.type``. ``body`` selects CloudEvents
    structured JSON, a PagerDuty Events v2 trigger (routing key = a ``routing_key``
    attribute of the target if it has one, else its ``secret``) or a Slack-compatible
    ``{"text": ...}``. A ``secret`` signs the request, except on PagerDuty targets
    where it is the routing key.

    ``client`` is an :class:`httpx.Client` shared by all partitions (not closed by the
    sink) or a factory called once per partition in :meth:`build` (the client it makes
    is closed by the partition); by default a plain ``httpx.Client()`` per partition.
    ``sleep`` (default: an interruptible wait), ``rng`` and ``clock`` (monotonic
    seconds, for the retry budget) are injectable for tests.

    ``outbox_dir`` turns on the durable outbox (see the module docstring): one journal
    per worker, ``worker-<index>.log``, guarded by an exclusive ``flock`` on
    ``worker-<index>.lock`` (two live processes cannot share one journal). The journal
    is compacted (pending entries plus the remembered done ids, written to a temporary
    file, fsynced and renamed over the journal) by the sender thread when it is larger
    than ``outbox_max_bytes`` and more than half of it is no longer needed (so, when
    pending entries alone exceed ``outbox_max_bytes``, the journal grows with them
    rather than being rewritten again and again). Done ids are remembered for dedup up to
    ``outbox_done_keep`` (most recent first) and ``outbox_done_ttl_s``: a replay of an
    alert older than both is sent again (with the same ``webhook-id``). In memory a
    partition keeps one ~100-byte record per pending entry and an 8-byte hash per
    remembered done id (about 10 MB at the 100,000 default), plus at most
    ``queue_size`` decoded alerts. Done records are written without fsync (they
    survive a process kill, not a power cut: after one, an alert may be sent again
    with the same ``webhook-id``). When the worker count shrinks on a restart, journals
    of workers that no longer exist are adopted by worker ``index % worker_count``.
    """

    def __init__(
        self,
        targets: Sequence[WebhookTarget],
        *,
        on_dead_letter: DeadLetterHandler,
        retry: RetryPolicy | None = None,
        timeout_s: float = 10.0,
        queue_size: int = 1000,
        drain_timeout_s: float = 30.0,
        client: ClientSource = None,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        outbox_dir: Path | None = None,
        outbox_max_bytes: int = 64 * 1_048_576,
        outbox_done_keep: int = 100_000,
        outbox_done_ttl_s: float = 86_400.0,
    ) -> None:
        """Validate the targets; no client, thread or file is made until :meth:`build`."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must not be negative")
        if outbox_max_bytes < 1:
            raise ValueError("outbox_max_bytes must be positive")
        if outbox_done_keep < 0:
            raise ValueError("outbox_done_keep must not be negative")
        if outbox_done_ttl_s <= 0:
            raise ValueError("outbox_done_ttl_s must be positive")
        self.targets: tuple[_Target, ...] = tuple(
            _Target.from_setting(i, t) for i, t in enumerate(targets)
        )
        self.on_dead_letter = on_dead_letter
        self.retry = retry if retry is not None else RetryPolicy()
        self.timeout_s = timeout_s
        self.queue_size = queue_size
        self.drain_timeout_s = drain_timeout_s
        self._client = client
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self.outbox_dir = Path(outbox_dir) if outbox_dir is not None else None
        self.outbox_max_bytes = outbox_max_bytes
        self.outbox_done_keep = outbox_done_keep
        self.outbox_done_ttl_s = outbox_done_ttl_s
        self._counts_lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}
        self._outboxes: list[_Outbox] = []

    # counters -----------------------------------------------------------------------

    def _count(self, url: str, name: str, n: int = 1) -> None:
        with self._counts_lock:
            c = self._counts.setdefault(url, dict.fromkeys(_COUNT_NAMES, 0))
            c[name] += n

    def stats(self) -> dict[str, WebhookCounts]:
        """Counters per target URL (summed over all partitions of this sink)."""
        with self._counts_lock:
            return {url: WebhookCounts(**c) for url, c in self._counts.items()}

    def total(self) -> WebhookCounts:
        """Counters summed over all targets."""
        out = dict.fromkeys(_COUNT_NAMES, 0)
        with self._counts_lock:
            for c in self._counts.values():
                for k, v in c.items():
                    out[k] += v
        return WebhookCounts(**out)

    def outbox_pending(self) -> int:
        """Entries journaled but not yet done, over this process's open partitions."""
        with self._counts_lock:
            outboxes = list(self._outboxes)
        return sum(o.pending_count() for o in outboxes)

    # bytewax ------------------------------------------------------------------------

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> StatelessSinkPartition[Alert]:
        """Make this worker's client, queue (or outbox journal) and sender thread.

        With an outbox, this reads the worker's journal (a restart): entries not done
        are queued again, and done or pending ids are remembered for dedup.
        """
        outbox: _Outbox | None = None
        if self.outbox_dir is not None:
            outbox = _Outbox(self.outbox_dir, worker_index, worker_count, self.targets,
                             max_bytes=self.outbox_max_bytes, window=self.queue_size,
                             done_keep=self.outbox_done_keep,
                             done_ttl_s=self.outbox_done_ttl_s)
        try:
            if isinstance(self._client, httpx.Client):
                client, owned = self._client, False
            elif self._client is None:
                client, owned = httpx.Client(), True
            else:
                client, owned = self._client(), True
        except BaseException:
            if outbox is not None:
                outbox.close()
            raise
        name = f"{step_id}-{worker_index}"
        if outbox is None:
            return _WebhookPartition(self, client, owned, name)
        with self._counts_lock:
            self._outboxes.append(outbox)
        return _OutboxPartition(self, client, owned, name, outbox)

    def _forget_outbox(self, outbox: _Outbox) -> None:
        with self._counts_lock:
            if outbox in self._outboxes:
                self._outboxes.remove(outbox)


# --- private ----------------------------------------------------------------------------


def _decode_secret(secret: str) -> bytes:
    raw = secret.removeprefix(_SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("webhook secret is not valid base64 after 'whsec_'") from exc
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def _sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    to_sign = msg_id.encode("utf-8") + b"." + str(timestamp).encode("ascii") + b"." + body
    digest = hmac.new(key, to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def _target_key(url: str) -> str:
    """16 hex digits naming a target in the journal (not the URL: it may be a secret)."""
    return hashlib.blake2b(url.encode("utf-8"), digest_size=8).hexdigest()


def _mask_url(url: str) -> str:
    """``scheme://host[:port]/…``: never the path, query or user info (may be secrets)."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid url>"
    port = f":{u.port}" if u.port is not None else ""
    rest = "/…" if (u.path not in ("", "/") or u.query) else ""
    return f"{u.scheme}://{u.host}{port}{rest}"


@dataclass(frozen=True, slots=True)
class _Target:
    index: int
    url: str
    key: str  # a hash of the url: names the target in the outbox journal
    masked: str
    types: frozenset[str]
    body: str
    signing_key: bytes | None
    routing_key: str | None

    @classmethod
    def from_setting(cls, index: int, t: WebhookTarget) -> _Target:
        url = httpx.URL(t.url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"webhook target {index}: url must be http(s) with a host")
        secret = t.secret.get_secret_value() if t.secret is not None else None
        routing_attr: object = getattr(t, "routing_key", None)
        if isinstance(routing_attr, SecretStr):
            routing_attr = routing_attr.get_secret_value()
        routing_key: str | None = None
        signing_key: bytes | None = None
        if t.body == "pagerduty":
            if isinstance(routing_attr, str) and routing_attr:
                routing_key = routing_attr
                signing_key = _secret_key(index, secret) if secret else None
            elif secret and not secret.startswith(_SECRET_PREFIX):
                routing_key = secret
            else:
                raise ValueError(
                    f"webhook target {index}: a pagerduty target needs a routing key "
                    "(its secret or a routing_key field)"
                )
        elif secret:
            signing_key = _secret_key(index, secret)
        return cls(
            index=index,
            url=t.url,
            key=_target_key(t.url),
            masked=_mask_url(t.url),
            types=frozenset(t.types),
            body=t.body,
            signing_key=signing_key,
            routing_key=routing_key,
        )

    def wants(self, alert: Alert) -> bool:
        return not self.types or alert.type in self.types

    def render(self, alert: Alert) -> tuple[bytes, str]:
        """The body bytes and content type for this target."""
        if self.body == "pagerduty":
            return json_dumps(_pagerduty_body(alert, self.routing_key or "")), "application/json"
        if self.body == "slack":
            return json_dumps(_slack_body(alert)), "application/json"
        return json_dumps(alert.to_cloudevent()), "application/cloudevents+json"


def _secret_key(index: int, secret: str) -> bytes:
    try:
        return _decode_secret(secret)
    except ValueError as exc:
        raise ValueError(f"webhook target {index}: {exc}") from None


def _summary(alert: Alert) -> str:
    s = alert.data.get("summary")
    if isinstance(s, str) and s:
        return s
    return f"{alert.type} on {alert.subject}"


def _pagerduty_body(alert: Alert, routing_key: str) -> dict[str, Any]:
    sev = alert.data.get("severity")
    severity = sev if isinstance(sev, str) and sev in _PD_SEVERITIES else "warning"
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": alert.id,
        "payload": {
            "summary": _summary(alert)[:1024],
            "source": alert.source,
            "severity": severity,
            "timestamp": ms_to_rfc3339(alert.time_ms),
            "component": alert.subject,
            "class": alert.type,
            "custom_details": alert.data,
        },
    }


def _slack_body(alert: Alert) -> dict[str, Any]:
    details = json_dumps(alert.data).decode("utf-8")
    if len(details) > 2000:
        details = details[:2000] + "…"
    text = (
        f"*{_summary(alert)}*\n"
        f"type `{alert.type}` · subject `{alert.subject}` · {ms_to_rfc3339(alert.time_ms)}"
        f" · id `{alert.id}`\n```{details}```"
    )
    return {"text": text}


def _parse_retry_after(value: str | None, cap: float) -> float | None:
    """Seconds to wait per a ``Retry-After`` header (delta-seconds or HTTP date), capped."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return min(float(value), cap)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delay = (when - datetime.now(tz=UTC)).total_seconds()
    return min(max(delay, 0.0), cap)


@dataclass(slots=True)
class _Outcome:
    ok: bool
    retryable: bool
    status: int | None
    error: str | None
    retry_after: float | None = None


class _WebhookPartition(StatelessSinkPartition[Alert]):
    """One worker's queue and sender thread."""

    def __init__(
        self, sink: WebhookOutput, client: httpx.Client, owns_client: bool, name: str
    ) -> None:
        self._sink = sink
        self._client = client
        self._owns_client = owns_client
        self._queue: queue.Queue[tuple[_Target, Alert]] = queue.Queue(sink.queue_size)
        self._stop = threading.Event()  # no more work will be queued
        self._abort = threading.Event()  # give up on retries: dead-letter as "shutdown"
        self._sleep = sink._sleep if sink._sleep is not None else self._interruptible_sleep
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"webhook-{name}", daemon=True
        )
        self._thread.start()

    # dataflow side --------------------------------------------------------------------

    def write_batch(self, items: list[Alert]) -> None:
        """Queue each (target, alert) pair; spill to the dead-letter path when full."""
        for alert in items:
            for target in self._sink.targets:
                if not target.wants(alert):
                    continue
                try:
                    self._queue.put_nowait((target, alert))
                except queue.Full:
                    logger.warning(
                        "webhook queue full: alert %s for %s dead-lettered",
                        alert.id,
                        target.masked,
                    )
                    self._sink._count(target.url, "spilled")
                    self._dead_letter(
                        alert, target, "queue_full", None, attempts=0, error="queue full"
                    )

    def close(self) -> None:
        """Drain the queue (up to ``drain_timeout_s``), dead-letter the rest, stop."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self._sink.drain_timeout_s
        q = self._queue
        with q.all_tasks_done:
            while q.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                q.all_tasks_done.wait(remaining)
            drained = q.unfinished_tasks == 0
        if not drained:
            logger.warning("webhook drain timed out; dead-lettering what is left")
            self._abort.set()
        self._stop.set()
        self._thread.join(self._sink.timeout_s + 1.0)
        if self._thread.is_alive():
            logger.error("webhook sender thread did not stop in time")
        while True:
            try:
                target, alert = q.get_nowait()
            except queue.Empty:
                break
            self._sink._count(target.url, "failed")
            self._dead_letter(
                alert, target, "shutdown", None, attempts=0, error="not sent before close"
            )
            q.task_done()
        if self._owns_client:
            self._client.close()

    # sender thread ---------------------------------------------------------------------

    def _interruptible_sleep(self, seconds: float) -> None:
        self._abort.wait(seconds)

    def _run(self) -> None:
        q = self._queue
        while not self._abort.is_set():
            try:
                target, alert = q.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            try:
                self._deliver(target, alert)
            except Exception as exc:  # the sender thread must never die
                logger.exception("webhook delivery of %s crashed", alert.id)
                self._sink._count(target.url, "failed")
                self._dead_letter(
                    alert, target, "error", None, attempts=0, error=type(exc).__name__
                )
            finally:
                q.task_done()

    def _deliver(
        self, target: _Target, alert: Alert, *, keep_on_abort: bool = False
    ) -> str | None:
        """Send with retries: ``"sent"``, or the reason it was dead-lettered.

        With ``keep_on_abort`` (the outbox), a delivery interrupted by ``close()``
        is neither sent nor dead-lettered: None (it stays pending in the journal).
        """
        sink = self._sink
        policy = sink.retry
        try:
            body, content_type = target.render(alert)
        except EncodeError as exc:
            logger.error("webhook alert %s cannot be encoded: %s", alert.id, exc)
            sink._count(target.url, "failed")
            self._dead_letter(alert, target, "encode_error", None, attempts=0, error=str(exc))
            return "encode_error"
        deadline = sink._clock() + policy.budget_s
        attempts = 0
        last: _Outcome | None = None
        while True:
            if self._abort.is_set():
                if keep_on_abort:
                    return None
                reason = "shutdown"
                break
            attempts += 1
            last = self._attempt(target, alert.id, body, content_type)
            if last.ok:
                sink._count(target.url, "sent")
                metrics.WEBHOOK_SENT.labels(str(target.index)).inc()
                return "sent"
            if not last.retryable:
                reason = "rejected"
                break
            if attempts >= policy.max_attempts:
                reason = "retries_exhausted"
                break
            delay = last.retry_after
            if delay is None:
                delay = policy.backoff(attempts, sink._rng)
            if sink._clock() + delay > deadline:
                reason = "retry_budget_exhausted"
                break
            logger.warning(
                "webhook %s to %s failed (%s); retry %d in %.2fs",
                alert.id,
                target.masked,
                last.status if last.status is not None else last.error,
                attempts,
                delay,
            )
            sink._count(target.url, "retried")
            metrics.WEBHOOK_RETRIES.labels(str(target.index)).inc()
            self._sleep(delay)
        status = last.status if last is not None else None
        error = last.error if last is not None else None
        logger.error(
            "webhook %s to %s dead-lettered: %s after %d attempt(s), last %s",
            alert.id,
            target.masked,
            reason,
            attempts,
            status if status is not None else error,
        )
        sink._count(target.url, "failed")
        self._dead_letter(alert, target, reason, status, attempts=attempts, error=error)
        return reason

    def _attempt(
        self, target: _Target, msg_id: str, body: bytes, content_type: str
    ) -> _Outcome:
        headers = {
            "content-type": content_type,
            "user-agent": _USER_AGENT,
            "webhook-id": msg_id,
        }
        if target.signing_key is not None:
            ts = int(time.time())
            headers["webhook-timestamp"] = str(ts)
            headers["webhook-signature"] = _sign(target.signing_key, msg_id, ts, body)
        try:
            resp = self._client.post(
                target.url, content=body, headers=headers, timeout=self._sink.timeout_s
            )
        except httpx.UnsupportedProtocol as exc:
            return _Outcome(False, False, None, f"{type(exc).__name__}")
        except httpx.TransportError as exc:  # timeouts, refused, reset, protocol errors
            return _Outcome(False, True, None, f"{type(exc).__name__}")
        status = resp.status_code
        if 200 <= status < 300:
            return _Outcome(True, False, status, None)
        if status in (408, 429) or status >= 500:
            retry_after = None
            if status in (429, 503):
                retry_after = _parse_retry_after(
                    resp.headers.get("retry-after"), self._sink.retry.max_retry_after_s
                )
            return _Outcome(False, True, status, f"HTTP {status}", retry_after)
        return _Outcome(False, False, status, f"HTTP {status}")

    def _dead_letter(
        self,
        alert: Alert,
        target: _Target,
        reason: str,
        status: int | None,
        *,
        attempts: int,
        error: str | None,
    ) -> None:
        metrics.WEBHOOK_FAILURES.labels(str(target.index), reason).inc()
        try:
            self._sink.on_dead_letter(
                alert, target.url, reason, status, attempts=attempts, error=error
            )
        except Exception:
            logger.exception(
                "webhook dead-letter handler failed for %s to %s (%s): alert LOST",
                alert.id,
                target.masked,
                reason,
            )


# --- the durable outbox -------------------------------------------------------------------


def _pair_key(target_key: str, alert_id: str) -> int:
    """The 64-bit dedup key of one (target, alert id) pair."""
    h = hashlib.blake2b(digest_size=8)
    h.update(target_key.encode("utf-8"))
    h.update(b"\x1f")
    h.update(alert_id.encode("utf-8"))
    return int.from_bytes(h.digest(), "big")


def _frame(doc: dict[str, Any]) -> bytes:
    """One journal line: ``<crc32 of the JSON, 8 hex digits> <JSON>\\n``."""
    payload = json_dumps(doc)
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


def _unframe(line: bytes) -> dict[str, Any] | None:
    """The record of one journal line (without its newline), or None if damaged."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    payload = line[9:]
    if zlib.crc32(payload) != crc:
        return None
    try:
        doc = json_loads(payload)
    except DecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _alert_doc(alert: Alert) -> dict[str, Any]:
    return {"id": alert.id, "type": alert.type, "source": alert.source,
            "time_ms": alert.time_ms, "subject": alert.subject, "data": alert.data}


def _alert_from(doc: object) -> Alert | None:
    if not isinstance(doc, dict):
        return None
    fields = (doc.get("id"), doc.get("type"), doc.get("source"), doc.get("subject"))
    time_ms, data = doc.get("time_ms"), doc.get("data")
    if not all(isinstance(f, str) for f in fields) or type(time_ms) is not int \
            or not isinstance(data, dict):
        return None
    return Alert(id=doc["id"], type=doc["type"], source=doc["source"], time_ms=time_ms,
                 subject=doc["subject"], data=data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_LOCK_WAIT_S = 5.0  # how long build() waits for another holder of a journal to let go


def _lock_file(path: Path) -> int:
    """An exclusive ``flock`` on ``path`` (released when the process dies)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RuntimeError(
                    f"webhook outbox {path} is locked by another live process or partition"
                ) from None
            time.sleep(0.05)


def _unlock_file(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


def _journal_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, line with its newline, if it has one) for each line of ``path``."""
    offset = 0
    with path.open("rb") as f:
        for line in f:
            yield offset, line
            offset += len(line)


@dataclass(slots=True)
class _Pending:
    """One journaled (target, alert) pair not yet done."""

    target_key: str
    target: _Target | None  # None: no configured target has this key any more
    alert_id: str
    offset: int  # of its journal line
    length: int
    alert: Alert | None  # decoded, when inside the in-memory window


class _Outbox:
    """One worker's append-only journal of (target, alert) entries and done records.

    Records (one per line, see :func:`_frame`):
    ``{"k": "e", "t": target key, "a": alert}`` an entry;
    ``{"k": "d", "h": pair hash (16 hex), "id": alert id, "r": outcome, "w": wall ms}``
    its outcome (compacted done records keep only ``h`` and ``w``).
    Thread-safe: ``write_batch`` (the dataflow thread) and the sender share it.
    """

    def __init__(self, directory: Path, worker_index: int, worker_count: int,
                 targets: Sequence[_Target], *, max_bytes: int, window: int,
                 done_keep: int, done_ttl_s: float) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.path = directory / f"worker-{worker_index}.log"
        self.max_bytes = max_bytes
        self.window = window
        self.done_keep = done_keep
        self.done_ttl_ms = int(done_ttl_s * 1000)
        self.targets = {t.key: t for t in targets}
        self._gauge = metrics.WEBHOOK_OUTBOX_PENDING.labels(str(worker_index))
        self.pending: dict[int, _Pending] = {}  # journal order: the sender's FIFO
        self.done: OrderedDict[int, int] = OrderedDict()  # pair hash -> wall ms, oldest first
        self.torn = 0  # torn last lines dropped (a crash mid-write)
        self.corrupt = 0  # damaged lines skipped
        self.duplicates = 0
        self.compactions = 0
        self._cached = 0
        self._pending_bytes = 0  # journal bytes of the pending entries
        self._compact_floor = 0  # raised after a failed compaction (no retry storm)
        self._lock = threading.Lock()
        self._closed = False
        self._lock_fd = _lock_file(directory / f"worker-{worker_index}.lock")
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            self.size = self._load()
            self._adopt(worker_index, worker_count)
            self.maybe_compact()
        except BaseException:
            _unlock_file(self._lock_fd)
            raise
        self._gauge.set(len(self.pending))
        if self.pending or self.torn or self.corrupt:
            logger.info(
                "webhook outbox %s: %d pending entr(ies) to resend, %d done ids remembered, "
                "%d torn tail line(s) dropped, %d damaged line(s) skipped",
                self.path.name, len(self.pending), len(self.done), self.torn, self.corrupt,
            )

    # start-up ---------------------------------------------------------------------

    def _adopt(self, worker_index: int, worker_count: int) -> None:
        """Take over journals of workers that no longer exist (the cluster shrank).

        Their intact lines are appended to this journal (fsynced) before the old file
        is removed; a crash in between only repeats the adoption, which is idempotent.
        """
        for other in sorted(self.dir.glob("worker-*.log")):
            try:
                j = int(other.stem.removeprefix("worker-"))
            except ValueError:
                continue
            if j < worker_count or j % worker_count != worker_index:
                continue
            lock_fd = _lock_file(self.dir / f"worker-{j}.lock")
            try:
                lines: list[tuple[bytes, dict[str, Any]]] = []
                for _, line in _journal_lines(other):
                    doc = _unframe(line[:-1]) if line.endswith(b"\n") else None
                    if doc is None:
                        self.corrupt += 1
                    else:
                        lines.append((line, doc))
                if lines:
                    _write_all(self._fd, b"".join(line for line, _ in lines))
                    os.fsync(self._fd)
                for line, doc in lines:
                    if not self._apply(doc, self.size, len(line)):
                        self.corrupt += 1
                    self.size += len(line)
                other.unlink()
                _fsync_dir(self.dir)
                logger.info("webhook outbox %s adopted %s (%d lines)", self.path.name,
                            other.name, len(lines))
            finally:
                _unlock_file(lock_fd)

    def _load(self) -> int:
        """Read the journal: pending entries and done ids; drop a torn tail. Its size."""
        good_end = 0
        for offset, line in _journal_lines(self.path):
            if not line.endswith(b"\n"):
                self.torn += 1  # the process died mid-write: that batch was not acked
                logger.warning("webhook outbox %s: dropping a torn last line (%d bytes "
                               "at offset %d)", self.path.name, len(line), offset)
                break
            good_end = offset + len(line)
            doc = _unframe(line[:-1])
            if doc is None or not self._apply(doc, offset, len(line)):
                self.corrupt += 1
                logger.error("webhook outbox %s: skipping a damaged line at offset %d "
                             "(%d bytes)", self.path.name, offset, len(line))
        if os.fstat(self._fd).st_size != good_end:
            os.ftruncate(self._fd, good_end)
            os.fsync(self._fd)
        self._trim_done(_wall_ms())
        return good_end

    def _apply(self, doc: dict[str, Any], offset: int, length: int) -> bool:
        kind = doc.get("k")
        if kind == "e":
            tk, alert = doc.get("t"), _alert_from(doc.get("a"))
            if not isinstance(tk, str) or alert is None:
                return False
            key = _pair_key(tk, alert.id)
            if key not in self.pending and key not in self.done:
                self.pending[key] = _Pending(tk, self.targets.get(tk), alert.id, offset,
                                             length, self._cache(alert))
                self._pending_bytes += length
            return True
        if kind == "d":
            h, w = doc.get("h"), doc.get("w")
            if not isinstance(h, str) or type(w) is not int:
                return False
            try:
                key = int(h, 16)
            except ValueError:
                return False
            self._forget_pending(key)
            self.done[key] = w
            self.done.move_to_end(key)
            return True
        return False

    # both threads ------------------------------------------------------------------

    def _cache(self, alert: Alert) -> Alert | None:
        if self._cached < self.window:
            self._cached += 1
            return alert
        return None

    def _forget_pending(self, key: int) -> _Pending | None:
        p = self.pending.pop(key, None)
        if p is not None:
            self._gauge.set(len(self.pending))
            self._pending_bytes -= p.length
            if p.alert is not None:
                self._cached -= 1
        return p

    def _trim_done(self, now_ms: int) -> None:
        cutoff = now_ms - self.done_ttl_ms
        done = self.done
        while done and (len(done) > self.done_keep or next(iter(done.values())) < cutoff):
            done.popitem(last=False)

    def pending_count(self) -> int:
        """Entries journaled and not yet done."""
        with self._lock:
            return len(self.pending)

    def append(
        self, pairs: Sequence[tuple[_Target, Alert]]
    ) -> tuple[list[tuple[_Target, Alert, str]], list[_Target]]:
        """Journal new pairs and fsync, before returning; skip those already known.

        Returns the pairs that cannot be encoded (with the error) and the targets of
        the duplicates skipped. Raises :class:`OSError` if the journal cannot be
        written (the batch is then not acknowledged: Bytewax will replay it).
        """
        bad: list[tuple[_Target, Alert, str]] = []
        dups: list[_Target] = []
        with self._lock:
            if self._closed:
                raise OSError("webhook outbox is closed")
            start = self.size
            offset = start
            lines: list[bytes] = []
            added: list[int] = []
            for target, alert in pairs:
                key = _pair_key(target.key, alert.id)
                if key in self.pending or key in self.done:
                    dups.append(target)
                    continue
                try:
                    line = _frame({"k": "e", "t": target.key, "a": _alert_doc(alert)})
                except EncodeError as exc:
                    bad.append((target, alert, str(exc)))
                    continue
                self.pending[key] = _Pending(target.key, target, alert.id, offset, len(line),
                                             self._cache(alert))
                self._pending_bytes += len(line)
                added.append(key)
                offset += len(line)
                lines.append(line)
            if lines:
                try:
                    _write_all(self._fd, b"".join(lines))
                    os.fsync(self._fd)
                except OSError:
                    for key in added:
                        self._forget_pending(key)
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fd, start)  # no half line before the next one
                    raise
                self.size = offset
                self._gauge.set(len(self.pending))
            self.duplicates += len(dups)
        return bad, dups

    def next_pending(self) -> tuple[int, _Pending, Alert | None] | None:
        """The oldest pending entry and its alert (read from the journal if not cached).

        The alert is None if its journal line no longer decodes.
        """
        with self._lock:
            if self._closed:
                return None
            first = next(iter(self.pending.items()), None)
            if first is None:
                return None
            key, p = first
            if p.alert is not None:
                return key, p, p.alert
            line = os.pread(self._fd, p.length, p.offset)
        doc = _unframe(line.rstrip(b"\n"))
        alert = _alert_from(doc.get("a")) if doc is not None and doc.get("k") == "e" else None
        return key, p, alert

    def mark_done(self, key: int, outcome: str) -> None:
        """Record an entry's outcome (written, not fsynced; survives a process kill)."""
        with self._lock:
            if self._closed:
                return
            p = self._forget_pending(key)
            if p is None:
                return
            now = _wall_ms()
            self.done[key] = now
            self.done.move_to_end(key)
            self._trim_done(now)
            line = _frame({"k": "d", "h": f"{key:016x}", "id": p.alert_id, "r": outcome,
                           "w": now})
            try:
                _write_all(self._fd, line)
            except OSError as exc:
                # the entry will be sent again after a restart (same webhook-id)
                logger.error("webhook outbox %s: cannot write a done record: %s",
                             self.path.name, type(exc).__name__)
                return
            self.size += len(line)

    # compaction ---------------------------------------------------------------------

    def _needs_compaction(self) -> bool:
        """Past ``max_bytes`` and at least half of it garbage (so compactions stay
        amortised when pending entries alone are large)."""
        live = self._pending_bytes + len(self.done) * _DONE_LINE_BYTES
        return self.size > max(self.max_bytes, self._compact_floor) and self.size > 2 * live

    def maybe_compact(self) -> bool:
        """Compact if the journal needs it (called by the sender thread, and at start-up).

        The journal is rewritten as the remembered done ids plus the pending entries
        into a temporary file, fsynced and renamed over the journal. The lock is held
        only to copy what was appended meanwhile, so ``write_batch`` barely waits.
        """
        with self._lock:
            if self._closed or not self._needs_compaction():
                return False
            self._trim_done(_wall_ms())
            done = list(self.done.items())
            pending = [(key, p.offset, p.length) for key, p in self.pending.items()]
            base_size, fd = self.size, self._fd
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with tmp.open("wb") as f:
                offset = 0
                new_offsets: dict[int, int] = {}
                chunk: list[bytes] = []
                for key, w in done:
                    chunk.append(_frame({"k": "d", "h": f"{key:016x}", "w": w}))
                    if len(chunk) >= 4096:
                        offset += f.write(b"".join(chunk))
                        chunk.clear()
                offset += f.write(b"".join(chunk))
                for key, off, length in pending:
                    line = os.pread(fd, length, off)
                    if len(line) != length or not line.endswith(b"\n"):
                        raise OSError("journal shorter than its index")
                    new_offsets[key] = offset
                    offset += f.write(line)
                f.flush()
                os.fsync(f.fileno())
                with self._lock:
                    if self._closed:
                        raise OSError("closed during compaction")
                    # what was appended since the snapshot: copy it as is
                    tail_at = offset
                    tail = os.pread(fd, self.size - base_size, base_size)
                    offset += f.write(tail)
                    f.flush()
                    os.fsync(f.fileno())
                    new_fd = os.open(tmp, os.O_RDWR | os.O_APPEND)  # follows the rename
                    try:
                        os.replace(tmp, self.path)
                    except OSError:
                        os.close(new_fd)
                        raise
                    self._fd = new_fd
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        _fsync_dir(self.dir)
                    for key, p in self.pending.items():
                        if key in new_offsets:
                            p.offset = new_offsets[key]
                        elif p.offset >= base_size:
                            p.offset = tail_at + p.offset - base_size
                    old_size, self.size = self.size, offset
                    self._compact_floor = 0
                    self.compactions += 1
                    n_pending, n_done = len(self.pending), len(self.done)
        except OSError as exc:
            logger.error("webhook outbox %s: compaction failed (%s); keeping the journal",
                         self.path.name, type(exc).__name__)
            with contextlib.suppress(OSError):
                tmp.unlink()
            with self._lock:
                self._compact_floor = 2 * self.size
            return False
        logger.info("webhook outbox %s compacted: %d -> %d bytes, %d pending, %d done ids",
                    self.path.name, old_size, offset, n_pending, n_done)
        return True

    def close(self) -> None:
        """Close the journal and release its lock (pending entries stay in it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
        _unlock_file(self._lock_fd)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


_DONE_LINE_BYTES: Final = len(_frame({"k": "d", "h": "0" * 16, "w": 1_700_000_000_000}))


class _OutboxPartition(_WebhookPartition):
    """One worker's outbox journal and sender thread (journal order, one at a time)."""

    def __init__(self, sink: WebhookOutput, client: httpx.Client, owns_client: bool,
                 name: str, outbox: _Outbox) -> None:
        self._outbox = outbox
        self._work = threading.Event()
        super().__init__(sink, client, owns_client, name)

    def write_batch(self, items: list[Alert]) -> None:
        """Journal each (target, alert) pair and fsync, then wake the sender.

        A replayed alert whose (target, id) the outbox already holds is skipped.
        """
        pairs = [(t, a) for a in items for t in self._sink.targets if t.wants(a)]
        if not pairs:
            return
        bad, dups = self._outbox.append(pairs)
        for target in dups:
            self._sink._count(target.url, "duplicates")
        for target, alert, err in bad:
            logger.error("webhook alert %s cannot be journaled: %s", alert.id, err)
            self._sink._count(target.url, "failed")
            self._dead_letter(alert, target, "encode_error", None, attempts=0, error=err)
        self._work.set()

    def close(self) -> None:
        """Drain (up to ``drain_timeout_s``); what is left stays in the journal."""
        if self._closed:
            return
        self._closed = True
        outbox = self._outbox
        deadline = time.monotonic() + self._sink.drain_timeout_s
        while outbox.pending_count() and time.monotonic() < deadline:
            self._work.set()
            time.sleep(_POLL_S)
        self._abort.set()
        self._stop.set()
        self._thread.join(self._sink.timeout_s + 1.0)
        if self._thread.is_alive():
            logger.error("webhook sender thread did not stop in time")
        left = outbox.pending_count()
        if left:
            logger.warning("webhook outbox %s: %d alert(s) left in the journal for the "
                           "next start", outbox.path.name, left)
        outbox.close()
        self._sink._forget_outbox(outbox)
        if self._owns_client:
            self._client.close()

    def _run(self) -> None:
        outbox = self._outbox
        while not self._abort.is_set():
            item = outbox.next_pending()
            if item is None:
                if self._stop.is_set():
                    return
                try:
                    outbox.maybe_compact()
                except Exception:
                    logger.exception("webhook outbox %s: compaction failed", outbox.path.name)
                self._work.wait(_POLL_S)
                self._work.clear()
                continue
            key, p, alert = item
            try:
                outcome = self._deliver_entry(p, alert)
            except Exception as exc:  # the sender thread must never die
                logger.exception("webhook delivery of %s crashed", p.alert_id)
                outcome = "error"
                if p.target is not None and alert is not None:
                    self._sink._count(p.target.url, "failed")
                    self._dead_letter(alert, p.target, "error", None, attempts=0,
                                      error=type(exc).__name__)
            if outcome is None:
                return  # aborted by close(): it stays pending in the journal
            try:
                outbox.mark_done(key, outcome)
                outbox.maybe_compact()
            except Exception:
                logger.exception("webhook outbox %s: bookkeeping failed", outbox.path.name)

    def _deliver_entry(self, p: _Pending, alert: Alert | None) -> str | None:
        if alert is None:
            logger.error("webhook outbox %s: entry of %s no longer decodes; dropped",
                         self._outbox.path.name, p.alert_id)
            self._outbox.corrupt += 1
            return "corrupt"
        if p.target is None:
            url = f"<unconfigured webhook target {p.target_key}>"
            logger.error("webhook %s for a target no longer configured (%s) dead-lettered",
                         alert.id, p.target_key)
            self._sink._count(url, "failed")
            metrics.WEBHOOK_FAILURES.labels("removed", "target_removed").inc()
            try:
                self._sink.on_dead_letter(alert, url, "target_removed", None, attempts=0,
                                          error="target no longer configured")
            except Exception:
                logger.exception("webhook dead-letter handler failed for %s "
                                 "(target_removed): alert LOST", alert.id)
            return "target_removed"
        return self._deliver(p.target, alert, keep_on_abort=True)
