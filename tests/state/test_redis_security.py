"""Redis AUTH (ACL user + password) and TLS, against redis-servers this module starts.

Each server is started with an ACL file in which the ``default`` user is off, and:

* ``touchstream`` -- the engine: exactly :data:`ENGINE_ACL` (the README's line);
* ``touchstream-loader`` -- ``touchstream profiles load`` and demo traffic: :data:`LOADER_ACL`;
* ``admin`` -- the test itself (set-up, ``ACL LOG``), all commands.

The engine's real Redis paths (profile reads, guard admission with its Lua script,
the push sink, ``read_channel``, the ops feed and ``write_rules``) run as
``touchstream`` through :func:`state.redis_store.make_client` and the sinks'
``from_settings`` configs, then ``ACL LOG`` must be empty: nothing the engine does was
denied, so the line is sufficient; the test then shows what it denies. TLS: a
throwaway CA, server and client certificates made with the ``openssl`` CLI; the
same paths run over ``rediss://`` (server verified against the CA, host name
checked), with mutual TLS, and on a three-node TLS Redis Cluster. Every server is
ours, on a free port of 127.0.0.1; the shared session server is not touched.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from bench.services import free_port
from connectors.ops_feed import OpsFeedConfig, OpsFeedOutput, write_rules
from connectors.redis_push import RedisPushConfig, RedisPushOutput, read_channel
from connectors.rules_sources import RedisRules
from flows.codec import json_loads
from flows.model import Alert, Profile, Push, PushGuard
from flows.rules import load_default_rules
from flows.settings import RedisSettings
from gateway.app import make_redis
from state.guards import GuardRequest
from state.redis_store import (
    RedisClient,
    RedisGuardStore,
    RedisProfileStore,
    RedisQuotaStore,
    client_options,
    make_client,
    redis_options,
)
from tests.gateway.conftest import SSE, running_gateway
from tests.gateway.conftest import settings_for as gateway_settings

pytestmark = pytest.mark.integration

ENGINE_ACL = (
    "resetkeys %R~profile:* ~guard:* ~push:* ~ops:* ~quota:* %R~touchstream:rules "
    "resetchannels &push:* &ops:* &touchstream:rules "
    "-@all +ping +hmget +get +set +del +exists +pttl +evalsha +evalsha_ro "
    "+script|load +xadd +xread +expire +publish +sadd +sismember +scard "
    "+subscribe +unsubscribe"
)
"""The engine's ACL rules (without ``on`` and the password), as the README gives them."""

CLUSTER_EXTRA_ACL = "+cluster|slots +command"
"""What redis-py's cluster client needs on top (topology and key positions)."""

LOADER_ACL = (
    "resetkeys ~profile:* resetchannels -@all +ping +del +hset +multi +exec +eval"
)
"""``touchstream profiles load`` (and the demo traffic's profiles): replace profile hashes."""

GATEWAY_ACL = (
    "resetkeys %R~push:* %R~ops:* resetchannels &push:terminal:* &ops:events -@all +ping +get "
    "+xread +xrevrange +subscribe +psubscribe +unsubscribe +punsubscribe"
)
"""The push gateway: reads push streams and the ops feed, listens for wake-ups; writes nothing.

Redis matches a PSUBSCRIBE pattern literally against the user's channel patterns, so
``&push:terminal:*`` must be spelled as the gateway subscribes (``push:*`` does not do).
"""

SETINFO_ACL = "+client|setinfo"
"""Redis >= 7.2: redis-py names itself on connect (it ignores a refusal, ACL LOG does not)."""

T0 = 1_700_000_000_000
START_TIMEOUT_S = 15.0


def _sha(pw: str) -> str:
    return hashlib.sha256(pw.encode()).hexdigest()


@dataclass
class Secrets:
    """Throwaway passwords, and files holding them as an operator would."""

    admin: str
    engine: str
    loader: str
    gateway: str
    engine_file: Path
    loader_file: Path
    gateway_file: Path


