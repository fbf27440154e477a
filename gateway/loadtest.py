"""Idle connections: how many push streams one gateway process holds, and what each costs.

``python -m gateway.loadtest -n 5000`` starts a private ``redis-server`` (unless
``--redis URL``) and a gateway process (``python -m gateway serve``, the production
entry, its own interpreter so its memory is its own), then from this process opens N
idle terminal connections with asyncio sockets (terminal ``LT<i>`` each with its own
token; SSE, or WebSocket with ``--mode ws``), each reading what it is sent. It reports
the gateway's resident memory (VmRSS from ``/proc``):

* ``rss_base`` after a warm-up (some connections opened and closed, so one-off
  allocations are in the baseline), ``rss_loaded`` with the N connections open;
  per connection = (loaded - base) / N;
* its CPU use while the N connections sit idle for ``--hold`` seconds (heartbeats only),
  and the heartbeats the clients got;
* the push latency with the N connections open: pushes written (``XADD`` + ``PUBLISH``,
  as the engine writes them) to sample terminals, time until each client has it;
* Redis clients used by the gateway (``INFO clients``): it does not grow with N.

The soft open-files limit of this process is raised to the hard limit (the gateway
raises its own). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from gateway.server import raise_nofile_limit
from gateway.tokens import TokenSigner

__all__ = ["Conn", "LoadResult", "main", "measure"]

_HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((_HOST, 0))
        port: int = s.getsockname()[1]
        return port


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Conn:
    """One idle client connection and what it has seen."""

    terminal_id: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    heartbeats: int = 0
    pushes: dict[str, float] = field(default_factory=dict)  # push_id -> arrival (monotonic)
    task: asyncio.Task[None] | None = None


@dataclass
class LoadResult:
    """What one load test measured."""

    mode: str
    connections: int
    opened: int
    open_s: float
    rss_start_kib: int
    rss_base_kib: int
    rss_loaded_kib: int
    rss_after_close_kib: int
    rss_reopened_kib: int
    per_connection_kib: float
    fds_loaded: int
    idle_cpu_percent: float
    hold_s: float
    heartbeat_s: float
    heartbeats_received: int
    push_latency_ms: list[float]
    redis_clients: int
    open_cpu_ms_per_connection: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Human-readable lines."""
        lat = self.push_latency_ms
        lat_s = (f"median {statistics.median(lat):.1f} ms, max {max(lat):.1f} ms "
                 f"over {len(lat)} pushes" if lat else "none measured")
        return "\n".join([
            f"mode {self.mode}: {self.opened}/{self.connections} idle connections open "
            f"in {self.open_s:.1f} s ({self.open_cpu_ms_per_connection:.2f} ms of gateway CPU "
            "each)",
            f"gateway RSS: start {self.rss_start_kib / 1024:.1f} MiB, base "
            f"{self.rss_base_kib / 1024:.1f} MiB, loaded {self.rss_loaded_kib / 1024:.1f} MiB, "
            f"after close {self.rss_after_close_kib / 1024:.1f} MiB, the same "
            f"{self.connections} opened again {self.rss_reopened_kib / 1024:.1f} MiB",
            f"per idle connection: {self.per_connection_kib:.1f} KiB",
            f"gateway fds with the load: {self.fds_loaded}; Redis clients: "
            f"{self.redis_clients}",
            f"idle CPU over {self.hold_s:.0f} s: {self.idle_cpu_percent:.2f} % of one core "
            f"(heartbeat {self.heartbeat_s:g} s; {self.heartbeats_received} heartbeats "
            "received)",
            f"push latency with the load: {lat_s}",
        ])


