"""The shared reader: one pub/sub listener per process wakes the connections it concerns.

Why not one ``XREAD BLOCK`` per connection: a blocked ``XREAD`` holds its Redis
connection, so thousands of idle terminals would need thousands of Redis connections
(and file descriptors on both sides). Why not one ``XREAD BLOCK`` over every stream:
the command would name every subscribed stream on each call (and be reissued whenever a
terminal connects), and it cannot span slots on a Redis Cluster.

So the work is split:

* **wake-up**: the engine ``PUBLISH``\\ es every push on the stream's own name. One
  pub/sub connection per gateway process (``PSUBSCRIBE push:terminal:*``) hears them and
  sets the :class:`asyncio.Event` of each :class:`Subscription` on that stream; an idle
  connection costs one event and two small tasks, and nothing in Redis;
* **data**: a woken connection reads its own stream with a non-blocking
  ``XREAD COUNT n STREAMS push:terminal:<id> <last id>`` on a small shared connection
  pool. Entries come from the stream, never from the pub/sub message, so every event
  has its stream id (the SSE ``id:``), and a reconnect with ``Last-Event-ID`` reads
  exactly what it missed, in order, once.

A lost notification costs latency, not data: each connection also re-reads every
``poll_interval_s``, and every connection is woken when the listener (re)subscribes.

Slow consumers: :meth:`Hub.notify` counts, per subscription, the pushes announced since
the connection last read its stream (its *lag*: pushes queued for it in Redis while it
is still sending earlier ones). When the lag passes ``max_queued`` the subscription is
closed as ``slow_consumer`` and its task cancelled; nothing is buffered per connection
in the gateway beyond the transport's write buffer, and a client that reconnects with
its last id loses nothing the stream still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

__all__ = ["Entry", "GatewayRedis", "Hub", "Subscription", "open_pubsub", "parse_xread"]

GatewayRedis = Redis | RedisCluster
"""The gateway's async client: one Redis, or a Redis Cluster (``redis_cluster``)."""

log = logging.getLogger("touchstream.gateway.hub")

Entry = tuple[str, dict[str, Any] | None]
"""A stream entry: its id and the push document (None if the entry is not a push)."""


class Subscription:
    """One connection's interest in one stream, and how far it has got.

    ``last_id`` is the id of the last entry sent (or skipped); ``wake`` is set by the hub
    when the stream may have something new; ``lag`` counts notifications since the last
    read; ``closed`` is the reason once closed; ``task`` is cancelled by :meth:`close`.
    A ``coalesce`` subscription (the ops console: it reads whatever is new on each wake,
    at most once a second) counts no lag and is never closed as a slow consumer.
    """

    __slots__ = ("closed", "coalesce", "key", "lag", "last_id", "task", "wake")

    def __init__(self, key: str, last_id: str, task: asyncio.Task[Any] | None = None, *,
                 coalesce: bool = False) -> None:
        self.key = key
        self.last_id = last_id
        self.wake = asyncio.Event()
        self.lag = 0
        self.closed: str | None = None
        self.task = task
        self.coalesce = coalesce

    def close(self, reason: str) -> bool:
        """Close with ``reason`` (the first reason wins); cancel the task. True if new."""
        if self.closed is not None:
            return False
        self.closed = reason
        self.wake.set()
        task = self.task
        if task is not None and not task.done():
            try:
                current = asyncio.current_task()
            except RuntimeError:
                current = None
            if task is not current:
                task.cancel()
        return True


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def parse_xread(reply: Any) -> list[Entry]:
    """The entries of a one-stream ``XREAD`` reply (RESP2 or RESP3 shape), oldest first.

    An entry without a ``data`` field, or whose ``data`` is not a JSON object, is
    returned with ``None`` so the reader still moves past it.
    """
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {key: [[(id, fields), ...]]}
        (entries,) = reply.values()
        if entries and isinstance(entries[0], list):
            entries = entries[0]
    else:  # RESP2: [[key, [(id, fields), ...]]]
        ((_, entries),) = reply
    out: list[Entry] = []
    for entry_id, fields in entries:
        data = fields.get(b"data", fields.get("data")) if isinstance(fields, dict) else None
        doc: dict[str, Any] | None = None
        if data is not None:
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                doc = parsed
        out.append((_text(entry_id), doc))
    return out