@pytest.fixture(scope="module")
def pw(tmp_path_factory: pytest.TempPathFactory) -> Secrets:
    d = tmp_path_factory.mktemp("secrets")
    admin, engine, loader, gateway = (secrets.token_urlsafe(24) for _ in range(4))
    s = Secrets(admin, engine, loader, gateway, d / "engine.pw", d / "loader.pw",
                d / "gateway.pw")
    for pw, f in ((s.engine, s.engine_file), (s.loader, s.loader_file),
                  (s.gateway, s.gateway_file)):
        f.write_text(pw + "\n")
        f.chmod(0o600)
    return s


def _server_version(exe: str) -> tuple[int, int]:
    out = subprocess.run([exe, "--version"], capture_output=True, timeout=10,
                         check=True).stdout.decode()
    major, minor = out.split("v=", 1)[1].split(".")[:2]
    return int(major), int(minor)


def _acl_file(path: Path, pw: Secrets, exe: str, *, cluster: bool) -> Path:
    extra = f" {CLUSTER_EXTRA_ACL}" if cluster else ""
    if _server_version(exe) >= (7, 2):
        extra += f" {SETINFO_ACL}"
    path.write_text(
        "user default off resetkeys resetchannels -@all\n"
        f"user admin on #{_sha(pw.admin)} ~* &* +@all\n"
        f"user touchstream on #{_sha(pw.engine)} {ENGINE_ACL}{extra}\n"
        f"user touchstream-loader on #{_sha(pw.loader)} {LOADER_ACL}{extra}\n"
        f"user touchstream-gateway on #{_sha(pw.gateway)} {GATEWAY_ACL}{extra}\n"
    )
    return path


# --- certificates ----------------------------------------------------------------------


@dataclass
class Certs:
    """A throwaway CA with a server and a client certificate, and an unrelated CA."""

    ca: Path
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path
    other_ca: Path


