"""Secrets come from files or the environment, never from flags, and never show.

* the ``*_file`` settings are read (Redis password, webhook secrets, the gateway's Redis
  password) and the environment works as the alternative;
* ``repr``/``str``/JSON/log lines of the settings never show a secret value;
* no command-line option of ``touchstream`` (or ``python -m gateway``) takes a secret,
  and a ``--redis`` URL holding a password is refused without echoing it;
* Kafka SASL/SSL properties pass to librdkafka untouched and are masked in log lines
  (the local broker, Tansu 0.6, cannot be run with SASL or TLS here: see the README).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import re
import secrets
from pathlib import Path

import certifi
import pytest
from pydantic import SecretStr, ValidationError

from connectors.kafka import KafkaOutput, mask_config
from flows.cli import _parser
from flows.runner import kafka_input
from flows.settings import RedisSettings, Settings, WebhookTarget, load_settings
from gateway.__main__ import main as gateway_main
from gateway.settings import GatewaySettings, load_gateway_settings
from state.redis_store import client_options


def _secret_file(path: Path, value: str) -> Path:
    path.write_text(value + "\n# anything after the first line is ignored\n")
    path.chmod(0o600)
    return path


def _whsec() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


# --- secrets from files and the environment -----------------------------------------------


def test_redis_password_from_its_file_and_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pw = secrets.token_urlsafe(20)
    f = _secret_file(tmp_path / "redis.pw", f"  {pw}  ")
    monkeypatch.setenv("TOUCHSTREAM_REDIS__URL", "redis://127.0.0.1:6390/0")
    monkeypatch.setenv("TOUCHSTREAM_REDIS__USERNAME", "touchstream")
    monkeypatch.setenv("TOUCHSTREAM_REDIS__PASSWORD_FILE", str(f))
    s = load_settings()
    assert s.redis.auth_password() == pw
    assert client_options(s.redis) == {"username": "touchstream", "password": pw}
    # the password itself from the environment (a SecretStr), no file
    monkeypatch.delenv("TOUCHSTREAM_REDIS__PASSWORD_FILE")
    monkeypatch.setenv("TOUCHSTREAM_REDIS__PASSWORD", pw)
    s = load_settings()
    assert isinstance(s.redis.password, SecretStr)
    assert client_options(s.redis)["password"] == pw


def test_webhook_secrets_from_their_files(tmp_path: Path) -> None:
    one, two = _whsec(), _whsec()
    s = Settings(webhook_url="https://ops.example/hook",
                 webhook_secret_file=_secret_file(tmp_path / "one", one),
                 webhooks=[WebhookTarget(url="https://pager.example/x",
                                         secret_file=_secret_file(tmp_path / "two", two))])
    targets = s.webhook_targets()
    got = {t.url: t.secret.get_secret_value() for t in targets if t.secret is not None}
    assert got == {"https://ops.example/hook": one, "https://pager.example/x": two}
    assert all(t.secret_file is None for t in targets)  # resolved once, at start


def test_webhook_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = _whsec()
    monkeypatch.setenv("TOUCHSTREAM_WEBHOOK_URL", "https://ops.example/hook")
    monkeypatch.setenv("TOUCHSTREAM_WEBHOOK_SECRET", secret)
    [target] = load_settings().webhook_targets()
    assert target.secret is not None and target.secret.get_secret_value() == secret


def test_gateway_redis_password_from_its_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pw = secrets.token_urlsafe(20)
    monkeypatch.setenv("TOUCHSTREAM_GATEWAY_REDIS_PASSWORD_FILE",
                       str(_secret_file(tmp_path / "gw.pw", pw)))
    s = load_gateway_settings()
    assert s.redis_auth_password() == pw
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        GatewaySettings(redis_password_file=empty).redis_auth_password()
    with pytest.raises(ValueError, match="cannot be read"):
        GatewaySettings(redis_password_file=tmp_path / "missing").redis_auth_password()


# --- never shown ----------------------------------------------------------------------------


def _all_secret_settings(tmp_path: Path) -> tuple[Settings, GatewaySettings, list[str]]:
    vals = [secrets.token_urlsafe(16) for _ in range(6)]
    url_pw, redis_pw, gw_pw, ops_pw, ops_token, token_secret = vals
    hook = _whsec()
    hook2 = _whsec()
    s = Settings(
        redis=RedisSettings(url=SecretStr(f"redis://u:{url_pw}@h:6379/0"),
                            username="touchstream", password=SecretStr(redis_pw)),
        webhook_url="https://ops.example/hook", webhook_secret=SecretStr(hook),
        webhooks=[WebhookTarget(url="https://p.example/x", secret=SecretStr(hook2))],
    )
    g = GatewaySettings(redis_url=SecretStr(f"redis://:{url_pw}@h/0"),
                        redis_password=SecretStr(gw_pw), ops_token=SecretStr(ops_token),
                        ops_user="ops", ops_password=SecretStr(ops_pw),
                        token_secret=SecretStr(token_secret * 3))
    return s, g, [*vals, hook, hook2]


def test_settings_never_show_a_secret(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s, g, values = _all_secret_settings(tmp_path)
    caplog.set_level(logging.DEBUG)
    log = logging.getLogger("touchstream.test")
    log.info("settings %s / %r", s, s)
    log.info("gateway settings %s / %r", g, g)
    shown = "\n".join([repr(s), str(s), s.model_dump_json(), repr(g), str(g),
                       g.model_dump_json(), repr(s.webhook_targets()), caplog.text])
    for v in values:
        assert v not in shown
    assert "**********" in shown  # SecretStr's mask is there instead


def test_gateway_validation_errors_do_not_echo_secrets() -> None:
    secret = secrets.token_urlsafe(8)  # too short: refused
    with pytest.raises(ValidationError) as exc:
        GatewaySettings(token_secret=SecretStr(secret))
    assert secret not in str(exc.value)


def test_engine_validation_errors_do_not_echo_secrets() -> None:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(9)).decode()  # short: not cut
    with pytest.raises(ValidationError) as exc:
        Settings(webhooks=[{"secret": secret}])  # the url is missing
    assert secret not in str(exc.value)


@pytest.mark.parametrize("field", ["config", "consumer_config", "producer_config"])
def test_kafka_secrets_not_in_the_settings_repr(field: str) -> None:
    pw = secrets.token_urlsafe(12)
    s = Settings(kafka={"brokers": "b:9092", field: {"sasl.password": pw}})
    assert pw not in repr(s) and pw not in repr(s.kafka)


# --- no secret on the command line -----------------------------------------------------------

_SECRETISH = re.compile(r"secret|passw|token|credential|api.?key|sasl|private", re.I)


def _options(parser: argparse.ArgumentParser, path: str = "touchstream") -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _options(sub, f"{path} {name}")
        else:
            out += [f"{path} {o}" for o in action.option_strings]
    return out


def test_no_command_line_option_takes_a_secret() -> None:
    options = _options(_parser())
    assert len(options) > 30 and "touchstream gateway serve --redis" in options
    assert [o for o in options if _SECRETISH.search(o.rsplit(" ", 1)[1])] == []


def test_gateway_redis_flag_with_a_password_is_refused(
    capsys: pytest.CaptureFixture[str]
) -> None:
    pw = secrets.token_urlsafe(12)
    with pytest.raises(SystemExit) as exc:
        gateway_main(["serve", "--redis", f"redis://ops:{pw}@redis:6379/0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "password" in err and "TOUCHSTREAM_GATEWAY_REDIS_PASSWORD_FILE" in err
    assert pw not in err


def test_engine_redis_flag_with_a_password_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    pw = secrets.token_urlsafe(12)
    profiles = tmp_path / "p.jsonl"
    profiles.write_text("")
    rc = main(["profiles", "load", str(profiles), "--redis", f"redis://:{pw}@127.0.0.1:1/0"])
    captured = capsys.readouterr()
    assert rc == 2
    assert pw not in captured.err + captured.out


# --- Kafka SASL / SSL -----------------------------------------------------------------------


def test_kafka_sasl_ssl_settings_pass_through_untouched_and_are_masked_in_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pw = secrets.token_urlsafe(16)
    key_pw = secrets.token_urlsafe(16)
    ca = certifi.where()  # a real CA bundle: librdkafka loads it when the client is made
    security = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "touchstream",
        "sasl.password": pw,
        "ssl.ca.location": ca,
        "ssl.key.password": key_pw,
        "ssl.endpoint.identification.algorithm": "https",
    }
    monkeypatch.setenv("TOUCHSTREAM_KAFKA__BROKERS", "127.0.0.1:1")
    monkeypatch.setenv("TOUCHSTREAM_KAFKA__CONFIG", json.dumps(security))
    s = load_settings()
    assert s.kafka.config == security
    # as flows/runner.py builds the input and the output
    inp = kafka_input(s)
    out = KafkaOutput(s.kafka.brokers or "", dict(s.kafka.config))
    for cfg in (inp.consumer_config(), out.producer_config()):
        assert {k: cfg[k] for k in security} == security  # untouched, and they win
    # a real librdkafka producer accepts them (it validates every property; nothing
    # connects until a message is sent) and its config is logged masked
    caplog.set_level(logging.DEBUG)
    part = out.build("out", 0, 1)
    part.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "kafka output config" in logged
    assert pw not in logged and key_pw not in logged
    masked = mask_config(security)
    assert masked["sasl.password"] == "***" and masked["ssl.key.password"] == "***"
    assert masked["security.protocol"] == "SASL_SSL"
