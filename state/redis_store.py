"""Redis-backed profile store and guard store (shared by all workers and restarts).

Works with a single Redis (``redis.Redis``) and with Redis Cluster
(``redis.cluster.RedisCluster``, ``redis.cluster = true``): :func:`make_client` makes
the right client from the settings. On a cluster every multi-key operation stays inside
one hash slot: a guard script call only touches keys of one customer's hash tag, a
profile replace touches one key, and profiles are read with one ``HMGET`` per key (on a
single Redis a batch of them is read in one read-only script call).

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
    read (bad JSON, wrong types), or a key that is not a hash, is served as the empty
    profile and counted in :attr:`RedisProfileStore.bad_profiles`, never raised.

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

import functools
import hashlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeAlias
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.typing import EncodableT, FieldT

from flows.codec import json_dumps, json_loads, unpack
from flows.masking import mask_id
from flows.metrics import PROFILE_DEGRADED_READS, REDIS_RTT, REDIS_UNAVAILABLE
from flows.model import Profile, check_profile_customer_id, new_profile, profile_from_dict
from flows.settings import RedisSettings
from state.guards import Decision, GuardRequest

__all__ = [
    "PROFILE_FIELDS",
    "UNAVAILABLE",
    "ProfileDecoder",
    "RedisClient",
    "RedisGuardStore",
    "RedisHealth",
    "RedisProfileStore",
    "RedisQuotaStore",
    "client_options",
    "connect",
    "make_client",
    "redis_options",
    "run_scripts",
]

log = logging.getLogger(__name__)

RedisClient: TypeAlias = redis.Redis | RedisCluster
"""A single-Redis or a Redis Cluster client (both are ``redis-py`` sync clients)."""

_TEXT_FIELDS: Final = ("handset", "segment")
_JSON_FIELDS: Final = ("subscriptions", "configured", "prefs", "trials")
PROFILE_FIELDS: Final = (*_JSON_FIELDS, *_TEXT_FIELDS, "opt_out")
"""The fields of a profile hash touchstream reads (others are left to their writers)."""
_TRUE: Final = frozenset({"1", "true"})
_FALSE: Final = frozenset({"0", "false"})


def connect(url: str, *, cluster: bool = False, **kwargs: Any) -> RedisClient:
    """A client for ``url``: ``redis.cluster.RedisCluster`` if ``cluster``, else ``redis.Redis``.

    A cluster client discovers the other nodes from the one in the URL and reaches
    them with the same user, password and TLS options. ``kwargs`` go to redis-py;
    :func:`redis_options` makes the AUTH and TLS ones (``make_client`` does that from
    the settings). A ``rediss://`` URL is TLS, the server's certificate and host name
    verified against ``ssl_ca_certs`` (else the system's CAs).
    """
    if cluster:
        return RedisCluster.from_url(url, **kwargs)
    return redis.Redis.from_url(url, **kwargs)


def redis_options(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    tls_ca_file: Path | None = None,
    tls_cert_file: Path | None = None,
    tls_key_file: Path | None = None,
    names: str = "redis.",
) -> dict[str, Any]:
    """redis-py keyword arguments for AUTH (user, password) and TLS, checked against ``url``.

    The TLS files need a ``rediss://`` URL (they never turn TLS on by themselves:
    a plain ``redis://`` URL with them is refused rather than sent in clear), the
    client certificate and key go together, and each file must exist. A password in
    both the URL and the settings, or two different users, is refused (one place only;
    prefer the settings with ``password_file``). Errors name the setting (``names`` +
    its name: ``redis.`` for the engine's settings, ``redis_`` for the gateway's), never
    a secret value.
    """
    parts = urlsplit(url)
    opts: dict[str, Any] = {}
    if password is not None:
        if parts.password:
            raise ValueError("the Redis URL holds a password and so do the settings "
                             f"({names}password / {names}password_file): give it once")
        opts["password"] = password
    if username:
        if parts.username and unquote(parts.username) != username:
            raise ValueError(f"the Redis URL names a user and {names}username another one")
        opts["username"] = username
    files = {"ssl_ca_certs": ("tls_ca_file", tls_ca_file),
             "ssl_certfile": ("tls_cert_file", tls_cert_file),
             "ssl_keyfile": ("tls_key_file", tls_key_file)}
    given = {kw: (name, path) for kw, (name, path) in files.items() if path is not None}
    if given and parts.scheme != "rediss":
        raise ValueError(f"{', '.join(names + n for n, _ in given.values())} set but the "
                         "Redis URL is not rediss:// (TLS)")
    if (tls_cert_file is None) != (tls_key_file is None):
        raise ValueError(f"{names}tls_cert_file and {names}tls_key_file go together")
    for kw, (name, path) in given.items():
        if not Path(path).is_file():
            raise ValueError(f"{names}{name} {path} is not a readable file")
        opts[kw] = str(path)
    return opts


def client_options(settings: RedisSettings) -> dict[str, Any]:
    """:func:`redis_options` for the ``redis`` settings (``url`` must be set).

    The password is ``password``, else the first line of ``password_file`` (read
    here, each time a client is made).
    """
    if settings.url is None:
        raise ValueError("redis.url is not set")
    try:
        password = settings.auth_password()
    except IndexError:
        password = ""
    except OSError as exc:
        raise ValueError(f"redis.password_file {settings.password_file} cannot be read: "
                         f"{exc.strerror}") from None
    if password == "" and settings.password is None:
        raise ValueError(f"redis.password_file {settings.password_file} is empty")
    return redis_options(settings.url.get_secret_value(), username=settings.username,
                         password=password, tls_ca_file=settings.tls_ca_file,
                         tls_cert_file=settings.tls_cert_file,
                         tls_key_file=settings.tls_key_file)


def make_client(settings: RedisSettings, **kwargs: Any) -> RedisClient:
    """The client the ``redis`` settings ask for: URL, cluster, AUTH user/password, TLS.

    ``kwargs`` (other redis-py options) are added to :func:`client_options`.
    """
    url = settings.url.get_secret_value() if settings.url is not None else ""
    return connect(url, cluster=settings.cluster, **(client_options(settings) | kwargs))


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


class ProfileDecoder:
    """Profiles from the values of their hashes, checked as :func:`profile_from_dict` does.

    Many customers' hashes hold the same values (the same few subscriptions, segments,
    preferences), so the checked fields of the last ``memo_size`` distinct value tuples
    are kept: a repeat costs a lookup and a new Profile, not the JSON decoding and the
    checks (``bench/README.md``, "Reading profiles"). ``memo_size=0`` keeps nothing.
    A value that fails the checks is not kept: it raises every time. Safe to share
    between threads.
    """

    def __init__(self, memo_size: int = 4096) -> None:
        self._fields = functools.lru_cache(maxsize=memo_size)(_checked_fields)

    def decode(self, customer_id: str, values: Sequence[bytes | str | None]) -> Profile:
        """A profile from its hash's values in :data:`PROFILE_FIELDS` order (None: no field).

        What ``HMGET <key> <PROFILE_FIELDS...>`` returns; raise ValueError naming what
        is wrong. No field at all is the empty profile.
        """
        check_profile_customer_id(customer_id)  # the memo's profiles carry a placeholder
        t = self._fields(tuple(values))
        # prefs and trials are dicts: each profile gets its own, the memo's stay as they are
        return new_profile(customer_id, t.subscriptions, t.configured, t.handset, t.segment,
                           dict(t.prefs), t.opt_out, dict(t.trials))

    def decode_hash(self, customer_id: str, raw: Mapping[bytes | str, bytes | str]) -> Profile:
        """A profile from its whole hash (what ``HGETALL`` returns); other fields ignored."""
        h = {_text(k): v for k, v in raw.items()}
        return self.decode(customer_id, [h.get(f) for f in PROFILE_FIELDS])


def _checked_fields(values: tuple[bytes | str | None, ...]) -> Profile:
    """The fields of ``values`` as a Profile with a placeholder id (raises ValueError)."""
    if len(values) != len(PROFILE_FIELDS):
        raise ValueError(f"{len(values)} values for {len(PROFILE_FIELDS)} profile fields")
    doc: dict[str, Any] = {"customer_id": "-"}
    for f, v in zip(PROFILE_FIELDS, values, strict=True):
        if v is None:
            continue
        if f in _JSON_FIELDS:
            doc[f] = json_loads(v)  # DecodeError is a ValueError
        elif f == "opt_out":
            flag = _text(v).strip().lower()
            if flag in _TRUE:
                doc["opt_out"] = True
            elif flag in _FALSE:
                doc["opt_out"] = False
            else:
                raise ValueError("opt_out must be 0 or 1")
        else:
            doc[f] = _text(v)
    return profile_from_dict(doc)


# Replace one hash atomically without MULTI (one key, so it is cluster-safe).
_REPLACE_HASH_LUA: Final = (
    "redis.call('DEL', KEYS[1]) redis.call('HSET', KEYS[1], unpack(ARGV)) return 1"
)


# Read the profile hashes of a whole batch in one call (a single Redis only: on a
# cluster the keys are in many slots, and a script's keys must share one).
# KEYS: the profile keys; ARGV: the field names (PROFILE_FIELDS). Returns, per key, the
# HMGET reply, or the status WRONGTYPE if the key is not a hash; any other error fails
# the call.
_READ_PROFILES_LUA: Final = """
local out = {}
for i = 1, #KEYS do
  local r = redis.pcall('HMGET', KEYS[i], unpack(ARGV))
  if r.err then
    if string.sub(r.err, 1, 9) ~= 'WRONGTYPE' then return r end
    out[i] = {ok = 'WRONGTYPE'}
  else
    out[i] = r
  end
