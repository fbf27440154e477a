"""Delivery guards that must hold across workers and restarts.

The flow itself applies every rule guard in per-customer state (deterministic and
restored from snapshots). A :class:`GuardStore` is the second line, at delivery: it
admits each push once per ``push_id`` (so a push replayed after a restart is not
delivered twice), and enforces the per-customer cap and once-per-period keys
atomically for all workers sharing the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias, runtime_checkable

__all__ = ["Decision", "GuardRequest", "GuardStore", "InMemoryGuardStore"]

Decision: TypeAlias = Literal["ok", "duplicate", "cap", "once"]


@dataclass(frozen=True, slots=True)
class GuardRequest:
    """One push asking to be delivered.

    ``once_key`` (if set) may be admitted once per ``once_ttl_ms``; at most ``cap``
    pushes per customer are admitted per ``cap_window_ms`` (``cap`` 0 = no cap).
    ``now_ms`` is the push's event time, so decisions replay identically.
    """

    push_id: str
    customer_id: str
    now_ms: int
    idempotency_ttl_ms: int = 7 * 24 * 3600 * 1000
    once_key: str | None = None
    once_ttl_ms: int = 0
    cap: int = 0
    cap_window_ms: int = 24 * 3600 * 1000


@runtime_checkable
class GuardStore(Protocol):
    """Admits pushes atomically; every implementation passes the same contract tests."""

    def admit(self, requests: Sequence[GuardRequest]) -> list[Decision]:
        """Decide each request in order; an admitted one is recorded before the next."""
        ...


class InMemoryGuardStore:
    """Single-process guard store (the embedded default and the test reference)."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}  # push_id -> expiry ms
        self._once: dict[str, int] = {}  # once_key -> expiry ms
        self._sent: dict[str, list[int]] = {}  # customer -> admitted times

    def admit(self, requests: Sequence[GuardRequest]) -> list[Decision]:
        """Decide each request in order."""
        out: list[Decision] = []
        for r in requests:
            out.append(self._admit_one(r))
        return out

    def _admit_one(self, r: GuardRequest) -> Decision:
        now = r.now_ms
        exp = self._seen.get(r.push_id)
        if exp is not None and exp > now:
            return "duplicate"
        if r.once_key is not None:
            oexp = self._once.get(r.once_key)
            if oexp is not None and oexp > now:
                return "once"
        if r.cap > 0:
            times = [t for t in self._sent.get(r.customer_id, ()) if t > now - r.cap_window_ms]
            self._sent[r.customer_id] = times
            if len(times) >= r.cap:
                return "cap"
            times.append(now)
        self._seen[r.push_id] = now + r.idempotency_ttl_ms
        if r.once_key is not None:
            self._once[r.once_key] = now + r.once_ttl_ms
        return "ok"
