"""Redis-backed profile store and guard store (shared by all workers and restarts).

Key layout (``<...>`` is filled in; prefixes are constructor arguments):

``profile:<customer_id>`` -- a hash, human-readable so operators can ``HGETALL`` it:

    =============== ==========================================================
    subscriptions   JSON list of service codes, e.g. ``["5G","VOLTE"]``
    configured      JSON list of service codes
    prefs           JSON object of string lists, e.g. ``{"lang":["en"]}``
    trials          JSON object of service code -> epoch ms
    handset         plain string (field absent = none)
    segment         plain string (field absent = none)
    opt_out         ``"0"`` or ``"1"`` (``"true"``/``"false"`` also read)
    =============== ==========================================================

    A missing hash is the empty profile; a missing field is that field's default, so
    ``HSET profile:C1 opt_out 1`` alone opts a customer out. A hash that cannot be
    read (bad JSON, wrong types) is served as the empty profile and counted in
    :attr:`RedisProfileStore.bad_profiles`, never raised.

``guard:id:<push_id>`` -- string: the event-time (ms) until which this push id is a
    duplicate.
``guard:once:<once_key>`` -- string: the event-time (ms) until which the key blocks.
``guard:cap:<customer_id>`` -- sorted set: admitted push ids scored by event time (ms),
    trimmed to the cap window on every check.

Guard values hold *event* times (the request's ``now_ms``), never the server clock, so
a replay decides exactly as the first run did and exactly as
:class:`state.guards.InMemoryGuardStore` does. Each guard key also carries a
wall-clock ``PEXPIRE`` of its TTL (or window) plus ``gc_slack_ms``, only so that
Redis forgets old keys; it is not what decides.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import redis
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, FieldT

from flows.codec import json_dumps, json_loads
from flows.model import Profile, profile_from_dict
from state.guards import Decision, GuardRequest

__all__ = ["RedisGuardStore", "RedisProfileStore"]

log = logging.getLogger(__name__)

_TEXT_FIELDS: Final = ("handset", "segment")
_JSON_FIELDS: Final = ("subscriptions", "configured", "prefs", "trials")
_TRUE: Final = frozenset({"1", "true"})
_FALSE: Final = frozenset({"0", "false"})


def _text(v: bytes | str) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else v


def encode_profile(p: Profile) -> dict[FieldT, EncodableT]:
    """A profile as the fields of its hash (``handset``/``segment`` omitted when None)."""
    d = p.to_dict()
    fields: dict[FieldT, EncodableT] = {f: json_dumps(d[f]) for f in _JSON_FIELDS}
    for f in _TEXT_FIELDS:
        if d[f] is not None:
            fields[f] = d[f]
    fields["opt_out"] = "1" if p.opt_out else "0"
    return fields


def decode_profile(customer_id: str, raw: Mapping[bytes | str, bytes | str]) -> Profile:
    """A profile from its hash fields; raise ValueError naming what is wrong."""
    if not raw:
        return Profile(customer_id)
    h = {_text(k): v for k, v in raw.items()}
    doc: dict[str, Any] = {"customer_id": customer_id}
    for f in _JSON_FIELDS:
        if f in h:
            doc[f] = json_loads(h[f])  # DecodeError is a ValueError
    for f in _TEXT_FIELDS:
        if f in h:
            doc[f] = _text(h[f])
    if "opt_out" in h:
        flag = _text(h["opt_out"]).strip().lower()
        if flag in _TRUE:
            doc["opt_out"] = True
        elif flag in _FALSE:
            doc["opt_out"] = False
        else:
            raise ValueError("opt_out must be 0 or 1")
    return profile_from_dict(doc)


class RedisProfileStore:
    """Profiles in Redis hashes, read through a small bounded TTL cache.

    A cached profile (including "no profile") is served without a round trip for
    ``cache_ttl_s`` seconds, so a change made in Redis is seen within that time.
    ``put_many`` drops what it wrote from this store's cache. Safe to share between
    threads.
    """

    def __init__(
        self,
        client: redis.Redis,
        cache_ttl_s: float = 5.0,
        now: Callable[[], float] = time.monotonic,
        *,
        prefix: str = "profile:",
        max_cached: int = 100_000,
    ) -> None:
        self._client = client
        self._ttl = cache_ttl_s
        self._now = now
        self._prefix = prefix
        self._max = max_cached
        self._cache: OrderedDict[str, tuple[float, Profile]] = OrderedDict()
        self._lock = threading.Lock()
        self.bad_profiles = 0
        self.cache_hits = 0
        self.cache_misses = 0

    def key(self, customer_id: str) -> str:
        """The Redis key of a customer's profile hash."""
        return self._prefix + customer_id

    # -- cache --------------------------------------------------------------------

    def _cached(self, customer_id: str, now: float) -> Profile | None:
        with self._lock:
            entry = self._cache.get(customer_id)
            if entry is None or entry[0] <= now:
                self.cache_misses += 1
                return None
            self._cache.move_to_end(customer_id)
            self.cache_hits += 1
            return entry[1]

    def _remember(self, profile: Profile, now: float) -> None:
        if self._ttl <= 0 or self._max <= 0:
            return
        with self._lock:
            self._cache[profile.customer_id] = (now + self._ttl, profile)
            self._cache.move_to_end(profile.customer_id)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)

    def _decode(self, customer_id: str, raw: Mapping[bytes | str, bytes | str]) -> Profile:
        try:
            return decode_profile(customer_id, raw)
        except ValueError as exc:
            with self._lock:
                self.bad_profiles += 1
            log.warning("unreadable profile hash %s: %s", self.key(customer_id), exc)
            return Profile(customer_id)

    # -- ProfileStore ---------------------------------------------------------------

    def get(self, customer_id: str) -> Profile:
        """The customer's profile, or the empty profile (also for an unreadable hash)."""
        now = self._now()
        hit = self._cached(customer_id, now)
        if hit is not None:
            return hit
        raw = self._client.hgetall(self.key(customer_id))
        profile = self._decode(customer_id, raw)
        self._remember(profile, now)
        return profile

    def get_many(self, customer_ids: Iterable[str]) -> dict[str, Profile]:
        """Profiles for many customers; all cache misses are fetched in one pipeline."""
        now = self._now()
        out: dict[str, Profile] = {}
        missing: dict[str, None] = {}  # ordered set
        for cid in customer_ids:
            if cid in out or cid in missing:
                continue
            hit = self._cached(cid, now)
            if hit is None:
                missing[cid] = None
            else:
                out[cid] = hit
        if missing:
            pipe = self._client.pipeline(transaction=False)
            for cid in missing:
                pipe.hgetall(self.key(cid))
            for cid, raw in zip(missing, pipe.execute(), strict=True):
                profile = self._decode(cid, raw)
                self._remember(profile, now)
                out[cid] = profile
        return out

    def put_many(self, profiles: Iterable[Profile]) -> int:
        """Replace whole profiles in one MULTI/EXEC pipeline; return how many."""
        pipe = self._client.pipeline(transaction=True)
        written: list[str] = []
        for p in profiles:
            key = self.key(p.customer_id)
            pipe.delete(key)
            pipe.hset(key, mapping=encode_profile(p))
            written.append(p.customer_id)
        if not written:
            return 0
        pipe.execute()
        with self._lock:
            for cid in written:
                self._cache.pop(cid, None)
        return len(written)

    def invalidate(self) -> None:
        """Forget every cached profile."""
        with self._lock:
            self._cache.clear()


