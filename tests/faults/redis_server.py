"""A redis-server a test owns and may stop and start again on the same port and data.

:class:`PersistentRedis` runs ``redis-server`` on a free port of 127.0.0.1 with its own
directory and append-only persistence (``--appendonly yes --appendfsync always
--save ""``): every write is on disk before Redis answers, so what was written before
:meth:`PersistentRedis.stop` is there after :meth:`PersistentRedis.start`. It never
talks to a Redis it did not start. Launch details follow ``bench/services.py``.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench.services import free_port, redis_exe

__all__ = ["PersistentRedis", "fast_client"]

START_TIMEOUT_S = 15.0


def fast_client(url: str) -> redis.Redis:
    """A client that gives up on a dead server at once (one reconnect, no backoff).

    The code under test does its own retrying; redis-py's default (ten retries with
    backoff, about 4 s per failed command) only makes a test slower.
    """
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1),
                                socket_connect_timeout=1.0, socket_timeout=5.0)


class PersistentRedis:
    """A private, persistent redis-server that can be stopped and restarted in place."""

    def __init__(self, work_dir: Path) -> None:
        self.dir = work_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server (same port, same directory) and wait for PING."""
        if self.running:
            raise RuntimeError("already running")
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [redis_exe(), "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
                 "--save", "", "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.starts += 1
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5,
                             retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:  # refused, or LOADING the append-only file
                    time.sleep(0.05)
        finally:
            client.close()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")

    def stop(self) -> None:
        """SIGTERM (Redis flushes its append-only file and exits) and wait for the exit."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