async def _read_sse(conn: Conn) -> None:
    buf = b""
    while True:
        chunk = await conn.reader.read(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            if b": hb" in block:
                conn.heartbeats += 1
            if b"event: push" in block:
                data = block.split(b"data: ", 1)[1].split(b"\n", 1)[0]
                conn.pushes[orjson.loads(data)["push_id"]] = time.monotonic()


async def _read_ws(conn: Conn) -> None:
    r = conn.reader
    while True:
        head = await r.readexactly(2)
        n = head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(await r.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await r.readexactly(8), "big")
        payload = await r.readexactly(n)
        if head[0] & 0x0F == 0x8:  # close
            return
        if head[0] & 0x0F == 0x9:  # ping: answer with a masked pong
            mask = os.urandom(4)
            body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            conn.writer.write(bytes([0x8A, 0x80 | len(payload)]) + mask + body)
            continue
        msg = orjson.loads(payload)
        if msg["type"] == "heartbeat":
            conn.heartbeats += 1
        elif msg["type"] == "push":
            conn.pushes[msg["push"]["push_id"]] = time.monotonic()


async def _open(port: int, terminal_id: str, token: str, mode: str) -> Conn:
    reader, writer = await asyncio.open_connection(_HOST, port, limit=1 << 20)
    path = f"/v1/terminals/{terminal_id}/pushes"
    if mode == "ws":
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        writer.write((f"GET {path} HTTP/1.1\r\nHost: {_HOST}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
                      ).encode())
    else:
        writer.write((f"GET {path} HTTP/1.1\r\nHost: {_HOST}\r\nAccept: text/event-stream\r\n"
                      f"Authorization: Bearer {token}\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    if status not in (b"200", b"101"):
        writer.close()
        raise RuntimeError(f"{terminal_id}: HTTP {status.decode()}")
    conn = Conn(terminal_id, reader, writer)
    if mode == "sse":
        await reader.readuntil(b": connected\n\n")
    conn.task = asyncio.create_task(_read_ws(conn) if mode == "ws" else _read_sse(conn))
    return conn


async def _open_many(port: int, signer: TokenSigner, ids: list[str], mode: str,
                     concurrency: int) -> tuple[list[Conn], list[str]]:
    sem = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def one(tid: str) -> Conn | None:
        async with sem:
            for attempt in range(3):
                try:
                    return await asyncio.wait_for(
                        _open(port, tid, signer.issue(tid, 3600), mode), 30)
                except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError) as e:
                    if attempt == 2:
                        errors.append(f"{tid}: {type(e).__name__}: {e}")
                    await asyncio.sleep(0.2)
            return None

    got = await asyncio.gather(*(one(t) for t in ids))
    return [c for c in got if c is not None], errors


async def _close_all(conns: list[Conn]) -> None:
    for c in conns:
        if c.task is not None:
            c.task.cancel()
        c.writer.close()
    for c in conns:
        with contextlib.suppress(Exception):
            await c.writer.wait_closed()


async def _run(pid: int, port: int, signer: TokenSigner, r: redis.Redis, n: int, mode: str,
               hold_s: float, heartbeat_s: float, rss_start: int, settle_s: float) -> LoadResult:
    notes: list[str] = []
    # warm-up: serve some connections once so one-off allocations land in the baseline
    warm, _ = await _open_many(port, signer, [f"W{i}" for i in range(min(100, n))], mode, 100)
    await asyncio.sleep(settle_s / 4)
    await _close_all(warm)
    await asyncio.sleep(settle_s)
    rss_base = rss_kib(pid)

    ids = [f"LT{i}" for i in range(n)]
    t0, cpu0 = time.monotonic(), cpu_s(pid)
    conns, errors = await _open_many(port, signer, ids, mode, 256)
    open_s = time.monotonic() - t0
    gw_open_cpu = 1000 * (cpu_s(pid) - cpu0) / max(1, len(conns))
    if errors:
        notes.append(f"{len(errors)} connections failed, e.g. {errors[:3]}")
    await asyncio.sleep(settle_s)
    rss_loaded = rss_kib(pid)
    fds = open_fds(pid)

    c0, w0 = cpu_s(pid), time.monotonic()
    hb0 = sum(c.heartbeats for c in conns)
    await asyncio.sleep(hold_s)
    idle_cpu = 100 * (cpu_s(pid) - c0) / (time.monotonic() - w0)
    heartbeats = sum(c.heartbeats for c in conns) - hb0

    # push latency with the load: one push at a time to sample terminals
    latencies: list[float] = []
    sample = random.Random(7).sample(conns, min(50, len(conns)))
    for i, c in enumerate(sample):
        pid_ = f"lt-{i}"
        key = f"push:terminal:{c.terminal_id}"
        data = orjson.dumps({"push_id": pid_, "customer_id": "13800000000",
                             "channel": f"terminal:{c.terminal_id}",
                             "content": {"kind": "help", "module": "loadtest"}})
        sent = time.monotonic()
        await asyncio.to_thread(_xadd_publish, r, key, data)
        while pid_ not in c.pushes and time.monotonic() - sent < 5:
            await asyncio.sleep(0.0005)
        if pid_ in c.pushes:
            latencies.append((c.pushes[pid_] - sent) * 1000)
    info: dict[str, Any] = r.info("clients")
    redis_clients = int(info["connected_clients"]) - 1  # this script's own

    await _close_all(conns)
    await asyncio.sleep(settle_s)
    rss_after = rss_kib(pid)
    # a second round on the same process: freed memory is reused, not leaked
    again, errors = await _open_many(port, signer, ids, mode, 256)
    await asyncio.sleep(settle_s)
    rss_reopened = rss_kib(pid)
    await _close_all(again)
    per = (rss_loaded - rss_base) / max(1, len(conns))
    return LoadResult(mode, n, len(conns), open_s, rss_start, rss_base, rss_loaded, rss_after,
                      rss_reopened, per, fds, idle_cpu, hold_s, heartbeat_s, heartbeats,
                      latencies, redis_clients, gw_open_cpu, notes)


def _xadd_publish(r: redis.Redis, key: str, data: bytes) -> None:
    pipe = r.pipeline(transaction=False)
    pipe.xadd(key, {"data": data})
    pipe.publish(key, data)
    pipe.execute()


@contextlib.contextmanager
def _private_redis(work: Path) -> Any:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not on PATH (or pass --redis URL)")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", _HOST, "--save", "",  # noqa: S603
                             "--appendonly", "no", "--dir", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://{_HOST}:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def measure(n: int, *, mode: str = "sse", redis_url: str | None = None, hold_s: float = 30.0,
            heartbeat_s: float = 15.0, settle_s: float = 2.0,
            log_file: Path | None = None) -> LoadResult:
    """Run one load test (see the module docstring); ``settle_s`` is each pause."""
    raise_nofile_limit(2 * n + 1024)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gw-load-")))
        url = redis_url or stack.enter_context(_private_redis(work))
        secret = secrets.token_urlsafe(32)
        port = _free_port()
        env = os.environ | {
            "TOUCHSTREAM_GATEWAY_REDIS_URL": url,
            "TOUCHSTREAM_GATEWAY_TOKEN_SECRET": secret,
            "TOUCHSTREAM_GATEWAY_HOST": _HOST,
            "TOUCHSTREAM_GATEWAY_PORT": str(port),
            "TOUCHSTREAM_GATEWAY_MAX_CONNECTIONS": str(n + 500),
            "TOUCHSTREAM_GATEWAY_HEARTBEAT_S": str(heartbeat_s),
            "TOUCHSTREAM_GATEWAY_LOG_LEVEL": "warning",
        }
        log_path = log_file or work / "gateway.log"
        log = stack.enter_context(log_path.open("wb"))
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"http://{_HOST}:{port}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the gateway did not start: "
                                       + log_path.read_text(errors="replace")[-2000:])
                time.sleep(0.1)
            rss_start = rss_kib(proc.pid)
            r = redis.Redis.from_url(url)
            try:
                return asyncio.run(_run(proc.pid, port, TokenSigner(secret.encode()), r, n,
                                        mode, hold_s, heartbeat_s, rss_start, settle_s))
            finally:
                r.close()
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    """``python -m gateway.loadtest``."""
    p = argparse.ArgumentParser(prog="python -m gateway.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--connections", type=int, default=5000)
    p.add_argument("--mode", choices=("sse", "ws"), default="sse")
    p.add_argument("--redis", help="use this Redis instead of a private redis-server")
    p.add_argument("--hold", type=float, default=30.0,
                   help="idle seconds measured for CPU (30: one poll_interval_s)")
    p.add_argument("--heartbeat", type=float, default=15.0, help="gateway heartbeat_s")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"ulimit -n: soft {soft}, hard {hard}", flush=True)
    result = measure(args.connections, mode=args.mode, redis_url=args.redis,
                     hold_s=args.hold, heartbeat_s=args.heartbeat)
    print(result.summary())
    for note in result.notes:
        print("note:", note)
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1))
    return 0 if result.opened == result.connections else 1


if __name__ == "__main__":
    raise SystemExit(main())