end
return out
"""
_READ_CHUNK: Final = 1000
"""Most keys one read script call takes (Redis runs nothing else while a script runs)."""
_READ_PROFILES_SHA: Final = hashlib.sha1(_READ_PROFILES_LUA.encode("utf-8"),
                                         usedforsecurity=False).hexdigest()

_PROFILE_RTT = REDIS_RTT.labels("profile_get")
_PROFILE_STALE = PROFILE_DEGRADED_READS.labels("stale")
_PROFILE_WAIT = PROFILE_DEGRADED_READS.labels("wait")


# --- outages ----------------------------------------------------------------------------

UNAVAILABLE: Final[tuple[type[Exception], ...]] = (
    redis.ConnectionError,  # refused, reset, LOADING after a restart, AUTH refused, pool full
    redis.TimeoutError,
    ClusterError,  # CLUSTERDOWN, MASTERDOWN, too many redirections
    TryAgainError,  # a slot being migrated
    ReadOnlyError,  # a replica answering during a failover
    RedisClusterException,  # no node reachable, slot not covered
)
"""What "Redis is unreachable for now" looks like: retrying later may succeed. Any other
error (a key of the wrong type, a script error) is not an outage and is raised."""

MISCONFIGURED: Final[tuple[type[Exception], ...]] = (AuthenticationError, AuthorizationError)
"""Wrong credentials or a user without the needed permissions: redis-py raises them as
``ConnectionError`` subclasses, but waiting will not mend them, so callers let them fail
the flow instead of holding effects for ever (catch these before :data:`UNAVAILABLE`)."""



class RedisHealth:
    """Whether a Redis client is reachable, so that callers stop calling it while it is not.

    :meth:`mark_down` (after a command raised one of :data:`UNAVAILABLE`) starts a daemon
    thread that sends ``PING`` every ``retry_interval_s`` until one succeeds; callers
    read :attr:`up` instead of paying the client's own retries on every call, and
    :meth:`wait_up` blocks until Redis answers again. Counts :attr:`errors` (failed
    commands and probes; also in ``touchstream_redis_unavailable_total`` with the label
    ``op``, default ``name``) and :attr:`outages`. Thread-safe.
    """

    def __init__(self, client: RedisClient, retry_interval_s: float = 0.5, *,
                 name: str = "redis", op: str | None = None) -> None:
        if retry_interval_s <= 0:
            raise ValueError("retry_interval_s must be positive")
        self._client = client
        self._interval = retry_interval_s
        self._name = name
        self._unavailable = REDIS_UNAVAILABLE.labels(name if op is None else op)
        self._cond = threading.Condition()
        self._up = True
        self._since = 0.0
        self._thread: threading.Thread | None = None
        self._closed = False
        self.errors = 0
        self.outages = 0

    @property
    def up(self) -> bool:
        """False from :meth:`mark_down` until a probe gets an answer."""
        return self._up

    def mark_down(self, exc: BaseException) -> None:
        """Record a failed command; on the first one of an outage start probing."""
        self._unavailable.inc()
        with self._cond:
            self.errors += 1
            if self._up:
                self._up = False
                self._since = time.monotonic()
                self.outages += 1
                log.warning("%s: Redis unreachable (%s: %s); probing every %.1f s",
                            self._name, type(exc).__name__, exc, self._interval)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._probe, daemon=True,
                                                name=f"touchstream-{self._name}-probe")
                self._thread.start()

    def wait_up(self, timeout: float | None = None) -> bool:
        """Block until Redis answers again (or ``timeout``); return :attr:`up`."""
        with self._cond:
            if not self._up and not self._closed:
                self._cond.wait(timeout)
            return self._up

    def _probe(self) -> None:
        while True:
            with self._cond:
                if not self._closed:
                    self._cond.wait(self._interval)
                if self._closed:
                    self._thread = None
                    self._cond.notify_all()
                    return
            try:
                self._client.ping()
            except UNAVAILABLE:
                self._unavailable.inc()
                with self._cond:
                    self.errors += 1
                continue
            except Exception as exc:  # a probe must not die on an odd reply
                log.debug("%s: probe failed: %s", self._name, type(exc).__name__)
                continue
            with self._cond:
                self._up = True
                self._thread = None
                self._cond.notify_all()
            log.warning("%s: Redis reachable again after %.1f s", self._name,
                        time.monotonic() - self._since)
            return

    def close(self) -> None:
        """Stop probing (waiters are released; :attr:`up` keeps its last value)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