async def open_pubsub(redis: GatewayRedis) -> PubSub:
    """A pub/sub object of ``redis`` that ignores subscribe messages. A cluster client
    learns the slots first: its pub/sub picks a node by them (a ``PUBLISH`` reaches
    every node, so any node hears all of them)."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()
    return redis.pubsub(ignore_subscribe_messages=True)


class Hub:
    """Fans pub/sub wake-ups out to the subscriptions of this process.

    ``redis`` is the shared client (its pool serves the reads); the listener takes one
    more connection from it for ``PSUBSCRIBE <prefix><pattern>`` and ``SUBSCRIBE`` to
    ``channels`` (the ops console's wake-ups): one connection for every terminal and
    console of the process. Run :meth:`run` as a task for the life of the process.

    ``max_reads`` bounds the reads in flight; one more waits for a free slot, up to
    ``read_wait_s`` (then ``TimeoutError``, an ``OSError``). A single Redis needs no
    bound (its blocking pool makes a read wait for a connection). A cluster client's
    pool per node does not wait, it fails the read, so the gateway bounds it here.
    On a cluster a ``PUBLISH`` reaches every node, so the listener, on one node,
    hears the pushes of every slot.
    """

    def __init__(
        self,
        redis: GatewayRedis,
        *,
        prefix: str = "push:",
        pattern: str = "terminal:*",
        max_queued: int = 256,
        idle_ping_s: float = 30.0,
        reconnect_max_s: float = 5.0,
        max_reads: int | None = None,
        read_wait_s: float = 5.0,
        channels: tuple[str, ...] = (),
    ) -> None:
        self._redis = redis
        self.channels = channels
        self._reads = asyncio.Semaphore(max_reads) if max_reads else None
        self._read_wait_s = read_wait_s
        self.prefix = prefix
        self.pattern = prefix + pattern
        self.max_queued = max_queued
        self._idle_ping_s = idle_ping_s
        self._reconnect_max_s = reconnect_max_s
        self._subs: dict[bytes, set[Subscription]] = {}
        self.listening = False
        self.stats: Counter[str] = Counter()

    # --- subscriptions --------------------------------------------------------------

    def add(self, sub: Subscription) -> None:
        """Start waking ``sub`` on notifications for its stream."""
        self._subs.setdefault(sub.key.encode(), set()).add(sub)

    def discard(self, sub: Subscription) -> None:
        """Stop waking ``sub`` (no error if it was not added)."""
        k = sub.key.encode()
        subs = self._subs.get(k)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[k]

    def __len__(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def streams(self) -> int:
        """How many distinct streams have subscribers."""
        return len(self._subs)

    def notify(self, key: bytes | str) -> None:
        """A push was announced on ``key``: wake its subscriptions, close laggards."""
        k = key.encode() if isinstance(key, str) else key
        subs = self._subs.get(k)
        if not subs:
            return
        self.stats["notifications"] += 1
        for sub in list(subs):
            sub.wake.set()
            if sub.coalesce:
                continue
            sub.lag += 1
            if sub.lag > self.max_queued and sub.close("slow_consumer"):
                self.stats["slow_consumer"] += 1
                log.warning("closing a slow consumer on %s: %d pushes queued for it",
                            sub.key, sub.lag)

    def wake_all(self) -> None:
        """Wake every subscription (after the listener missed a while)."""
        for subs in self._subs.values():
            for sub in subs:
                sub.wake.set()

    def close_all(self, reason: str) -> int:
        """Close every subscription with ``reason``; how many were open."""
        n = 0
        for subs in list(self._subs.values()):
            for sub in list(subs):
                n += sub.close(reason)
        return n

    # --- Redis ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def read_slot(self) -> AsyncIterator[None]:
        """Hold one of the ``max_reads`` slots (if bounded) for a read of Redis."""
        if self._reads is None:
            yield
            return
        async with asyncio.timeout(self._read_wait_s):
            await self._reads.acquire()
        try:
            yield
        finally:
            self._reads.release()

    async def read(self, key: str, last_id: str, count: int) -> list[Entry]:
        """Up to ``count`` entries of ``key`` after ``last_id`` (non-blocking)."""
        async with self.read_slot():
            return parse_xread(await self._redis.xread({key: last_id}, count=count))

    async def tail_id(self, key: str) -> str:
        """The id of the newest entry of ``key`` (``0-0`` if it is empty or missing)."""
        async with self.read_slot():
            reply = await self._redis.xrevrange(key, "+", "-", count=1)
        return _text(reply[0][0]) if reply else "0-0"

    def _lost(self, exc: BaseException) -> None:
        if self.listening:
            log.warning("push listener lost Redis (%s); reconnecting", type(exc).__name__)
        self.listening = False
        self.stats["listener_errors"] += 1

    async def run(self) -> None:
        """Listen for notifications until cancelled; reconnect with backoff on errors."""
        backoff = 0.1
        while True:
            try:
                pubsub = await open_pubsub(self._redis)
            except (RedisError, OSError) as exc:
                self._lost(exc)
                await asyncio.sleep(backoff)
                backoff = min(self._reconnect_max_s, backoff * 2)
                continue
            try:
                await pubsub.psubscribe(self.pattern)
                if self.channels:
                    await pubsub.subscribe(*self.channels)
                if not self.listening:
                    log.info("listening for pushes on %s", self.pattern)
                self.listening = True
                backoff = 0.1
                self.wake_all()  # whatever was published while nobody listened
                loop = asyncio.get_running_loop()
                quiet_since = loop.time()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=min(5.0, self._idle_ping_s))
                    if msg is None:
                        if loop.time() - quiet_since >= self._idle_ping_s:
                            await pubsub.ping()  # fails if the connection is gone
                            quiet_since = loop.time()
                        continue
                    quiet_since = loop.time()
                    if msg.get("type") in ("pmessage", "message"):
                        self.notify(msg["channel"])
            except asyncio.CancelledError:
                self.listening = False
                raise
            except (RedisError, OSError) as exc:
                self._lost(exc)
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(backoff)
            backoff = min(self._reconnect_max_s, backoff * 2)