def _openssl(cwd: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, timeout=30,
                          check=False)
    if done.returncode != 0:
        pytest.fail(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace')}")


def _make_ca(d: Path, name: str) -> None:
    _openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
             "-subj", f"/CN=touchstream test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _make_leaf(d: Path, name: str, cn: str, ext: str) -> None:
    _openssl(d, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
    (d / f"{name}.ext").write_text(ext)
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH: cannot make test certificates "
                    "(`apt-get install openssl`)")
    d = tmp_path_factory.mktemp("tls")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(d, "server", "localhost",
               "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
               "extendedKeyUsage=serverAuth,clientAuth\n")
    _make_leaf(d, "client", "touchstream",
               "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    return Certs(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
                 d / "client.key", d / "other-ca.crt")


# --- servers ---------------------------------------------------------------------------


@dataclass
class Server:
    """One redis-server of ours: its plain and TLS ports (0 = none)."""

    proc: subprocess.Popen[bytes]
    port: int
    tls_port: int
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _tls_args(certs: Certs, clients: str) -> list[str]:
    return ["--tls-cert-file", str(certs.server_crt), "--tls-key-file", str(certs.server_key),
            "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", clients]


def _admin(port: int, pw: Secrets, certs: Certs | None = None, **kw: Any) -> redis.Redis:
    if certs is None:
        return redis.Redis(host="127.0.0.1", port=port, username="admin", password=pw.admin,
                           socket_connect_timeout=1, **kw)
    return redis.Redis(host="127.0.0.1", port=port, username="admin", password=pw.admin,
                       ssl=True, ssl_ca_certs=str(certs.ca), ssl_certfile=str(certs.client_crt),
                       ssl_keyfile=str(certs.client_key), socket_connect_timeout=1, **kw)


class StartError(RuntimeError):
    """A server of ours did not come up (the message has its log's tail)."""


def _wait(pred: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise StartError(f"{what} within {START_TIMEOUT_S} s:\n"
                     f"{log.read_text(errors='replace')[-2000:]}")


def _start(workdir: Path, pw: Secrets, *, tls: list[str] | None = None, plain: bool = True,
           extra: tuple[str, ...] = (), cluster: bool = False,
           certs: Certs | None = None, bind: tuple[str, ...] = ("127.0.0.1",)) -> Server:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not on PATH (`apt-get install redis-server`)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port() if plain else 0
    tls_port = free_port() if tls is not None else 0
    acl = _acl_file(workdir / "users.acl", pw, exe, cluster=cluster)
    log = workdir / "redis.log"
    args = [exe, "--port", str(port), "--bind", *bind, "--save", "", "--appendonly",
            "no", "--dir", str(workdir), "--daemonize", "no", "--aclfile", str(acl), *extra]
    if tls is not None:
        args += ["--tls-port", str(tls_port), *tls]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(proc, port, tls_port, log)

    def up() -> bool:
        if proc.poll() is not None:
            raise StartError(f"redis-server exited:\n{log.read_text(errors='replace')[-2000:]}")
        c = _admin(port, pw) if plain else _admin(tls_port, pw, certs)
        try:
            return bool(c.ping())
        finally:
            c.close()

    try:
        _wait(up, "redis-server did not answer PING", log)
    except BaseException:
        server.stop()
        raise
    return server


def start(workdir: Path, pw: Secrets, **kw: Any) -> Server:
    """:func:`_start`, failing the test if the server does not come up."""
    try:
        return _start(workdir, pw, **kw)
    except StartError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pw: Secrets,
           certs: Certs) -> Iterator[Server]:
    """ACL users, plain TCP and TLS (client certificate optional) on one server.

    A redis-server built without TLS refuses ``--tls-port``; then the server runs
    without it and the TLS tests skip, saying so.
    """
    d = tmp_path_factory.mktemp("redis-acl")
    try:
        # also on 127.0.0.2, an address the server's certificate does not name
        s = _start(d, pw, tls=_tls_args(certs, "optional"), bind=("127.0.0.1", "127.0.0.2"))
    except StartError as exc:
        if "tls" not in str(exc).lower():
            pytest.fail(str(exc))
        s = start(d / "no-tls", pw)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tls_supported(server: Server) -> bool:
    """Whether this redis-server was built with TLS (Debian's is)."""
    return server.tls_port != 0


@pytest.fixture
def admin(server: Server, pw: Secrets) -> Iterator[redis.Redis]:
    c = _admin(server.port, pw)
    c.flushall()
    c.acl_log_reset()
    yield c
    c.close()


def settings_for(url: str, pw: Secrets, **kw: Any) -> RedisSettings:
    """The engine's settings: the ACL user, the password from its file."""
    return RedisSettings(url=SecretStr(url), username="touchstream",
                         password_file=pw.engine_file, **kw)


def loader_settings(url: str, pw: Secrets, **kw: Any) -> RedisSettings:
    return RedisSettings(url=SecretStr(url), username="touchstream-loader",
                         password_file=pw.loader_file, **kw)


# --- the engine's paths ------------------------------------------------------------------


def _profile(cid: str) -> Profile:
    return Profile(cid, subscriptions=frozenset({"music", "remote_cam"}),
                   prefs={"music": ("jazz",)}, segment="youth", handset="Mate 60")


def _push(i: int, cid: str, channel: str | None = None) -> Push:
    return Push(push_id=f"sec-{i}", customer_id=cid, channel=channel or f"terminal:T{i}",
                rule_id="music-pref", rule_version=1,
                content={"module": "music", "kind": "content", "genres": ["jazz"]},
                event_ts=T0 + i, reason={"module": "music"},
                guard=PushGuard(once_key="music-pref", once_ttl_ms=3_600_000, cap=3))


def _alert(cid: str) -> Alert:
    return Alert(id="a1", type="touchstream.dwell.customer", source="/touchstream/rules/x",
                 time_ms=T0, subject=cid, data={"customer_id": cid, "dwell_s": 90})


def run_engine_paths(settings: RedisSettings, loader: RedisSettings,
                     cids: list[str]) -> RedisClient:
    """Every Redis path of a live engine, as the ``touchstream`` user; returns its client.

    Profiles are first loaded as the loader user (``touchstream profiles load``).
    """
    loader_client = make_client(loader)
    try:
        assert RedisProfileStore(loader_client).put_many(_profile(c) for c in cids) == len(cids)
    finally:
        loader_client.close()

    client = make_client(settings)
    # profiles: one read and one pipelined batch read
    store = RedisProfileStore(client, cache_ttl_s=0)
    assert store.get(cids[0]) == _profile(cids[0])
    assert store.get_many(cids) == {c: _profile(c) for c in cids}
    # guards: the script is not loaded yet (NOSCRIPT -> SCRIPT LOAD -> EVALSHA again)
    guard = RedisGuardStore(client)
    reqs = [GuardRequest(f"g-{c}", c, T0, once_key="r", cap=2) for c in cids]
    assert guard.admit(reqs) == ["ok"] * len(cids)
    assert guard.admit(reqs) == ["duplicate"] * len(cids)
    # the push sink, built as Bytewax builds it, each worker's client as the runner makes it
    worker_client = functools.partial(make_client, settings)
    sink = RedisPushOutput(RedisPushConfig.from_settings(settings), guard=RedisGuardStore,
                           client_factory=worker_client)
    part = sink.build("pushes", 0, 1)
    try:
        part.write_batch([_push(i, c) for i, c in enumerate(cids)])
    finally:
        part.close()
    assert sink.stats() == {"written": len(cids)}
    # what a terminal (or the gateway) reads back
    for i, c in enumerate(cids):
        [(_, doc)] = read_channel(client, f"terminal:T{i}")
        assert doc["push_id"] == f"sec-{i}" and doc["customer_id"] == c
    # campaign quotas (one Lua script; SADD puts places back after a restart)
    quota = RedisQuotaStore(client)
    assert quota.take("camp", 1, "p1") and not quota.take("camp", 1, "p2")
    quota.restore("camp", ["p1"])
    # rule changes published on the Redis key and channel (read as the engine)
    rules_source = RedisRules(functools.partial(make_client, settings))
    rules_source.start(None)
    try:
        assert rules_source.poll() == []  # subscribed; the key is empty
    finally:
        rules_source.close()
    # the ops feed and the rule set
    write_rules(client, load_default_rules())
    feed = OpsFeedOutput(OpsFeedConfig.from_settings(settings), client_factory=worker_client)
    fpart = feed.build("ops", 0, 1)
    try:
        fpart.write_batch([_push(0, cids[0]), _alert(cids[0]), {"events": {"click": 1}}])
    finally:
        fpart.close()
    return client


def command(client: RedisClient, *args: Any, **kw: Any) -> Any:
    """``execute_command`` (untyped in redis-py)."""
    return client.execute_command(*args, **kw)  # type: ignore[no-untyped-call]


def acl_denials(admin: redis.Redis) -> list[str]:
    """``ACL LOG`` entries as ``user: reason object`` lines."""
    out = []
    for e in admin.acl_log():
        out.append(f"{e.get('username')}: {e.get('reason')} {e.get('object')}")
    return out


def test_engine_paths_run_as_the_restricted_user(
    server: Server, admin: redis.Redis, pw: Secrets
) -> None:
    url = f"redis://127.0.0.1:{server.port}/0"
    cids = ["13800000001", "13800000002", "13900000003"]
    client = run_engine_paths(settings_for(url, pw), loader_settings(url, pw), cids)
    try:
        assert acl_denials(admin) == []  # nothing the engine does was refused
        # what it wrote is there, under its own prefixes only
        keys = sorted(k.decode() for k in admin.scan_iter(count=1000))
        assert {k.split(":")[0] for k in keys} == {"profile", "guard", "push", "ops", "quota"}
        assert json_loads(admin.get("ops:rules") or b"{}")["rules"]
        assert admin.xlen("ops:alerts") == 1 and admin.xlen("ops:pushes") == 1
    finally:
        client.close()


def test_the_engine_user_is_denied_everything_else(
    server: Server, admin: redis.Redis, pw: Secrets
) -> None:
    client = make_client(settings_for(f"redis://127.0.0.1:{server.port}/0", pw))
    admin.hset("profile:13800000001", "segment", "youth")
    admin.set("other:secret", "x")
    sha = admin.script_load("return redis.call('GET', KEYS[1])")
    sneaky = admin.script_load("return redis.call('GET', 'other:secret')")
    denied: list[tuple[str, Callable[[], Any]]] = [
        ("FLUSHALL", client.flushall),
        ("FLUSHDB", client.flushdb),
        ("CONFIG GET", lambda: client.config_get("requirepass")),
        ("CONFIG SET", lambda: client.config_set("appendonly", "yes")),
        ("KEYS", lambda: client.keys("*")),
        ("SCAN", lambda: client.scan(0)),
        ("ACL LIST", client.acl_list),
        ("SHUTDOWN", lambda: command(client, "SHUTDOWN", "NOSAVE")),
        ("BGSAVE", lambda: command(client, "BGSAVE")),
        ("CLIENT LIST", client.client_list),
        ("MONITOR", lambda: command(client, "MONITOR")),
        ("SCRIPT FLUSH", client.script_flush),
        ("GET outside its keys", lambda: client.get("other:secret")),
        ("SET outside its keys", lambda: client.set("other:x", "1")),
        ("HSET a profile (read-only)", lambda: client.hset("profile:13800000001", "opt_out", "1")),
        ("DEL a profile (read-only)", lambda: client.delete("profile:13800000001")),
        ("PUBLISH outside its channels", lambda: client.publish("other", "x")),
        ("EVAL", lambda: client.eval("return 1", 0)),
        ("EVALSHA touching another key", lambda: client.evalsha(sha, 1, "other:secret")),
        ("EVALSHA naming its key but reading another",
         lambda: client.evalsha(sneaky, 1, "guard:{x}")),
    ]
    try:
        for what, call in denied:
            # NOPERM, or inside a script the script error that wraps it
            with pytest.raises(redis.exceptions.ResponseError,
                               match=r"(?i)permissions|can't access") as exc:
                call()
            assert isinstance(exc.value, redis.exceptions.NoPermissionError) or \
                "script" in str(exc.value), what
        assert admin.get("other:secret") == b"x"
        assert admin.hget("profile:13800000001", "segment") == b"youth"
        assert admin.dbsize() == 2
    finally:
        client.close()


def test_no_password_wrong_password_and_default_user_are_refused(
    server: Server, admin: redis.Redis, pw: Secrets, tmp_path: Path
) -> None:
    url = f"redis://127.0.0.1:{server.port}/0"
    anon = redis.Redis(host="127.0.0.1", port=server.port, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.exceptions.AuthenticationError):
        anon.ping()  # the default user is off
    anon.close()
    bad = tmp_path / "bad.pw"
    bad.write_text("not-the-password\n")
    client = make_client(RedisSettings(url=SecretStr(url), username="touchstream",
                                       password_file=bad), retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.exceptions.AuthenticationError) as exc:
        client.ping()
    assert "not-the-password" not in str(exc.value)
    client.close()


def test_password_from_settings_env_style(server: Server, admin: redis.Redis,
                                          pw: Secrets) -> None:
    """``password`` (env/TOML, a SecretStr) works like ``password_file``."""
    s = RedisSettings(url=SecretStr(f"redis://127.0.0.1:{server.port}/0"),
                      username="touchstream", password=SecretStr(pw.engine))
    client = make_client(s)
    try:
        assert client.ping()
        assert "touchstream" in {c["user"] for c in admin.client_list()}
    finally:
        client.close()
    assert pw.engine not in repr(s) and pw.engine not in str(s)


# --- option checks (no server) ----------------------------------------------------------


def test_options_refuse_mistakes_without_showing_secrets(tmp_path: Path, certs: Certs) -> None:
    secret = "s3cret-" + secrets.token_hex(8)
    with pytest.raises(ValueError, match="give it once") as e1:
        redis_options(f"redis://u:{secret}@h:1/0", password=secret)
    assert secret not in str(e1.value)
    with pytest.raises(ValueError, match="not rediss://"):
        redis_options("redis://h:1/0", tls_ca_file=certs.ca)
    with pytest.raises(ValueError, match="go together"):
        redis_options("rediss://h:1/0", tls_cert_file=certs.client_crt)
    with pytest.raises(ValueError, match="not a readable file"):
        redis_options("rediss://h:1/0", tls_ca_file=tmp_path / "missing.crt")
    with pytest.raises(ValueError, match="another one"):
        redis_options("redis://alice@h:1/0", username="bob")
    empty = tmp_path / "empty.pw"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        client_options(RedisSettings(url=SecretStr("redis://h:1/0"), password_file=empty))
    with pytest.raises(ValueError, match="cannot be read"):
        client_options(RedisSettings(url=SecretStr("redis://h:1/0"),
                                     password_file=tmp_path / "nope"))
    assert redis_options("rediss://h:1/0", username="u", password=secret,
                         tls_ca_file=certs.ca, tls_cert_file=certs.client_crt,
                         tls_key_file=certs.client_key) == {
        "username": "u", "password": secret, "ssl_ca_certs": str(certs.ca),
        "ssl_certfile": str(certs.client_crt), "ssl_keyfile": str(certs.client_key)}
    # a user in the URL and the password from a file is a valid split
    assert redis_options("redis://touchstream@h:1/0", username="touchstream",
                         password=secret) == {"username": "touchstream", "password": secret}


# --- TLS --------------------------------------------------------------------------------


def _need_tls(ok: bool) -> None:
    if not ok:
        pytest.skip("this redis-server was built without TLS (--tls-port not supported)")


def test_engine_paths_over_tls(server: Server, admin: redis.Redis, pw: Secrets, certs: Certs,
                               tls_supported: bool) -> None:
    _need_tls(tls_supported)
    url = f"rediss://127.0.0.1:{server.tls_port}/0"
    s = settings_for(url, pw, tls_ca_file=certs.ca)
    client = run_engine_paths(s, loader_settings(url, pw, tls_ca_file=certs.ca),
                              ["13800000011", "13800000012"])
    try:
        ports = {int(c["laddr"].rsplit(":", 1)[1]) for c in admin.client_list()
                 if c["user"] == "touchstream"}
        assert ports == {server.tls_port}  # its connections are on the TLS port
        assert acl_denials(admin) == []
    finally:
        client.close()


def test_tls_verifies_the_server(server: Server, pw: Secrets, certs: Certs,
                                 tls_supported: bool) -> None:
    _need_tls(tls_supported)
    # a CA that did not sign the server's certificate: refused
    wrong = make_client(settings_for(f"rediss://127.0.0.1:{server.tls_port}/0", pw,
                                     tls_ca_file=certs.other_ca))
    with pytest.raises(redis.exceptions.ConnectionError, match=r"(?i)certificate"):
        wrong.ping()
    wrong.close()
    # the right CA but a host name the certificate does not name: refused
    named = make_client(settings_for(f"rediss://127.0.0.2:{server.tls_port}/0", pw,
                                     tls_ca_file=certs.ca))
    with pytest.raises(redis.exceptions.ConnectionError, match=r"(?i)mismatch"):
        named.ping()
    named.close()
    # plain TCP to the TLS port does not get through
    plain = make_client(settings_for(f"redis://127.0.0.1:{server.tls_port}/0", pw,),
                        socket_timeout=2)
    with pytest.raises(redis.exceptions.ConnectionError):
        plain.ping()
    plain.close()


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, pw: Secrets, certs: Certs,
                tls_supported: bool) -> Iterator[Server]:
    """TLS only, client certificates required."""
    _need_tls(tls_supported)
    s = start(tmp_path_factory.mktemp("redis-mtls"), pw, tls=_tls_args(certs, "yes"),
              plain=False, certs=certs)
    yield s
    s.stop()