_NO_READ_ONLY_EVAL: weakref.WeakSet[Any] = weakref.WeakSet()
"""Clients whose Redis has no ``EVALSHA_RO`` (before 7.0): read-only calls use ``EVALSHA``."""


def _unknown_command(reply: object) -> bool:
    return isinstance(reply, ResponseError) and str(reply).lower().startswith("unknown command")


def run_scripts(client: RedisClient, script: str, sha: str,
                calls: Sequence[Sequence[EncodableT]], *, read_only: bool = False) -> list[Any]:
    """Run ``EVALSHA sha <call...>`` for every call in one pipeline; the replies in order.

    ``read_only`` sends ``EVALSHA_RO`` (Redis ≥ 7): the script may not write, and its keys
    need only read permission (an ACL ``%R~`` pattern). A Redis without it (6.x) answers
    "unknown command": those calls (none of which ran) are sent again as ``EVALSHA``,
    and so is every later read-only call on this client (one warning says so).

    Each call is ``numkeys, *keys, *argv`` (on a cluster, its keys in one slot: the
    pipeline sends it to that slot's node). If Redis lost the script (restart,
    failover, ``SCRIPT FLUSH``) it is loaded again (on every primary of a cluster) and
    only the calls that did not run are sent again. A connection error is raised as is
    (calls before it may have run: scripts must be safe to run again); a script error
    reply is raised.
    """
    out: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for _attempt in range(3):
        ro = read_only and client not in _NO_READ_ONLY_EVAL
        cmd = "EVALSHA_RO" if ro else "EVALSHA"
        pipe = client.pipeline(transaction=False)
        for c in todo:
            pipe.execute_command(cmd, sha, *calls[c])
        replies = pipe.execute(raise_on_error=False)
        retry: list[int] = []
        load = False
        for c, reply in zip(todo, replies, strict=True):
            if isinstance(reply, NoScriptError):
                retry.append(c)  # nothing of this call ran: safe to run again
                load = True
            elif ro and _unknown_command(reply):
                retry.append(c)  # nor of this one
                if client not in _NO_READ_ONLY_EVAL:
                    _NO_READ_ONLY_EVAL.add(client)
                    log.warning("Redis has no EVALSHA_RO (it is older than 7.0): read-only "
                                "scripts run with EVALSHA on this client")
            elif isinstance(reply, Exception):
                raise reply
            else:
                out[c] = reply
        if not retry:
            return out
        if load:
            client.script_load(script)  # on a cluster: on every primary
        todo = retry
    raise RuntimeError("a Lua script could not be loaded")


