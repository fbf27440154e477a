"""Customer profiles (the VGOP side): a store protocol and the in-memory store.

A customer with no stored profile has the empty profile: no subscriptions, no
preferences, not opted out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from flows.codec import DecodeError, json_loads
from flows.model import Profile, profile_from_dict

__all__ = ["InMemoryProfileStore", "ProfileError", "ProfileStore", "read_profiles_jsonl"]


class ProfileError(ValueError):
    """A profiles file line that is not a valid profile (names file and line)."""


@runtime_checkable
class ProfileStore(Protocol):
    """Where the engine reads profiles from. ``get`` never raises for a missing one."""

    def get(self, customer_id: str) -> Profile:
        """The customer's profile, or the empty profile."""
        ...

    def put_many(self, profiles: Iterable[Profile]) -> int:
        """Store profiles (replacing whole profiles); return how many were stored."""
        ...

    def prefetch(self, customer_ids: Iterable[str]) -> Mapping[str, Profile]:
        """Warm whatever cache sits in front of :meth:`get` for these customers, in one
        round trip, and return what it now holds for them, by customer id.

        The engine calls it once per batch and reads the batch's profiles from the
        returned map. A store with nothing to warm returns an empty map, and the engine
        calls :meth:`get` instead.
        """
        ...

    def remember(self, profiles: Mapping[str, Profile]) -> None:
        """Profiles another part of the flow read for this batch (the live router,
        maybe in another process), by customer id.

        A store with a cache keeps them as the last known profiles, to serve while its
        backend is unreachable, but not as freshly read ones: :meth:`get` still reads
        the backend for them once nothing fresher is cached. A store without a cache
        ignores them.
        """
        ...


class InMemoryProfileStore:
    """A dict of profiles; the embedded default and the replay store."""

    def __init__(self, profiles: Iterable[Profile] = ()) -> None:
        self._profiles: dict[str, Profile] = {}
        self.put_many(profiles)

    def get(self, customer_id: str) -> Profile:
        """The customer's profile, or the empty profile."""
        p = self._profiles.get(customer_id)
        return p if p is not None else Profile(customer_id)

    def get_many(self, customer_ids: Iterable[str]) -> dict[str, Profile]:
        """Profiles for many customers (missing ones are empty), by customer id."""
        return {cid: self.get(cid) for cid in customer_ids}

    def prefetch(self, customer_ids: Iterable[str]) -> Mapping[str, Profile]:
        """Nothing to warm: every profile is in memory (an empty map)."""
        return {}

    def remember(self, profiles: Mapping[str, Profile]) -> None:
        """Nothing to keep: every profile is in memory."""

    def put_many(self, profiles: Iterable[Profile]) -> int:
        """Store profiles; return how many were stored."""
        n = 0
        for p in profiles:
            self._profiles[p.customer_id] = p
            n += 1
        return n

    def __len__(self) -> int:
        return len(self._profiles)


def read_profiles_jsonl(path: str | Path) -> Iterator[Profile]:
    """Read a JSONL profiles file; raise :class:`ProfileError` naming the bad line."""
    p = Path(path)
    with p.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield profile_from_dict(json_loads(line))
            except (DecodeError, ValueError) as exc:
                raise ProfileError(f"{p}:{lineno}: {exc}") from exc