def test_mutual_tls_needs_the_client_certificate(mtls_server: Server, pw: Secrets,
                                                 certs: Certs) -> None:
    url = f"rediss://127.0.0.1:{mtls_server.tls_port}/0"
    without = make_client(settings_for(url, pw, tls_ca_file=certs.ca))
    with pytest.raises(redis.exceptions.ConnectionError):
        without.ping()
    without.close()
    client = make_client(settings_for(url, pw, tls_ca_file=certs.ca,
                                      tls_cert_file=certs.client_crt,
                                      tls_key_file=certs.client_key))
    try:
        assert client.ping()
        store = RedisProfileStore(client)
        assert store.get("13800000099") == Profile("13800000099")
    finally:
        client.close()


# --- Redis Cluster over TLS with ACL users ------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory, pw: Secrets, certs: Certs,
                tls_supported: bool) -> Iterator[list[Server]]:
    """Three TLS-only primaries (cluster bus over TLS too), the same ACL users on each."""
    _need_tls(tls_supported)
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli is not on PATH: cannot create a Redis Cluster "
                    "(`apt-get install redis-tools`)")
    root = tmp_path_factory.mktemp("redis-tls-cluster")
    nodes: list[Server] = []
    try:
        for i in range(3):
            nodes.append(start(
                root / f"n{i}", pw, tls=[*_tls_args(certs, "optional"), "--tls-cluster", "yes"],
                plain=False, certs=certs, cluster=True,
                extra=("--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                       "--cluster-config-file", str(root / f"nodes-{i}.conf"),
                       "--cluster-node-timeout", "5000")))
        env = {**os.environ, "REDISCLI_AUTH": pw.admin}  # not on the command line
        create = subprocess.run(
            [cli, "--tls", "--cacert", str(certs.ca), "--user", "admin", "--cluster", "create",
             *(f"127.0.0.1:{n.tls_port}" for n in nodes), "--cluster-replicas", "0",
             "--cluster-yes"], capture_output=True, timeout=30, env=env, check=False)
        if create.returncode != 0:
            pytest.fail("redis-cli --cluster create failed:\n"
                        + (create.stdout + create.stderr).decode(errors="replace")[-2000:])

        def ok() -> bool:
            for n in nodes:
                c = _admin(n.tls_port, pw, certs)
                try:
                    info = c.cluster("info")
                    if info.get("cluster_state") != "ok" or int(
                            info.get("cluster_known_nodes", 0)) < 3:
                        return False
                finally:
                    c.close()
            return True

        _wait(ok, "the TLS cluster did not reach state ok", nodes[0].log)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def test_engine_paths_on_a_tls_cluster_as_the_restricted_user(
    tls_cluster: list[Server], pw: Secrets, certs: Certs
) -> None:
    url = f"rediss://127.0.0.1:{tls_cluster[0].tls_port}/0"
    admins = [_admin(n.tls_port, pw, certs) for n in tls_cluster]
    for a in admins:
        a.acl_log_reset()
    cids = [f"1380000{i:04d}" for i in range(12)]  # spread over the three nodes' slots
    client = run_engine_paths(settings_for(url, pw, tls_ca_file=certs.ca, cluster=True),
                              loader_settings(url, pw, tls_ca_file=certs.ca, cluster=True),
                              cids)
    try:
        assert isinstance(client, RedisCluster)
        primaries = client.get_primaries()  # type: ignore[no-untyped-call]
        assert {n.port for n in primaries} == {n.tls_port for n in tls_cluster}
        assert [d for a in admins for d in acl_denials(a)] == []
        # every node holds some of the customers' keys: the paths really crossed nodes
        assert all(a.dbsize() > 0 for a in admins)
        with pytest.raises(redis.exceptions.NoPermissionError):
            command(client, "FLUSHALL", target_nodes=RedisCluster.ALL_NODES)
    finally:
        client.close()
        for a in admins:
            a.close()