# --- guards ---------------------------------------------------------------------------

# KEYS, per request i (0-based): 3i+1 idempotency key, 3i+2 once key, 3i+3 cap key.
# ARGV[1] = gc slack ms; then per request 7 values starting at 2+7i:
#   push_id, now_ms, idempotency_ttl_ms, has_once (0/1), once_ttl_ms, cap, cap_window_ms
# Returns one code per request: 0 ok, 1 duplicate, 2 cap, 3 once.
_ADMIT_LUA: Final = """
local slack = tonumber(ARGV[1])
local out = {}
local n = #KEYS / 3
local function ms(x) return string.format('%.0f', x) end
local function gc(ttl) return ms(math.max(ttl + slack, 1)) end
for i = 0, n - 1 do
  local idem_key, once_key, cap_key = KEYS[3*i+1], KEYS[3*i+2], KEYS[3*i+3]
  local a = 2 + 7*i
  local push_id = ARGV[a]
  local now = tonumber(ARGV[a+1])
  local idem_ttl = tonumber(ARGV[a+2])
  local has_once = ARGV[a+3] == '1'
  local once_ttl = tonumber(ARGV[a+4])
  local cap = tonumber(ARGV[a+5])
  local window = tonumber(ARGV[a+6])
  local code = 0
  local seen = redis.call('GET', idem_key)
  if seen and tonumber(seen) > now then
    code = 1
  end
  if code == 0 and has_once then
    local until_ms = redis.call('GET', once_key)
    if until_ms and tonumber(until_ms) > now then
      code = 3
    end
  end
  if code == 0 and cap > 0 then
    redis.call('ZREMRANGEBYSCORE', cap_key, '-inf', ms(now - window))
    if redis.call('ZCARD', cap_key) >= cap then
      code = 2
    else
      local member = push_id
      local j = 0
      while redis.call('ZSCORE', cap_key, member) do
        j = j + 1
        member = push_id .. '#' .. j
      end
      redis.call('ZADD', cap_key, ms(now), member)
      redis.call('PEXPIRE', cap_key, gc(window))
    end
  end
  if code == 0 then
    redis.call('SET', idem_key, ms(now + idem_ttl), 'PX', gc(idem_ttl))
    if has_once then
      redis.call('SET', once_key, ms(now + once_ttl), 'PX', gc(once_ttl))
    end
  end
  out[i+1] = code
end
return out
"""