class RedisProfileStore:
    """Profiles in Redis hashes, read through a small bounded TTL cache.

    A cached profile (including "no profile") is served without a round trip for
    ``cache_ttl_s`` seconds, so a change made in Redis is seen within that time.
    ``put_many`` drops what it wrote from this store's cache. Safe to share between
    threads.

    **While Redis is unreachable** (any of :data:`UNAVAILABLE`) reads do not fail:

    * a customer still in the cache (fresh or expired: an expired entry stays until
      the LRU bound evicts it) gets that last known profile, counted in
      :attr:`stale_served`;
    * a customer never read before (or evicted) has no profile to serve. The read
      **waits** until Redis answers again (back-pressure on that batch: the worker
      stops reading until then; nothing is lost, Kafka keeps the input), counted in
      :attr:`unreachable_waits`. It does not guess an empty profile: that would clear
      an opt-out and push to a customer who refused pushes.

    After the first failed read, Redis is not called again until a background
    ``PING`` every ``retry_interval_s`` gets an answer (:class:`RedisHealth`), so the
    flow does not pay the client's connection retries on every batch. ``put_many`` is
    a write an operator asked for: it raises as before. In Prometheus:
    ``touchstream_profile_degraded_reads_total{outcome="stale"|"wait"}`` (per batch) and
    ``touchstream_redis_unavailable_total{op="profiles"}``.

    **Reads**: on a single Redis the uncached profiles of a batch are read in one
    read-only script call (``EVALSHA_RO``: ``HMGET`` of :data:`PROFILE_FIELDS` per
    key); on a cluster, and for one profile, with a pipeline of ``HMGET``. A key that
    is not a hash counts as an unreadable profile. Hashes are decoded by a
    :class:`ProfileDecoder` that remembers the last ``decode_memo`` distinct value
    tuples (0: none).
    """

    def __init__(
        self,
        client: RedisClient,
        cache_ttl_s: float = 5.0,
        now: Callable[[], float] = time.monotonic,
        *,
        prefix: str = "profile:",
        max_cached: int = 100_000,
        retry_interval_s: float = 0.5,
        decode_memo: int = 4096,
    ) -> None:
        self._client = client
        self._decoder = ProfileDecoder(decode_memo)
        self._ttl = cache_ttl_s
        self._now = now
        self._prefix = prefix
        self._max = max_cached
        self._cache: OrderedDict[str, tuple[float, Profile]] = OrderedDict()
        self._lock = threading.Lock()
        self.health = RedisHealth(client, retry_interval_s, name="profiles")
        self._retry_s = retry_interval_s
        self.bad_profiles = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.stale_served = 0
        self.unreachable_waits = 0

    def key(self, customer_id: str) -> str:
        """The Redis key of a customer's profile hash."""
        return self._prefix + customer_id

    def stats(self) -> dict[str, int]:
        """Cache and outage counters (``redis_errors``: failed reads and probes)."""
        return {"cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
                "bad_profiles": self.bad_profiles, "stale_served": self.stale_served,
                "unreachable_waits": self.unreachable_waits,
                "redis_errors": self.health.errors}

    # -- cache --------------------------------------------------------------------

    def _fresh(self, customer_id: str, now: float) -> Profile | None:
        """The cached profile if it has not expired (now the most recent), else None.
        The caller holds the lock and counts the hit or miss."""
        entry = self._cache.get(customer_id)
        if entry is None or entry[0] <= now:
            return None
        self._cache.move_to_end(customer_id)
        return entry[1]

    def _cached(self, customer_id: str, now: float) -> Profile | None:
        with self._lock:
            hit = self._fresh(customer_id, now)
            if hit is None:
                self.cache_misses += 1
            else:
                self.cache_hits += 1
            return hit

    def _stale(self, customer_id: str) -> Profile | None:
        """The last profile read for this customer, however old (None if never/evicted)."""
        with self._lock:
            entry = self._cache.get(customer_id)
            if entry is None:
                return None
            self.stale_served += 1
            return entry[1]

    def _put(self, entries: Iterable[tuple[str, float, Profile]]) -> None:
        """Cache these (customer id, expiry, profile) entries as the most recent ones,
        then evict the least recent past the size bound. The caller holds the lock."""
        if self._ttl <= 0 or self._max <= 0:
            return  # the cache is off
        cache = self._cache
        for cid, expiry, profile in entries:
            cache[cid] = (expiry, profile)
            cache.move_to_end(cid)
        while len(cache) > self._max:
            cache.popitem(last=False)

    def _decode(self, customer_id: str, values: Sequence[bytes | str | None] | None) -> Profile:
        try:
            if values is None:
                raise ValueError("the key is not a hash")
            return self._decoder.decode(customer_id, values)
        except ValueError as exc:
            with self._lock:
                self.bad_profiles += 1
            log.warning("unreadable profile hash %s%s: %s", self._prefix, mask_id(customer_id),
                        exc)
            return Profile(customer_id)

    def _fetch(self, customer_ids: Sequence[str]) -> list[Sequence[bytes | str | None] | None]:
        """Per id, its hash's :data:`PROFILE_FIELDS` values, or None if the key is not a
        hash. One script call for many ids on a single Redis, else a pipeline of
        ``HMGET`` (raises if Redis is down, and on any other error reply)."""
        keys = [self.key(cid) for cid in customer_ids]
        t0 = time.perf_counter()
        if len(keys) > 1 and not isinstance(self._client, RedisCluster):
            parts = [keys[i : i + _READ_CHUNK] for i in range(0, len(keys), _READ_CHUNK)]
            calls: list[list[EncodableT]] = [[len(p), *p, *PROFILE_FIELDS] for p in parts]
            replies = run_scripts(self._client, _READ_PROFILES_LUA, _READ_PROFILES_SHA,
                                  calls, read_only=True)
            out: list[Sequence[bytes | str | None] | None] = [
                r if isinstance(r, list) else None for reply in replies for r in reply]
        else:  # one id, or keys in many cluster slots (a script's keys share one slot)
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, PROFILE_FIELDS)
            out = []
            for r in pipe.execute(raise_on_error=False):
                if isinstance(r, Exception):
                    if not str(r).startswith("WRONGTYPE"):
                        raise r
                    out.append(None)
                else:
                    out.append(r)
        _PROFILE_RTT.observe(time.perf_counter() - t0)
        return out

    def _load(self, customer_ids: Sequence[str], now: float) -> dict[str, Profile]:
        """Read uncached profiles; while Redis is down serve stale ones, wait for the rest."""
        out: dict[str, Profile] = {}
        todo = customer_ids
        waited = False
        while True:
            if self.health.up:
                try:
                    replies = self._fetch(todo)
                except MISCONFIGURED:
                    raise
                except UNAVAILABLE as exc:
                    self.health.mark_down(exc)
                else:
                    read = [(cid, now + self._ttl, self._decode(cid, values))
                            for cid, values in zip(todo, replies, strict=True)]
                    with self._lock:  # once per batch (out may hold stale ones too)
                        self._put(read)
                    out.update((cid, profile) for cid, _, profile in read)
                    return out
            rest: list[str] = []
            for cid in todo:
                stale = self._stale(cid)
                if stale is None:
                    rest.append(cid)
                else:
                    out[cid] = stale
            if len(rest) < len(todo):  # once per batch, not per profile
                _PROFILE_STALE.inc(len(todo) - len(rest))
            if not rest:
                return out
            todo = rest
            if not waited:
                waited = True
                with self._lock:
                    self.unreachable_waits += 1
                _PROFILE_WAIT.inc()
                log.warning("profiles: %d customer(s) never read before; waiting for Redis",
                            len(rest))
            self.health.wait_up(self._retry_s)

    # -- ProfileStore ---------------------------------------------------------------

    def get(self, customer_id: str) -> Profile:
        """The customer's profile, or the empty profile (also for an unreadable hash).

        While Redis is unreachable: the last known profile, or wait (see the class).
        """
        now = self._now()
        hit = self._cached(customer_id, now)
        if hit is not None:
            return hit
        return self._load([customer_id], now)[customer_id]

    def get_many(self, customer_ids: Iterable[str]) -> dict[str, Profile]:
        """Profiles for many customers; all cache misses are fetched in one round trip.

        The cache is looked up under one lock for the whole batch (the engine calls
        this for every batch with clicks, and most of its lookups are hits).
        """
        ids = list(customer_ids)  # an iterator is drained before the lock is taken
        now = self._now()
        out: dict[str, Profile] = {}
        missing: dict[str, None] = {}  # ordered set
        with self._lock:
            fresh = self._fresh
            for cid in ids:
                if cid in out or cid in missing:
                    continue
                hit = fresh(cid, now)
                if hit is None:
                    missing[cid] = None
                else:
                    out[cid] = hit
            self.cache_hits += len(out)
            self.cache_misses += len(missing)
        if missing:
            out.update(self._load(list(missing), now))
        return out

    def prefetch(self, customer_ids: Iterable[str]) -> dict[str, Profile]:
        """Fetch the uncached profiles of these customers in one round trip; return
        every one of them by customer id (see :meth:`get_many`)."""
        return self.get_many(customer_ids)

    def remember(self, profiles: Mapping[str, Profile]) -> None:
        """Keep profiles the flow read elsewhere for this batch (the live router, maybe
        in another process) as the last known ones, for while Redis is unreachable.

        They enter the cache already expired, so :meth:`get` still reads Redis for them
        and the cache's age bound holds; a fresh entry is left as it is. Without them, a
        shard on another process than the router would know nothing of a customer whose
        clicks it handled, and a timer's rule would wait for Redis during an outage.
        """
        if not profiles or self._ttl <= 0 or self._max <= 0:
            return
        now = self._now()
        with self._lock:
            cache = self._cache
            stale = [(cid, now, profile) for cid, profile in profiles.items()
                     if (entry := cache.get(cid)) is None or entry[0] <= now]
            self._put(stale)  # a fresh entry is fresher than anything handed in

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

    def close(self) -> None:
        """Stop probing an unreachable Redis (the client is the caller's to close)."""
        self.health.close()


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

    A connection error is raised (the push sink holds the batch and asks again, see
    ``connectors.redis_push``): calls that ran before the connection dropped have
    recorded their push ids, so asking again answers ``duplicate`` for them and
    counts nothing twice against a cap or a once key.
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
        """EVALSHA arguments after the sha (numkeys, keys, argv) for the requests ``part``."""
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
        return [len(keys), *keys, *argv]

    def admit(self, requests: Sequence[GuardRequest]) -> list[Decision]:
        """Decide each request in order; an admitted one is recorded before the next."""
        if not requests:
            return []
        calls = self._plan(requests)
        out: list[Decision] = ["ok"] * len(requests)  # every index is set exactly once
        replies = run_scripts(self._client, _ADMIT_LUA, _ADMIT_SHA, [c[1] for c in calls])
        for (idx, _args), reply in zip(calls, replies, strict=True):
            for i, code in zip(idx, reply, strict=True):
                out[i] = _DECISIONS[int(code)]
        return out


