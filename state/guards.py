"""Delivery guards that must hold across workers and restarts.

The flow itself applies every rule guard in per-customer state (deterministic and
restored from snapshots). A :class:`GuardStore` is the second line, at delivery: it
admits each push once per ``push_id`` (so a push replayed after a restart is not
delivered twice), and enforces the per-customer cap and once-per keys atomically for
all workers and processes sharing the store (so neither two workers that both think
they own a customer nor a restart with fresh flow state can exceed the cap or repeat a
once-per push).

Everything a guard remembers is scoped to the request's customer: the push id, the
once key and the cap. That is what lets the Redis store keep one customer's guard keys
in one Redis Cluster slot. (Push ids embed the customer anyway, see
``flows.model.stable_id``.)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Protocol, TypeAlias, runtime_checkable

if TYPE_CHECKING:
    from flows.model import Push

__all__ = [
    "FOREVER_MS",
    "PROCESS_QUOTA",
    "Decision",
    "GuardRequest",
    "GuardStore",
    "InMemoryGuardStore",
    "InMemoryQuotaStore",
    "QuotaStore",
]

Decision: TypeAlias = Literal["ok", "duplicate", "cap", "once"]

FOREVER_MS: Final = 2**62
"""The "until" of a once key that never expires (as the flow's own ``FOREVER``)."""


@dataclass(frozen=True, slots=True)
class GuardRequest:
    """One push asking to be delivered.

    ``once_key`` (if set) is admitted once per ``once_ttl_ms`` of event time
    (``None`` = once for good); at most ``cap`` pushes per customer are admitted per
    ``cap_window_ms`` (``cap`` 0 = no cap). Push ids and once keys are per customer.
    ``now_ms`` is the push's event time, so decisions replay identically.
    """

    push_id: str
    customer_id: str
    now_ms: int
    idempotency_ttl_ms: int = 7 * 24 * 3600 * 1000
    once_key: str | None = None
    once_ttl_ms: int | None = None
    cap: int = 0
    cap_window_ms: int = 24 * 3600 * 1000

    def __post_init__(self) -> None:
        if (
            self.idempotency_ttl_ms < 0
            or (self.once_ttl_ms is not None and self.once_ttl_ms < 0)
            or self.cap < 0
            or self.cap_window_ms < 0
        ):
            raise ValueError("guard TTLs, cap and cap window must not be negative")

    @classmethod
    def for_push(cls, push: Push) -> GuardRequest:
        """The request for a push: its id, customer and event time, plus its ``guard``."""
        g = push.guard
        if g is None:
            return cls(push.push_id, push.customer_id, push.event_ts)
        return cls(
            push.push_id,
            push.customer_id,
            push.event_ts,
            once_key=g.once_key,
            once_ttl_ms=g.once_ttl_ms,
            cap=g.cap,
            cap_window_ms=g.cap_window_ms,
        )

    def once_until(self) -> int:
        """The event time until which an admitted request's once key blocks."""
        return FOREVER_MS if self.once_ttl_ms is None else self.now_ms + self.once_ttl_ms


@runtime_checkable
class GuardStore(Protocol):
    """Admits pushes atomically; every implementation passes the same contract tests."""

    def admit(self, requests: Sequence[GuardRequest]) -> list[Decision]:
        """Decide each request in order; an admitted one is recorded before the next."""
        ...


class InMemoryGuardStore:
    """Single-process guard store (the embedded default and the test reference).

    Safe to share between the worker threads of one process; it forgets nothing on
    its own (the reference semantics), so it is not for long-running use.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], int] = {}  # (customer, push_id) -> until ms
        self._once: dict[tuple[str, str], int] = {}  # (customer, once_key) -> until ms
        self._sent: dict[str, list[int]] = {}  # customer -> admitted times

    def admit(self, requests: Sequence[GuardRequest]) -> list[Decision]:
        """Decide each request in order."""
        with self._lock:
            return [self._admit_one(r) for r in requests]

    def _admit_one(self, r: GuardRequest) -> Decision:
        now = r.now_ms
        exp = self._seen.get((r.customer_id, r.push_id))
        if exp is not None and exp > now:
            return "duplicate"
        if r.once_key is not None:
            oexp = self._once.get((r.customer_id, r.once_key))
            if oexp is not None and oexp > now:
                return "once"
        if r.cap > 0:
            times = [t for t in self._sent.get(r.customer_id, ()) if t > now - r.cap_window_ms]
            self._sent[r.customer_id] = times
            if len(times) >= r.cap:
                return "cap"
            times.append(now)
        self._seen[r.customer_id, r.push_id] = now + r.idempotency_ttl_ms
        if r.once_key is not None:
            self._once[r.customer_id, r.once_key] = r.once_until()
        return "ok"


@runtime_checkable
class QuotaStore(Protocol):
    """A campaign-wide quota shared by every worker: at most ``limit`` tokens per
    campaign are ever taken.

    ``take`` is idempotent per token (a push id): taking a token already taken answers
    True again without counting it twice, so a push decided again after a restart
    (replayed from a snapshot) keeps its prize and uses no second one.
    """

    def take(self, campaign: str, limit: int, token: str) -> bool:
        """Take one of ``limit`` places of ``campaign`` for ``token``; False if full."""
        ...

    def taken(self, campaign: str) -> int:
        """How many places of ``campaign`` are taken."""
        ...

    def restore(self, campaign: str, tokens: Sequence[str]) -> None:
        """Put back tokens taken before a restart (from a snapshot), whatever the limit."""
        ...


class InMemoryQuotaStore:
    """:class:`QuotaStore` for one process, safe to share between its worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, set[str]] = {}

    def take(self, campaign: str, limit: int, token: str) -> bool:
        """Take a place for ``token`` unless ``limit`` are taken (idempotent per token)."""
        with self._lock:
            tokens = self._tokens.get(campaign)
            if tokens is None:
                tokens = self._tokens[campaign] = set()
            if token in tokens:
                return True
            if len(tokens) >= limit:
                return False
            tokens.add(token)
            return True

    def taken(self, campaign: str) -> int:
        """How many places of ``campaign`` are taken."""
        with self._lock:
            return len(self._tokens.get(campaign, ()))

    def restore(self, campaign: str, tokens: Sequence[str]) -> None:
        """Put back tokens taken before a restart (from a snapshot), whatever the limit."""
        with self._lock:
            self._tokens.setdefault(campaign, set()).update(tokens)


PROCESS_QUOTA: Final = InMemoryQuotaStore()
"""The quota store every engine of this process shares unless it is given another (for
several processes, use ``state.redis_store.RedisQuotaStore``)."""