_DECISIONS: Final[tuple[Decision, ...]] = ("ok", "duplicate", "cap", "once")


class RedisGuardStore:
    """:class:`state.guards.GuardStore` in Redis: one Lua script decides a whole batch.

    All requests of one :meth:`admit` call go in one round trip (a pipeline of
    ``EVALSHA`` calls of up to ``chunk`` requests each). Each script call is atomic
    and decides its requests in order, so workers sharing the store never both take
    the last slot of a cap nor both admit one push id; another worker's call may run
    between two chunks of one large call, which changes nothing about correctness.
    If Redis lost the script (restart, ``SCRIPT FLUSH``) it is loaded and only the
    calls that did not run are sent again.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "guard:",
        *,
        gc_slack_ms: int = 3_600_000,
        chunk: int = 500,
    ) -> None:
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        self._client = client
        self._prefix = prefix
        self._slack = gc_slack_ms
        self._chunk = chunk
        self._script = client.register_script(_ADMIT_LUA)

    def _call_args(self, reqs: Sequence[GuardRequest]) -> tuple[int, list[str | int]]:
        keys: list[str | int] = []
        argv: list[str | int] = [self._slack]
        p = self._prefix
        for r in reqs:
            keys += [p + "id:" + r.push_id, p + "once:" + (r.once_key or ""),
                     p + "cap:" + r.customer_id]
            argv += [r.push_id, r.now_ms, r.idempotency_ttl_ms,
                     0 if r.once_key is None else 1, r.once_ttl_ms, r.cap, r.cap_window_ms]
        return len(keys), [*keys, *argv]

    def admit(self, requests: Sequence[GuardRequest]) -> list[Decision]:
        """Decide each request in order; an admitted one is recorded before the next."""
        if not requests:
            return []
        chunks = [requests[i : i + self._chunk] for i in range(0, len(requests), self._chunk)]
        calls = [self._call_args(c) for c in chunks]
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            for i in todo:
                numkeys, keys_and_args = calls[i]
                pipe.evalsha(self._script.sha, numkeys, *keys_and_args)
            replies = pipe.execute(raise_on_error=False)
            retry: list[int] = []
            for i, reply in zip(todo, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    retry.append(i)  # nothing of this call ran: safe to run again
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    results[i] = reply
            if not retry:
                break
            self._script.sha = _text(self._client.script_load(_ADMIT_LUA))
            todo = retry
        else:
            raise RuntimeError("the guard script could not be loaded")
        return [_DECISIONS[int(code)] for reply in results for code in reply]
