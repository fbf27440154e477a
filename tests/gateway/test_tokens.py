"""Terminal tokens: issue, verify, expiry, tampering, key rotation, settings, CLI."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from pydantic import ValidationError

from flows.cli import main as touchstream
from gateway.__main__ import main as gateway_main
from gateway.cli import parse_ttl
from gateway.settings import GatewaySettings, load_gateway_settings
from gateway.tokens import TokenError, TokenSigner

KEY = b"k" * 40
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _reason(signer: TokenSigner, token: str | None, now: datetime = NOW) -> str:
    with pytest.raises(TokenError) as exc:
        signer.verify(token, now=now)
    return exc.value.reason


def test_issue_and_verify() -> None:
    signer = TokenSigner(KEY)
    token = signer.issue("H01-T06", 3600, now=NOW)
    claims = signer.verify(token, now=NOW + timedelta(minutes=59))
    assert claims.terminal_id == "H01-T06"
    assert claims.kid == "k1"
    assert claims.issued_at == NOW and claims.issued_at.tzinfo is UTC
    assert claims.expires_at == NOW + timedelta(hours=1)
    payload = orjson.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert payload == {"terminal_id": "H01-T06", "iat": int(NOW.timestamp()),
                       "exp": int(NOW.timestamp()) + 3600, "kid": "k1"}


def test_expiry_with_leeway() -> None:
    signer = TokenSigner(KEY, leeway_s=30)
    token = signer.issue("T1", 60, now=NOW)
    signer.verify(token, now=NOW + timedelta(seconds=89))
    assert _reason(signer, token, NOW + timedelta(seconds=90)) == "expired"
    strict = TokenSigner(KEY, leeway_s=0)
    assert _reason(strict, token, NOW + timedelta(seconds=60)) == "expired"


def test_tampering_and_wrong_key() -> None:
    signer = TokenSigner(KEY)
    token = signer.issue("T1", 3600, now=NOW)
    p64, s64 = token.split(".")
    forged = base64.urlsafe_b64encode(orjson.dumps(
        {"terminal_id": "T2", "iat": 0, "exp": 2**40, "kid": "k1"})).rstrip(b"=").decode()
    assert _reason(signer, f"{forged}.{s64}") == "bad_signature"
    flipped = s64[:-2] + ("A" if s64[-2] != "A" else "B") + s64[-1]
    assert _reason(signer, f"{p64}.{flipped}") == "bad_signature"
    assert _reason(TokenSigner(b"z" * 40), token) == "bad_signature"
    assert _reason(signer, None) == "missing"
    assert _reason(signer, "") == "missing"
    assert _reason(signer, "not-a-token") == "malformed"
    assert _reason(signer, p64 + "." + s64 + "x") == "malformed"
    assert _reason(signer, "a" * 2000 + "." + s64) == "malformed"


def test_claims_must_be_well_formed() -> None:
    signer = TokenSigner(KEY)

    def signed(payload: object) -> str:
        p64 = base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode()
        return f"{p64}.{base64.urlsafe_b64encode(signer._mac(KEY, p64)).rstrip(b'=').decode()}"

    ok = {"terminal_id": "T1", "iat": 1, "exp": 4_000_000_000, "kid": "k1"}
    assert signer.verify(signed(ok), now=NOW).terminal_id == "T1"
    for bad in ([1], ok | {"exp": "soon"}, ok | {"terminal_id": "../etc"}, ok | {"kid": "k9"},
                {"terminal_id": "T1"}, ok | {"exp": 2**40}, ok | {"iat": 5, "exp": 4}):
        assert _reason(signer, signed(bad)) == "invalid_claims"


def test_key_rotation() -> None:
    old = TokenSigner(b"o" * 40, kid="k1")
    new = TokenSigner(b"n" * 40, kid="k2", previous={"k1": b"o" * 40})
    old_token = old.issue("T1", 3600, now=NOW)
    assert new.verify(old_token, now=NOW).kid == "k1"
    assert new.verify(new.issue("T1", 3600, now=NOW), now=NOW).kid == "k2"
    assert _reason(old, new.issue("T1", 3600, now=NOW)) == "bad_signature"


def test_issue_refuses_bad_input() -> None:
    signer = TokenSigner(KEY)
    for tid in ("", "a/b", "x" * 65, "T 1"):
        with pytest.raises(ValueError):
            signer.issue(tid, 60)
    with pytest.raises(ValueError):
        signer.issue("T1", 0)
    with pytest.raises(ValueError):
        signer.verify(signer.issue("T1", 60), now=datetime(2025, 1, 1))  # naive datetime
    assert "k" * 10 not in repr(signer)


def test_settings_keep_secrets_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cr3t-" + "q" * 40
    monkeypatch.setenv("TOUCHSTREAM_GATEWAY_TOKEN_SECRET", secret)
    monkeypatch.setenv("TOUCHSTREAM_GATEWAY_REDIS_URL", "redis://:hunter2pw@db:6379/0")
    s = load_gateway_settings(None, port=9000)
    assert s.token_secret is not None and s.token_secret.get_secret_value() == secret
    assert s.port == 9000
    for text in (repr(s), str(s), str(s.model_dump())):
        assert secret not in text and "hunter2pw" not in text
    with pytest.raises(ValidationError) as exc:
        GatewaySettings(token_secret="short-secret-xyz")
    assert "short-secret-xyz" not in str(exc.value)
    with pytest.raises(ValidationError):
        GatewaySettings(unknown_field=1)


def test_settings_from_toml(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("TOUCHSTREAM_GATEWAY_PORT", raising=False)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('token_secret = "' + "t" * 40 + '"\nport = 9100\nheartbeat_s = 5\n')
    monkeypatch.setenv("TOUCHSTREAM_GATEWAY_HEARTBEAT_S", "7")
    s = load_gateway_settings(cfg, port=None)
    assert (s.port, s.heartbeat_s) == (9100, 7.0)  # env wins over TOML
    assert load_gateway_settings(cfg, port=9200).port == 9200  # flags win


def test_parse_ttl() -> None:
    assert [parse_ttl(x) for x in ("90", "90s", "60m", "24h", "30d")] == [
        90, 90, 3600, 86400, 30 * 86400]
    for bad in ("", "0", "-5", "1w", "h"):
        with pytest.raises(Exception, match="duration"):
            parse_ttl(bad)


def test_cli_token(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    secret = "c" * 40
    monkeypatch.setenv("TOUCHSTREAM_GATEWAY_TOKEN_SECRET", secret)
    assert touchstream(["gateway", "token", "H01-T06", "--ttl", "2h"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    claims = TokenSigner(secret.encode()).verify(token)
    assert claims.terminal_id == "H01-T06"
    assert timedelta(hours=2) - timedelta(seconds=2) <= claims.expires_at - datetime.now(UTC)
    assert "expires" in err and secret not in out + err

    assert gateway_main(["token", "T2"]) == 0  # python -m gateway, default ttl (30 days)
    claims = TokenSigner(secret.encode()).verify(capsys.readouterr().out.strip())
    assert claims.expires_at - claims.issued_at == timedelta(days=30)

    assert touchstream(["gateway", "token", "bad/id"]) == 2
    monkeypatch.delenv("TOUCHSTREAM_GATEWAY_TOKEN_SECRET")
    assert touchstream(["gateway", "token", "T1"]) == 2
    assert "TOKEN_SECRET" in capsys.readouterr().err


def test_cli_serve_needs_settings(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TOUCHSTREAM_GATEWAY_TOKEN_SECRET", raising=False)
    monkeypatch.delenv("TOUCHSTREAM_GATEWAY_REDIS_URL", raising=False)
    assert touchstream(["gateway", "serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "TOUCHSTREAM_GATEWAY_REDIS_URL" in err and "TOUCHSTREAM_GATEWAY_TOKEN_SECRET" in err


def test_cli_serve_redis_cluster_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.server

    served: list[GatewaySettings] = []
    monkeypatch.setattr(gateway.server, "serve", lambda s: served.append(s) or 0)
    monkeypatch.setenv("TOUCHSTREAM_GATEWAY_TOKEN_SECRET", "c" * 40)
    monkeypatch.delenv("TOUCHSTREAM_GATEWAY_REDIS_CLUSTER", raising=False)
    url = "redis://127.0.0.1:7000/0"
    assert touchstream(["gateway", "serve", "--redis", url]) == 0
    assert touchstream(["gateway", "serve", "--redis", url, "--redis-cluster"]) == 0
    monkeypatch.setenv("TOUCHSTREAM_GATEWAY_REDIS_CLUSTER", "1")
    assert touchstream(["gateway", "serve", "--redis", url]) == 0
    assert [s.redis_cluster for s in served] == [False, True, True]
