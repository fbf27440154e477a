"""Fixture: a private three-node Redis Cluster (no replicas) for the state tests.

``redis_cluster_server`` (session scope) starts three ``redis-server --cluster-enabled
yes`` on free ports of 127.0.0.1 (the cluster bus on free ports too), joins them with
``redis-cli --cluster create`` and waits until every node reports ``cluster_state:ok``;
it yields ``redis://127.0.0.1:<port of node 1>/0``. It never talks to a Redis it did
not start. It is skipped (with the reason) only when ``redis-cli`` is not installed;
a missing ``redis-server`` fails like the single-server fixture does.
``redis_cluster_url`` (function scope) flushes every primary before each test.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

_NODES = 3
_TIMEOUT_S = 30.0


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _logs(workdir: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in workdir.glob("*.log")
    )


def _wait(pred: Callable[[], bool], what: str, workdir: Path) -> None:
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    pytest.fail(f"Redis Cluster: {what} within {_TIMEOUT_S}s\n{_logs(workdir)}")


def _cluster_ok(ports: list[int]) -> bool:
    for port in ports:
        c = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        try:
            info = c.cluster("info")
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) < len(
                ports
            ):
                return False
        finally:
            c.close()
    return True


@pytest.fixture(scope="session")
def redis_cluster_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private three-primary Redis Cluster; yields the URL of one node (db 0)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not on PATH (`apt-get install redis-server`)")
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli is not on PATH: cannot create a Redis Cluster "
                    "(`apt-get install redis-tools`)")
    workdir = tmp_path_factory.mktemp("redis-cluster")
    ports = _free_ports(2 * _NODES)
    nodes, buses = ports[:_NODES], ports[_NODES:]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port, bus in zip(nodes, buses, strict=True):
            with (workdir / f"node-{port}.log").open("wb") as log:
                procs.append(subprocess.Popen(
                    [server, "--port", str(port), "--cluster-port", str(bus),
                     "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
                     "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no",
                     "--dir", str(workdir), "--daemonize", "no"],
                    stdout=log, stderr=subprocess.STDOUT,
                ))

        def all_ping() -> bool:
            for port in nodes:
                c = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
                try:
                    c.ping()
                finally:
                    c.close()
            return True

        _wait(all_ping, "the nodes did not answer PING", workdir)
        create = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=_TIMEOUT_S, check=False,
        )
        if create.returncode != 0:
            pytest.fail("redis-cli --cluster create failed:\n"
                        + create.stdout.decode(errors="replace")[-2000:]
                        + create.stderr.decode(errors="replace")[-2000:])
        _wait(lambda: _cluster_ok(nodes), "the cluster did not reach state ok", workdir)
        yield f"redis://127.0.0.1:{nodes[0]}/0"
    finally:
        for proc in procs:
            _stop(proc)


@pytest.fixture
def redis_cluster_url(redis_cluster_server: str) -> str:
    """The cluster's URL with every primary flushed (only ever our own cluster)."""
    client = RedisCluster.from_url(redis_cluster_server)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_cluster_server
