"""Static checks of the deployment files: docker-compose.yml and Dockerfile.

No Docker engine is needed: the files are parsed and cross-checked against each
other, against pyproject.toml and against the settings model.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

SERVICES = {"kafka", "redis", "topic-init", "engine"}
# Read by the CLI itself, not settings fields (the secret only ever from the env).
CLI_ENV = {"TOUCHSTREAM_WEBHOOK_URL", "TOUCHSTREAM_WEBHOOK_SECRET"}
SECRET_KEY = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|API_?KEY|CREDENTIAL|PRIVATE", re.I)
INTERP = re.compile(r"^\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}$")


# --- helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose["services"]
    assert isinstance(svcs, dict)
    return svcs


def _env(svc: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whether written as a mapping or a list."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command")
    assert cmd, "service has no command"
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _flag(argv: list[str], name: str) -> str:
    """The value of ``--name VALUE`` or ``--name=VALUE`` (exactly once)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    values += [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {argv}"
    return values[0]


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` as {NAME: (host, port)}; an empty host stays empty."""
    out: dict[str, tuple[str, int]] = {}
    for part in value.split(","):
        name, _, hostport = part.strip().partition("://")
        host, _, port = hostport.rpartition(":")
        out[name] = (host, int(port))
    return out


def _ports(svc: dict[str, Any]) -> list[tuple[str, int, int]]:
    """Published ports as (host_ip, host_port, container_port), short or long syntax."""
    out: list[tuple[str, int, int]] = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            out.append((str(p.get("host_ip", "")), int(p["published"]), int(p["target"])))
            continue
        spec = str(p).split("/", 1)[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            out.append(("", int(parts[0]), int(parts[1])))
        else:
            raise AssertionError(f"port {p!r} is not published on a fixed host port")
    return out


def _depends(svc: dict[str, Any]) -> dict[str, str]:
    dep = svc.get("depends_on") or {}
    if isinstance(dep, list):  # short form: no condition, i.e. merely started
        return dict.fromkeys(dep, "service_started")
    return {name: (cond or {}).get("condition", "service_started") for name, cond in dep.items()}


def _kafka_internal(services: dict[str, dict[str, Any]]) -> str:
    """host:port of the listener other containers use, from the kafka service's env."""
    env = _env(services["kafka"])
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    internal = env.get("KAFKA_INTER_BROKER_LISTENER_NAME", "PLAINTEXT")
    host, port = advertised[internal]
    return f"{host}:{port}"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


# --- services and images -------------------------------------------------------


def test_four_services(services: dict[str, dict[str, Any]]) -> None:
    assert SERVICES <= set(services)


def test_kafka_is_kraft_single_node(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    roles = {r.strip() for r in env["KAFKA_PROCESS_ROLES"].split(",")}
    assert {"broker", "controller"} <= roles
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    node_id = env["KAFKA_NODE_ID"]
    controllers = env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")
    listeners = _listeners(env["KAFKA_LISTENERS"])
    # The one voter is this node, on its controller listener.
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert len(voters) == 1
    voter_id, _, voter_addr = voters[0].partition("@")
    assert voter_id == node_id
    voter_host, _, voter_port = voter_addr.rpartition(":")
    assert voter_host in {"kafka", kafka.get("hostname"), "localhost"}
    assert int(voter_port) == listeners[controllers[0]][1]
    # Every listener has a security protocol; a single node cannot replicate.
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocols)
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env.get("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1") == "1"
    # topic-init owns topic creation.
    assert env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE") == "false"


def test_redis_image(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    assert _command(redis)[:1] == ["redis-server"]
    assert "--appendonly" in _command(redis)


def test_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if name in {"topic-init", "engine"}:
            continue
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck"
    kafka_hc = " ".join(services["kafka"]["healthcheck"]["test"])
    assert "kafka-topics.sh" in kafka_hc
    # The probe runs inside the container on the internal listener's port.
    internal_port = _kafka_internal(services).rpartition(":")[2]
    assert f"--bootstrap-server localhost:{internal_port}" in kafka_hc
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert "ping" in services["redis"]["healthcheck"]["test"]


# --- the engine and topic-init wiring ------------------------------------------


def test_kafka_address_comes_from_the_advertised_internal_listener(
    services: dict[str, dict[str, Any]],
) -> None:
    address = _kafka_internal(services)
    host, _, port = address.rpartition(":")
    kafka = services["kafka"]
    assert host in {"kafka", kafka.get("hostname")}, "internal listener must be the service name"
    assert host != "localhost"
    bound = _listeners(_env(kafka)["KAFKA_LISTENERS"])
    assert int(port) in {p for _, p in bound.values()}, "advertised port is not listened on"


def test_engine_command(services: dict[str, dict[str, Any]]) -> None:
    argv = _command(services["engine"])
    assert argv[0] == "run"
    assert _flag(argv, "--kafka") == _kafka_internal(services)
    redis_url = urlsplit(_flag(argv, "--redis"))
    assert redis_url.scheme == "redis"
    assert redis_url.hostname == "redis" and "redis" in services
    assert redis_url.port == 6379
    assert redis_url.password is None, "no credentials on the command line"
    assert redis_url.path in {"", "/"} or redis_url.path.lstrip("/").isdigit()


def test_topic_init_command(services: dict[str, dict[str, Any]]) -> None:
    init = services["topic-init"]
    argv = _command(init)
    assert argv[:2] == ["topics", "create"]
    assert _flag(argv, "--kafka") == _kafka_internal(services)
    assert _depends(init) == {"kafka": "service_healthy"}
    assert init.get("restart") == "no"  # quoted: a bare `no` would be YAML false


def test_engine_depends_and_restarts(services: dict[str, dict[str, Any]]) -> None:
    engine = services["engine"]
    deps = _depends(engine)
    assert deps["kafka"] == "service_healthy"
    assert deps["redis"] == "service_healthy"
    assert deps["topic-init"] == "service_completed_successfully"
    assert engine.get("restart") == "unless-stopped"


def test_both_built_from_this_repo(services: dict[str, dict[str, Any]]) -> None:
    for name in ("topic-init", "engine"):
        build = services[name].get("build")
        context = build.get("context") if isinstance(build, dict) else build
        assert context in {".", "./"}, name


def test_engine_recovery_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    mounts = {}
    for v in services["engine"].get("volumes") or []:
        if isinstance(v, dict):
            mounts[v["target"]] = v.get("source")
        else:
            source, target = str(v).split(":")[:2]
            mounts[target] = source
    assert "/var/lib/touchstream" in mounts
    assert mounts["/var/lib/touchstream"] in (compose.get("volumes") or {})


# --- secrets and ports -----------------------------------------------------------


def test_no_literal_secrets(services: dict[str, dict[str, Any]]) -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    assert "whsec_" not in text
    env = _env(services["engine"])
    m = INTERP.match(env["TOUCHSTREAM_WEBHOOK_SECRET"])
    assert m and m["name"] == "TOUCHSTREAM_WEBHOOK_SECRET" and not m["default"], (
        "the webhook secret must come from the host env with no default"
    )
    for name, svc in services.items():
        for key, value in _env(svc).items():
            if SECRET_KEY.search(key) and value:
                m = INTERP.match(value)
                assert m and not m["default"], f"{name}: {key} is written literally"
        # No credentials in URLs (redis://:pw@..., https://user:pw@...) anywhere.
        for arg in (_command(svc) if svc.get("command") else []) + list(_env(svc).values()):
            if "://" in arg and not arg.startswith("${"):
                assert urlsplit(arg).password is None, f"{name}: credentials in {arg!r}"


def test_published_ports(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    env = _env(kafka)
    kafka_ports = _ports(kafka)
    assert kafka_ports, "kafka must be reachable from the host"
    bound = {p for _, p in _listeners(env["KAFKA_LISTENERS"]).values()}
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    host_facing = {p for h, p in advertised.values() if h in {"localhost", "127.0.0.1"}}
    for _ip, published, target in kafka_ports:
        assert published in {9092, 29092}
        assert target in bound
        # What the host connects to must be what the broker tells it to reconnect to.
        assert published == target and target in host_facing
    assert [(p, t) for _, p, t in _ports(services["redis"])] == [(6379, 6379)]
    for name in ("topic-init", "engine"):
        assert not _ports(services[name]), f"{name} publishes nothing"


# --- Dockerfile ------------------------------------------------------------------


def test_dockerfile() -> None:
    instrs = _dockerfile_instructions()
    froms = [a for i, a in instrs if i == "FROM"]
    assert froms[0].split()[0] == "python:3.11-slim"
    entry = [a for i, a in instrs if i == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["touchstream"]
    users = [a for i, a in instrs if i == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert any(i == "RUN" and "pip install ." in a for i, a in instrs)
    # Everything the package build needs is copied in.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    copied = " ".join(a for i, a in instrs if i in {"COPY", "ADD"}).split()
    needed = ["pyproject.toml", pyproject["project"]["readme"],
              *pyproject["tool"]["setuptools"]["packages"]]
    for path in needed:
        assert path in copied or f"./{path}" in copied or "." in copied, path
    # The console script the ENTRYPOINT names exists.
    assert "touchstream" in pyproject["project"]["scripts"]


# --- settings ------------------------------------------------------------------


def test_compose_env_names_are_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import BaseModel, SecretStr

    from flows.settings import Settings

    prefix = str(Settings.model_config.get("env_prefix", ""))
    delim = str(Settings.model_config.get("env_nested_delimiter", ""))
    assert prefix == "TOUCHSTREAM_" and delim == "__"

    env: dict[str, str] = {}
    for svc in services.values():
        env.update({k: v for k, v in _env(svc).items() if k.startswith(prefix)})
    assert CLI_ENV <= set(env), "the engine must be given the webhook URL and secret"

    for key in list(os.environ):
        if key.startswith(prefix):
            monkeypatch.delenv(key)
    expected: dict[tuple[str, ...], str] = {}
    for key, raw in env.items():
        # Present in the process but read by the CLI; they must not upset Settings.
        m = INTERP.match(raw)
        value = (m["default"] or "") if m else raw
        if key in CLI_ENV:
            monkeypatch.setenv(key, "placeholder")
            continue
        path = tuple(key[len(prefix):].lower().split(delim))
        model: type[BaseModel] = Settings
        for i, part in enumerate(path):
            assert part in model.model_fields, f"{key}: no settings field {'.'.join(path[:i + 1])}"
            ann = model.model_fields[part].annotation
            if i < len(path) - 1:
                assert isinstance(ann, type) and issubclass(ann, BaseModel), key
                model = ann
        assert value, f"{key} needs a default in the compose file"
        monkeypatch.setenv(key, value)
        expected[path] = value

    settings = Settings()
    for path, value in expected.items():
        got: Any = settings
        for part in path:
            got = getattr(got, part)
        if isinstance(got, SecretStr):
            got = got.get_secret_value()
        if isinstance(got, int | float) and not isinstance(got, bool):
            assert got == float(value), ".".join(path)
        else:
            assert str(got) == value, ".".join(path)