# KEYS[1] = the campaign's quota set; ARGV[1] = limit, ARGV[2] = token.
# Returns 1 if the token holds a place (already or now), 0 if the quota is full.
_QUOTA_LUA: Final = """
if redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[2])
return 1
"""

_QUOTA_SHA: Final = hashlib.sha1(_QUOTA_LUA.encode("utf-8"), usedforsecurity=False).hexdigest()


class RedisQuotaStore:
    """:class:`state.guards.QuotaStore` in Redis, shared by every worker and process.

    ``quota:{<campaign>}`` is a set of the push ids that took a place; one Lua script
    checks membership, size and adds atomically, so however many workers ask at once,
    the set never grows past the limit, and asking again for a push id already in it
    answers yes without taking a second place. The set has no expiry (a campaign's
    prizes are counted for good; delete the key to reset a campaign). Connection errors
    are raised to the caller.
    """

    def __init__(self, client: RedisClient, prefix: str = "quota:") -> None:
        self._client = client
        self._prefix = prefix

    def key(self, campaign: str) -> str:
        """The key of a campaign's quota set."""
        return f"{self._prefix}{{{campaign}}}"

    def take(self, campaign: str, limit: int, token: str) -> bool:
        """Take a place for ``token`` unless ``limit`` are taken (idempotent per token)."""
        args: list[EncodableT] = [1, self.key(campaign), limit, token]
        (reply,) = run_scripts(self._client, _QUOTA_LUA, _QUOTA_SHA, [args])
        return int(reply) == 1

    def taken(self, campaign: str) -> int:
        """How many places of ``campaign`` are taken."""
        return int(self._client.scard(self.key(campaign)))

    def restore(self, campaign: str, tokens: Sequence[str]) -> None:
        """Put back tokens taken before a restart (normally still in Redis: a no-op)."""
        if tokens:
            self._client.sadd(self.key(campaign), *tokens)
