"""Redis-backed profile store and guard store (shared by all workers and restarts).

Works with a single Redis (``redis.Redis``) and with Redis Cluster
(``redis.cluster.RedisCluster``, ``redis.cluster = true``): :func:`make_client` makes
the right client from the settings. Every multi-key operation stays inside one hash
slot: a guard script call only touches keys of one customer's hash tag, a profile
replace touches one key.

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

    Profiles stay JSON fields, not MessagePack, although touchstream reads them: they
    are not "values only touchstream reads back". Operators' own systems write them
    (``touchstream profiles load`` is one writer among others), operators edit single
    fields with ``HSET`` and read them with ``HGETALL``; a per-field hash is what makes
    that possible, and JSON is what outside clients read and write. The in-process
    cache holds decoded :class:`flows.model.Profile` objects, nothing serialised.

``guard:{<customer_id>}`` -- string, MessagePack map: the customer's guard record,
    ``{"once": {<once_key>: <until ms>}, "sent": [<admitted event time ms>, ...]}``
    (either part absent when empty; a once key that never expires has until
    ``FOREVER_MS`` = 2**62). Only touchstream reads it, so it is MessagePack (the Lua
    script uses Redis' built-in ``cmsgpack``). ``sent`` is trimmed to the cap window
    whenever a capped push is decided; a once entry is dropped from the record once
    the event time has passed its end by ``gc_slack_ms``. A record that cannot be
    decoded is treated as empty and overwritten.
``guard:{<customer_id>}:id:<push_id>`` -- string: the event time (ms, decimal) until
    which this push id is a duplicate. A single integer, not a record: kept in Redis'
    own integer form (what ``GET`` shows and ``INCR``-style tools understand); wrapping
    one number in MessagePack would add a layer and nothing else.

The ``{<customer_id>}`` hash tag puts all of one customer's guard keys in one cluster
slot. Guard values hold *event* times (the request's ``now_ms``), never the server
clock, so a replay decides exactly as the first run did and exactly as
:class:`state.guards.InMemoryGuardStore` does. Each guard key also carries a
wall-clock expiry (the longest remaining TTL or window in it plus ``gc_slack_ms``;
none while it holds a once key that never expires), only so that Redis forgets old
keys; it is not what decides.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeAlias

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, FieldT

from flows.codec import json_dumps, json_loads, unpack
from flows.metrics import REDIS_RTT
from flows.model import Profile, profile_from_dict
from flows.settings import RedisSettings
from state.guards import Decision, GuardRequest

__all__ = [
    "RedisClient",
    "RedisGuardStore",
    "RedisProfileStore",
    "connect",
    "make_client",
]

log = logging.getLogger(__name__)

RedisClient: TypeAlias = redis.Redis | RedisCluster
"""A single-Redis or a Redis Cluster client (both are ``redis-py`` sync clients)."""

_TEXT_FIELDS: Final = ("handset", "segment")
_JSON_FIELDS: Final = ("subscriptions", "configured", "prefs", "trials")
_TRUE: Final = frozenset({"1", "true"})
_FALSE: Final = frozenset({"0", "false"})


def connect(url: str, *, cluster: bool = False, **kwargs: Any) -> RedisClient:
    """A client for ``url``: ``redis.cluster.RedisCluster`` if ``cluster``, else ``redis.Redis``.

    A cluster client discovers the other nodes from the one in the URL.
    """
    if cluster:
        return RedisCluster.from_url(url, **kwargs)
    return redis.Redis.from_url(url, **kwargs)


def make_client(settings: RedisSettings, **kwargs: Any) -> RedisClient:
    """The client the ``redis`` settings ask for (``url`` must be set)."""
    if settings.url is None:
        raise ValueError("redis.url is not set")
    return connect(settings.url.get_secret_value(), cluster=settings.cluster, **kwargs)


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


# Replace one hash atomically without MULTI (one key, so it is cluster-safe).
_REPLACE_HASH_LUA: Final = (
    "redis.call('DEL', KEYS[1]) redis.call('HSET', KEYS[1], unpack(ARGV)) return 1"
)


_PROFILE_RTT = REDIS_RTT.labels("profile_get")


class RedisProfileStore:
    """Profiles in Redis hashes, read through a small bounded TTL cache.

    A cached profile (including "no profile") is served without a round trip for
    ``cache_ttl_s`` seconds, so a change made in Redis is seen within that time.
    ``put_many`` drops what it wrote from this store's cache. Safe to share between
    threads.
    """

    def __init__(
        self,
        client: RedisClient,
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
            t0 = time.perf_counter()
            replies = pipe.execute()
            _PROFILE_RTT.observe(time.perf_counter() - t0)
            for cid, raw in zip(missing, replies, strict=True):
                profile = self._decode(cid, raw)
                self._remember(profile, now)
                out[cid] = profile
        return out

    def prefetch(self, customer_ids: Iterable[str]) -> None:
        """Fetch the uncached profiles of these customers in one pipeline."""
        self.get_many(customer_ids)

    def put_many(self, profiles: Iterable[Profile]) -> int:
        """Replace whole profiles in one round trip; return how many.

        On a single Redis the whole batch is one MULTI/EXEC. On a cluster the keys
        live in different slots, so each profile is replaced atomically on its own (a
        one-key script: a reader never sees it half written or missing).
        """
        cluster = isinstance(self._client, RedisCluster)
        pipe = self._client.pipeline(transaction=not cluster)
        written: list[str] = []
        for p in profiles:
            key = self.key(p.customer_id)
            if cluster:
                args = [x for kv in encode_profile(p).items() for x in kv]
                pipe.execute_command("EVAL", _REPLACE_HASH_LUA, 1, key, *args)
            else:
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

# One call decides the requests of one or more customers (on a cluster: only customers
# whose hash tags share a slot). KEYS, per customer group: the guard record key, then
# one idempotency key per request of the group.
# ARGV[1] = gc slack ms, ARGV[2] = number of groups; then per group its request count,
# followed by 7 values per request:
#   now_ms, idempotency_ttl_ms, has_once (0/1), once_key, once_ttl_ms (-1 = for good),
#   cap, cap_window_ms
# Returns one code per request, in KEYS order: 0 ok, 1 duplicate, 2 cap, 3 once.
_ADMIT_LUA: Final = """
local slack = tonumber(ARGV[1])
local FOREVER = 4611686018427387904
local function ms(x) return string.format('%.0f', x) end
local out = {}
local k, a = 1, 3
for _ = 1, tonumber(ARGV[2]) do
  local n = tonumber(ARGV[a])
  a = a + 1
  local rec_key = KEYS[k]
  k = k + 1
  local once, sent = nil, nil
  local dirty = false
  local oldest = nil
  local window = 0
  for _ = 1, n do
    local idem_key = KEYS[k]
    local now = tonumber(ARGV[a])
    local idem_ttl = tonumber(ARGV[a+1])
    local has_once = ARGV[a+2] == '1'
    local once_key = ARGV[a+3]
    local once_ttl = tonumber(ARGV[a+4])
    local cap = tonumber(ARGV[a+5])
    local cap_window = tonumber(ARGV[a+6])
    k = k + 1
    a = a + 7
    if oldest == nil or now < oldest then oldest = now end
    local code = 0
    local seen = redis.call('GET', idem_key)
    if seen and tonumber(seen) > now then
      code = 1
    end
    if code == 0 and (has_once or cap > 0) and once == nil then
      once, sent = {}, {}
      local raw = redis.call('GET', rec_key)
      if raw then
        local ok, rec = pcall(cmsgpack.unpack, raw)
        if ok and type(rec) == 'table' then
          if type(rec.once) == 'table' then
            for key, u in pairs(rec.once) do
              if type(key) == 'string' and type(u) == 'number' then once[key] = u end
            end
          end
          if type(rec.sent) == 'table' then
            for _, t in ipairs(rec.sent) do
              if type(t) == 'number' then sent[#sent+1] = t end
            end
          end
        else
          dirty = true
        end
      end
    end
    if code == 0 and has_once then
      local u = once[once_key]
      if u and u > now then
        code = 3
      end
    end
    if code == 0 and cap > 0 then
      if cap_window > window then window = cap_window end
      local kept = {}
      for _, t in ipairs(sent) do
        if t > now - cap_window then kept[#kept+1] = t end
      end
      if #kept ~= #sent then dirty = true end
      sent = kept
      if #sent >= cap then
        code = 2
      else
        sent[#sent+1] = now
        dirty = true
      end
    end
    if code == 0 then
      redis.call('SET', idem_key, ms(now + idem_ttl), 'PX', ms(math.max(idem_ttl + slack, 1)))
      if has_once then
        if once_ttl < 0 then once[once_key] = FOREVER else once[once_key] = now + once_ttl end
        dirty = true
      end
    end
    out[#out+1] = code
  end
  if dirty then
    local rec = {}
    local horizon = oldest
    local forever = false
    local kept = {}
    local any = false
    for key, u in pairs(once) do
      if u + slack > oldest then
        kept[key] = u
        any = true
        if u >= FOREVER then forever = true elseif u > horizon then horizon = u end
      end
    end
    if any then rec.once = kept end
    if #sent > 0 then
      rec.sent = sent
      for _, t in ipairs(sent) do
        if t + window > horizon then horizon = t + window end
      end
    end
    if next(rec) == nil then
      redis.call('DEL', rec_key)
    elseif forever then
      redis.call('SET', rec_key, cmsgpack.pack(rec))
    else
      local px = math.max(horizon - oldest + slack, redis.call('PTTL', rec_key), 1)
      redis.call('SET', rec_key, cmsgpack.pack(rec), 'PX', ms(px))
    end
  end
end
return out
"""

_ADMIT_SHA: Final = hashlib.sha1(_ADMIT_LUA.encode("utf-8"), usedforsecurity=False).hexdigest()

_DECISIONS: Final[tuple[Decision, ...]] = ("ok", "duplicate", "cap", "once")

_Call: TypeAlias = tuple[list[int], list[EncodableT]]  # request indexes, EVALSHA args


class RedisGuardStore:
    """:class:`state.guards.GuardStore` in Redis: one Lua script decides a whole batch.

    All requests of one :meth:`admit` call go in one round trip (a pipeline of
    ``EVALSHA`` calls, each deciding up to ``chunk`` requests; on a cluster one call
    per hash slot involved, each sent to its node). Requests are grouped by customer
    (decisions of different customers are independent; each customer's requests keep
    their order). Each script call is atomic and decides its requests in order, so
    workers sharing the store never both take the last slot of a cap, both pass a
    once key, nor both admit one push id; another worker's call may run between two
    calls of one :meth:`admit`, which changes nothing about correctness. If Redis
    lost the script (restart, failover, ``SCRIPT FLUSH``) it is loaded again (on every
    primary of a cluster) and only the calls that did not run are sent again.
    """

    def __init__(
        self,
        client: RedisClient,
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

    def record_key(self, customer_id: str) -> str:
        """The key of a customer's guard record (its hash tag is the customer id)."""
        return f"{self._prefix}{{{customer_id}}}"

    def id_key(self, customer_id: str, push_id: str) -> str:
        """The idempotency key of a push id (in its customer's slot)."""
        return f"{self._prefix}{{{customer_id}}}:id:{push_id}"

    def record(self, customer_id: str) -> dict[str, Any]:
        """A customer's decoded guard record (``{}`` if none); for operators and tests.

        Needs a client that returns bytes (not ``decode_responses=True``).
        """
        raw = self._client.get(self.record_key(customer_id))
        if raw is None:
            return {}
        if isinstance(raw, str):
            raise TypeError("record() needs a client without decode_responses")
        doc = unpack(raw)
        return doc if isinstance(doc, dict) else {}

    def _plan(self, requests: Sequence[GuardRequest]) -> list[_Call]:
        """Group requests by customer (and slot on a cluster) into script calls."""
        cluster = isinstance(self._client, RedisCluster)
        by_customer: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_customer.setdefault(r.customer_id, []).append(i)
        buckets: dict[int, list[int]] = {}
        for cid, idx in by_customer.items():
            slot = key_slot(self.record_key(cid).encode("utf-8")) if cluster else 0
            buckets.setdefault(slot, []).extend(idx)
        calls: list[_Call] = []
        for flat in buckets.values():
            for start in range(0, len(flat), self._chunk):
                part = flat[start : start + self._chunk]
                calls.append((part, self._call_args(requests, part)))
        return calls

    def _call_args(self, requests: Sequence[GuardRequest], part: list[int]) -> list[EncodableT]:
        """EVALSHA arguments (sha, numkeys, keys, argv) for the requests ``part``."""
        groups: list[tuple[str, list[GuardRequest]]] = []  # runs of one customer
        for i in part:
            r = requests[i]
            if not groups or groups[-1][0] != r.customer_id:
                groups.append((r.customer_id, []))
            groups[-1][1].append(r)
        keys: list[EncodableT] = []
        argv: list[EncodableT] = [self._slack, len(groups)]
        for cid, reqs in groups:
            keys.append(self.record_key(cid))
            argv.append(len(reqs))
            for r in reqs:
                keys.append(self.id_key(cid, r.push_id))
                argv += [
                    r.now_ms,
                    r.idempotency_ttl_ms,
                    0 if r.once_key is None else 1,
                    r.once_key or "",
                    -1 if r.once_ttl_ms is None else r.once_ttl_ms,
                    r.cap,
                    r.cap_window_ms,
                ]
        return [_ADMIT_SHA, len(keys), *keys, *argv]

    def admit(self, requests: Sequence[GuardRequest]) -> list[Decision]:
        """Decide each request in order; an admitted one is recorded before the next."""
        if not requests:
            return []
        calls = self._plan(requests)
        out: list[Decision] = ["ok"] * len(requests)  # every index is set exactly once
        todo = list(range(len(calls)))
        for _attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            for c in todo:
                pipe.execute_command("EVALSHA", *calls[c][1])
            replies = pipe.execute(raise_on_error=False)
            retry: list[int] = []
            for c, reply in zip(todo, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    retry.append(c)  # nothing of this call ran: safe to run again
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    for i, code in zip(calls[c][0], reply, strict=True):
                        out[i] = _DECISIONS[int(code)]
            if not retry:
                break
            self._client.script_load(_ADMIT_LUA)  # on a cluster: on every primary
            todo = retry
        else:
            raise RuntimeError("the guard script could not be loaded")
        return out
