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
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from pydantic import SecretStr

from flows import metrics
from flows.codec import EncodeError, json_dumps, json_loads
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

_SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - a prefix, not a secret
_PD_SEVERITIES: Final = frozenset({"critical", "error", "warning", "info"})
_USER_AGENT: Final = "touchstream-webhook/0.1"
_POLL_S: Final = 0.05


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
    was full. Every alert routed to a target ends in ``sent + failed + spilled``.
    """

    sent: int = 0
    retried: int = 0
    failed: int = 0
    spilled: int = 0


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
    ) -> None:
        """Validate the targets; no client or thread is made until :meth:`build`."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must not be negative")
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
        self._counts_lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}

    # counters -----------------------------------------------------------------------

    def _count(self, url: str, name: str, n: int = 1) -> None:
        with self._counts_lock:
            c = self._counts.setdefault(
                url, {"sent": 0, "retried": 0, "failed": 0, "spilled": 0}
            )
            c[name] += n

    def stats(self) -> dict[str, WebhookCounts]:
        """Counters per target URL (summed over all partitions of this sink)."""
        with self._counts_lock:
            return {url: WebhookCounts(**c) for url, c in self._counts.items()}

    def total(self) -> WebhookCounts:
        """Counters summed over all targets."""
        out = {"sent": 0, "retried": 0, "failed": 0, "spilled": 0}
        with self._counts_lock:
            for c in self._counts.values():
                for k, v in c.items():
                    out[k] += v
        return WebhookCounts(**out)

    # bytewax ------------------------------------------------------------------------

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> StatelessSinkPartition[Alert]:
        """Make this worker's client, queue and sender thread."""
        if isinstance(self._client, httpx.Client):
            client, owned = self._client, False
        elif self._client is None:
            client, owned = httpx.Client(), True
        else:
            client, owned = self._client(), True
        return _WebhookPartition(self, client, owned, f"{step_id}-{worker_index}")


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

    def _deliver(self, target: _Target, alert: Alert) -> None:
        sink = self._sink
        policy = sink.retry
        try:
            body, content_type = target.render(alert)
        except EncodeError as exc:
            logger.error("webhook alert %s cannot be encoded: %s", alert.id, exc)
            sink._count(target.url, "failed")
            self._dead_letter(alert, target, "encode_error", None, attempts=0, error=str(exc))
            return
        deadline = sink._clock() + policy.budget_s
        attempts = 0
        last: _Outcome | None = None
        while True:
            if self._abort.is_set():
                reason = "shutdown"
                break
            attempts += 1
            last = self._attempt(target, alert.id, body, content_type)
            if last.ok:
                sink._count(target.url, "sent")
                metrics.WEBHOOK_SENT.labels(str(target.index)).inc()
                return
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