# --- the push gateway as its read-only user -------------------------------------------------


def test_gateway_serves_terminals_and_ops_as_its_read_only_user(
    server: Server, admin: redis.Redis, pw: Secrets
) -> None:
    url = f"redis://127.0.0.1:{server.port}/0"
    cid = "13800000021"
    engine = run_engine_paths(settings_for(url, pw), loader_settings(url, pw), [cid])
    sink = RedisPushOutput(RedisPushConfig.from_settings(settings_for(url, pw)),
                           client_factory=functools.partial(make_client, settings_for(url, pw)))
    part = sink.build("pushes", 0, 1)
    ops_token = secrets.token_urlsafe(16)
    settings = gateway_settings(url, redis_username="touchstream-gateway",
                                redis_password_file=pw.gateway_file, ops_token=ops_token)
    try:
        with running_gateway(settings) as gw, httpx.Client(timeout=10.0) as c:
            auth = {"authorization": f"Bearer {gw.token('T0')}"}
            with c.stream("GET", f"{gw.url}/v1/terminals/T0/pushes", params={"since": "0"},
                          headers=auth) as resp:
                assert resp.status_code == 200
                sse = SSE(resp)
                [first] = sse.pushes(1)
                assert json_loads(first.data)["push_id"] == "sec-0"
                assert json_loads(first.data)["customer"] == "…0021"
                # a new push: PSUBSCRIBE (as the gateway user) wakes the stream at once
                t0 = time.monotonic()
                part.write_batch([_push(7, cid, channel="terminal:T0")])
                [second] = sse.pushes(1)
                assert json_loads(second.data)["push_id"] == "sec-7"
                assert time.monotonic() - t0 < 3.0  # not the 5 s poll
            state = c.get(f"{gw.url}/ops/api/state",
                          headers={"authorization": f"Bearer {ops_token}"})
            assert state.status_code == 200
            assert state.json()["alerts"][0]["subject"] == "…0021"
            assert c.get(f"{gw.url}/readyz").status_code == 200
            assert gw.server.gateway.hub.stats["listener_errors"] == 0, acl_denials(admin)
    finally:
        part.close()
        engine.close()
    assert acl_denials(admin) == []
    reader = redis.Redis(host="127.0.0.1", port=server.port, username="touchstream-gateway",
                         password=pw.gateway)
    try:
        for call in (lambda: reader.xadd("push:terminal:T0", {"data": b"{}"}),
                     lambda: reader.publish("push:terminal:T0", b"{}"),
                     lambda: reader.set("ops:rules", b"{}"),
                     lambda: reader.hgetall("profile:" + cid),
                     lambda: reader.get("guard:{" + cid + "}")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                call()
    finally:
        reader.close()


def test_gateway_client_over_tls(server: Server, admin: redis.Redis, pw: Secrets, certs: Certs,
                                 tls_supported: bool) -> None:
    _need_tls(tls_supported)
    admin.xadd("push:terminal:T5", {"data": b"{}"})
    settings = gateway_settings(f"rediss://127.0.0.1:{server.tls_port}/0",
                                redis_username="touchstream-gateway",
                                redis_password_file=pw.gateway_file,
                                redis_tls_ca_file=certs.ca)

    async def read() -> list[Any]:
        r = make_redis(settings)
        try:
            assert await r.ping()
            return list(await r.xrevrange("push:terminal:T5", "+", "-", count=1) or [])
        finally:
            await r.aclose()

    assert len(asyncio.run(read())) == 1
    ports = {int(c["laddr"].rsplit(":", 1)[1]) for c in admin.client_list()
             if c["user"] == "touchstream-gateway"}
    assert ports <= {server.tls_port}
    assert acl_denials(admin) == []
    wrong = gateway_settings(f"rediss://127.0.0.1:{server.tls_port}/0",
                             redis_password_file=pw.gateway_file,
                             redis_tls_ca_file=certs.other_ca)

    async def refused() -> None:
        r = make_redis(wrong)
        try:
            await r.ping()
        finally:
            await r.aclose()

    with pytest.raises(redis.exceptions.ConnectionError):
        asyncio.run(refused())


def test_wrong_credentials_fail_the_flow_instead_of_holding(
    server: Server, pw: Secrets, tmp_path: Path
) -> None:
    """AUTH refused is a ConnectionError in redis-py, but no outage: waiting will not mend
    it, so the push sink, the profile store and the ops feed raise instead of holding."""
    url = f"redis://127.0.0.1:{server.port}/0"
    bad = tmp_path / "bad.pw"
    bad.write_text("not-the-password\n")
    settings = RedisSettings(url=SecretStr(url), username="touchstream", password_file=bad)
    factory = functools.partial(make_client, settings, retry=Retry(NoBackoff(), 0))
    sink = RedisPushOutput(RedisPushConfig.from_settings(settings), guard=RedisGuardStore,
                           client_factory=factory)
    part = sink.build("pushes", 0, 1)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            part.write_batch([_push(0, "13800001234")])
        assert sink.stats().get("held", 0) == 0
    finally:
        part.close()
    client = factory()
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            RedisProfileStore(client, cache_ttl_s=0).get_many(["13800001234"])
    finally:
        client.close()
    feed = OpsFeedOutput(OpsFeedConfig.from_settings(settings), client_factory=factory)
    fpart = feed.build("ops", 0, 1)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            fpart.write_batch([_push(0, "13800001234")])
    finally:
        fpart.close()
