"""Input limits at their boundaries: exactly at the limit is accepted, one over is a
dead letter (or a rules error) whose reason and detail name the limit.

Message size, customer id length, field length, attrs size, keys and depth, event
time range, counts, live clock skew and history horizon; the rules file size and the
number of rules. The two limits that are settings (``engine.max_message_bytes``,
``engine.max_attrs_bytes``) are also checked through a live flow built from settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest
from bytewax.testing import TestingSink, TestingSource, run_main

from flows.codec import json_dumps, pack, unpack
from flows.engine import EngineConfig, ShardEngine
from flows.experience import LiveIntake, Outputs, build_flow
from flows.model import (
    DEFAULT_LIMITS,
    MAX_TS_MS,
    MIN_TS_MS,
    ClickEvent,
    DeadLetter,
    Envelope,
    Format,
    Limits,
    RawRecord,
    decode_record,
)
from flows.rules import MAX_RULES, MAX_RULES_FILE_BYTES, RulesError, load_rules, parse_rules
from flows.settings import load_settings
from state.profiles import InMemoryProfileStore
from tests.flows.helpers import DEFAULT_RULES_PATH, default_rules_doc

NOW = 1_790_000_000_000
L = DEFAULT_LIMITS
FORMATS: list[Format] = ["json", "msgpack"]


def encode(doc: Any, fmt: Format) -> bytes:
    return json_dumps(doc) if fmt == "json" else bytes(msgpack.packb(doc, use_bin_type=True))


def location(**kw: Any) -> dict[str, Any]:
    return {"type": "location", "customer_id": "13800001234", "ts": NOW, "cell_id": "C1",
            **kw}


def click(**kw: Any) -> dict[str, Any]:
    return {"type": "click", "customer_id": "13800001234", "ts": NOW, "terminal_id": "T1",
            "hall_id": "H1", "action": "module_enter", "module": "music", **kw}


def decode(value: bytes, fmt: Format = "json", limits: Limits = L) -> Envelope | DeadLetter:
    return decode_record(RawRecord("limits", 1, value, None, fmt), limits)


def accepted(doc: dict[str, Any], fmt: Format = "json", limits: Limits = L) -> Envelope:
    got = decode(encode(doc, fmt), fmt, limits)
    assert type(got) is Envelope, got
    return got


def rejected(doc: dict[str, Any], fmt: Format = "json", limits: Limits = L) -> DeadLetter:
    got = decode(encode(doc, fmt), fmt, limits)
    assert type(got) is DeadLetter, got
    return got


def test_the_limits() -> None:
    """The figures the README states."""
    assert (L.max_message_bytes, L.max_customer_id_len, L.max_field_len, L.max_attrs_bytes,
            L.max_attrs_keys, L.max_attrs_depth) == (65_536, 64, 128, 4_096, 32, 8)
    assert (MAX_RULES_FILE_BYTES, MAX_RULES) == (1_048_576, 500)


# --- message size -------------------------------------------------------------------


def _padded(size: int) -> bytes:
    body = json_dumps(location())
    return body + b" " * (size - len(body))  # valid JSON: whitespace after the object


def test_message_of_exactly_max_bytes_is_accepted_one_more_is_not() -> None:
    assert type(decode(_padded(L.max_message_bytes))) is Envelope
    dl = decode(_padded(L.max_message_bytes + 1))
    assert type(dl) is DeadLetter
    assert (dl.reason, dl.detail) == ("too_large", "message is larger than 65536 bytes")


def _msgpack_of_size(size: int) -> bytes:
    """A valid MessagePack location of exactly ``size`` bytes (event_id fills it)."""
    base = len(encode(location(event_id="e" * 40), "msgpack"))
    return encode(location(event_id="e" * (40 + size - base)), "msgpack")


def test_msgpack_message_size_limit_at_the_boundary() -> None:
    limits = Limits(max_message_bytes=200)
    at, over = _msgpack_of_size(200), _msgpack_of_size(201)
    assert (len(at), len(over)) == (200, 201)
    assert type(decode(at, "msgpack", limits)) is Envelope
    dl = decode(over, "msgpack", limits)
    assert type(dl) is DeadLetter
    assert (dl.reason, dl.detail) == ("too_large", "message is larger than 200 bytes")


# --- string fields -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("char", ["7", "客"])  # characters, not bytes
def test_customer_id_of_64_characters_is_accepted_65_is_not(fmt: Format, char: str) -> None:
    env = accepted(location(customer_id=char * 64), fmt)
    assert env.event.customer_id == char * 64
    dl = rejected(location(customer_id=char * 65), fmt)
    assert (dl.reason, dl.detail) == ("too_large", "customer_id is longer than 64 characters")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["event_id", "cell_id", "poi", "poi_id"])
def test_fields_of_128_characters_are_accepted_129_are_not(fmt: Format, name: str) -> None:
    accepted(location(**{name: "f" * 128}), fmt)
    dl = rejected(location(**{name: "f" * 129}), fmt)
    assert (dl.reason, dl.detail) == ("too_large", f"{name} is longer than 128 characters")


@pytest.mark.parametrize("name", ["terminal_id", "hall_id", "module", "action"])
def test_click_fields_are_bounded_too(name: str) -> None:
    dl = rejected(click(**{name: "m" * 129}))
    assert (dl.reason, dl.detail) == ("too_large", f"{name} is longer than 128 characters")


@pytest.mark.parametrize("bad", ["\x00", "\n", "\x1b", "\u202e", "\u2028", "\ufeff"])
def test_customer_id_must_be_printable(bad: str) -> None:
    accepted(location(customer_id="cust 0001"))  # a space is fine
    dl = rejected(location(customer_id=f"1380000{bad}1234"))
    assert (dl.reason, dl.detail) == ("invalid_value", "customer_id has non-printable characters")


# --- attrs -----------------------------------------------------------------------------


def _attrs_of_size(size: int) -> dict[str, Any]:
    attrs: dict[str, Any] = {"note": ""}
    attrs["note"] = "n" * (size - len(json_dumps(attrs)))
    assert len(json_dumps(attrs)) == size
    return attrs


@pytest.mark.parametrize("fmt", FORMATS)
def test_attrs_of_exactly_max_bytes_are_accepted_one_more_is_not(fmt: Format) -> None:
    env = accepted(click(attrs=_attrs_of_size(L.max_attrs_bytes)), fmt)
    assert type(env.event) is ClickEvent and env.event.attrs == _attrs_of_size(4096)
    dl = rejected(click(attrs=_attrs_of_size(L.max_attrs_bytes + 1)), fmt)
    assert (dl.reason, dl.detail) == ("too_large", "attrs is larger than 4096 bytes")


def test_attrs_are_measured_as_json_even_when_the_message_is_smaller() -> None:
    # "1e9" re-encodes as "1000000000.0": JSON attrs are measured after parsing,
    # and compact MessagePack attrs by their JSON size: a small message is no excuse.
    n = (L.max_attrs_bytes // len(b'"k0000":1000000000.0,')) + 1
    body = b'{"type":"click","customer_id":"c","ts":%d,"terminal_id":"T","hall_id":"H",' \
        b'"action":"help","module":"m","attrs":{' % NOW + b",".join(
            b'"k%04d":1e9' % i for i in range(n)) + b"}}"
    limits = Limits(max_attrs_keys=1_000)
    assert len(body) < L.max_attrs_bytes
    dl = decode(body, "json", limits)
    assert type(dl) is DeadLetter and dl.reason == "too_large"
    attrs = {f"k{i:04d}": 0.12345678901234568 for i in range(200)}  # 9 bytes packed
    packed = encode(click(attrs=attrs), "msgpack")
    assert len(packed) < L.max_attrs_bytes < len(json_dumps(attrs))
    dl = decode(packed, "msgpack", limits)
    assert type(dl) is DeadLetter and dl.reason == "too_large"


@pytest.mark.parametrize("fmt", FORMATS)
def test_attrs_with_32_keys_are_accepted_33_are_not(fmt: Format) -> None:
    accepted(click(attrs={f"k{i}": i for i in range(32)}), fmt)
    dl = rejected(click(attrs={f"k{i}": i for i in range(33)}), fmt)
    assert (dl.reason, dl.detail) == ("too_large", "attrs has more than 32 keys")


def _nested(depth: int) -> dict[str, Any]:
    """attrs nested ``depth`` objects and lists deep (attrs itself is level 1)."""
    v: Any = 1
    for i in range(depth - 1):
        v = [v] if i % 2 else {"k": v}
    return {"k": v}


@pytest.mark.parametrize("fmt", FORMATS)
def test_attrs_nested_8_deep_are_accepted_9_are_not(fmt: Format) -> None:
    env = accepted(click(attrs=_nested(8)), fmt)
    assert type(env.event) is ClickEvent and env.event.attrs == _nested(8)
    dl = rejected(click(attrs=_nested(9)), fmt)
    assert (dl.reason, dl.detail) == ("too_large", "attrs is nested more than 8 levels deep")


def test_deeply_nested_attrs_cannot_break_a_snapshot() -> None:
    """Regression: 600-deep attrs used to decode (the message is only ~1.3 kB), then
    crash the replay shard's snapshot with a RecursionError when recovery is on."""
    deep = b'{"type":"click","customer_id":"c","ts":%d,"terminal_id":"T","hall_id":"H",' \
        b'"action":"help","module":"m","attrs":{"a":' % NOW + b"[" * 600 + b"]" * 600 + b"}}"
    dl = decode(deep)
    assert type(dl) is DeadLetter and dl.reason == "too_large"
    # The deepest attrs allowed survive a snapshot and a restore in the replay buffer.
    eng = ShardEngine(0, parse_rules(default_rules_doc()), InMemoryProfileStore(),
                      EngineConfig(shards=1))
    eng.buffer_event(accepted(click(attrs=_nested(L.max_attrs_depth))))
    state = unpack(pack(eng.snapshot()))
    again = ShardEngine(0, parse_rules(default_rules_doc()), InMemoryProfileStore(),
                        EngineConfig(shards=1), state)
    restored = again.buffer[0][3].event
    assert type(restored) is ClickEvent and restored.attrs == _nested(L.max_attrs_depth)


@pytest.mark.parametrize(("value", "reason", "detail"), [
    (float("nan"), "invalid_value", "attrs holds NaN or an infinite number"),
    (float("-inf"), "invalid_value", "attrs holds NaN or an infinite number"),
    (b"bytes", "wrong_type", "attrs holds a value of type bytes, not JSON"),
    (msgpack.ExtType(3, b"x"), "wrong_type", "attrs holds a value of type ExtType, not JSON"),
    (msgpack.Timestamp(1, 0), "wrong_type", "attrs holds a value of type Timestamp, not JSON"),
])
def test_msgpack_attrs_must_be_json_data(value: Any, reason: str, detail: str) -> None:
    accepted(click(attrs={"x": [1.5, {"y": None}]}), "msgpack")
    dl = rejected(click(attrs={"x": [1, {"y": value}]}), "msgpack")
    assert (dl.reason, dl.detail) == (reason, detail)
    dl = rejected(click(attrs={b"x": 1}), "msgpack")
    assert (dl.reason, dl.detail) == ("wrong_type", "attrs keys must be strings")


# --- numbers and time -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_event_time_between_2000_and_2100(fmt: Format) -> None:
    accepted(location(ts=MIN_TS_MS), fmt)
    accepted(location(ts=MAX_TS_MS - 1), fmt)
    for ts in (MIN_TS_MS - 1, MAX_TS_MS):
        dl = rejected(location(ts=ts), fmt)
        assert (dl.reason, dl.detail) == ("ts_out_of_range", "ts is not between 2000 and 2100")


def test_counts_up_to_a_billion() -> None:
    doc = {"type": "calls", "customer_id": "c", "ts": NOW, "interval_s": 1_000_000_000,
           "calls_in": 1_000_000_000, "calls_out": 0, "missed": 0}
    accepted(doc)
    dl = rejected({**doc, "calls_in": 1_000_000_001})
    assert (dl.reason, dl.detail) == ("invalid_value", "calls_in is out of range")


def test_live_clock_skew_and_history_horizon_at_the_boundary() -> None:
    es = load_settings(mode="live").engine
    skew, horizon = int(es.max_clock_skew_s * 1000), int(es.history_horizon_s * 1000)
    intake = LiveIntake(L, int(es.allowed_lateness_s * 1000), horizon, skew)

    def one(ts: int) -> Envelope | DeadLetter:
        out: list[Any] = []
        envs = intake([[RawRecord("t", 1, json_dumps(location(ts=ts)))]], NOW, out)
        return envs[0] if envs else out[0]

    assert type(one(NOW + skew)) is Envelope
    assert type(one(NOW - horizon)) is Envelope
    future, late = one(NOW + skew + 1), one(NOW - horizon - 1)
    assert type(future) is DeadLetter and type(late) is DeadLetter
    assert (future.reason, future.detail) == ("ts_in_future",
                                              "event time is more than 3600 s ahead")
    assert (late.reason, late.detail) == ("late", "event time is more than 691200 s old")


# --- the settings reach the flow ----------------------------------------------------


def test_message_and_attrs_limits_from_settings_apply_in_the_live_flow() -> None:
    settings = load_settings(mode="live", engine={"max_message_bytes": 1_000,
                                                  "max_attrs_bytes": 100})
    body = json_dumps(location())
    records = [
        RawRecord("t", 1, body + b" " * (1_000 - len(body))),
        RawRecord("t", 2, body + b" " * (1_001 - len(body))),
        RawRecord("t", 3, json_dumps(click(attrs=_attrs_of_size(100)))),
        RawRecord("t", 4, json_dumps(click(attrs=_attrs_of_size(101)))),
    ]
    dead: list[DeadLetter] = []
    stats: list[dict[str, Any]] = []
    flow = build_flow(settings, source=TestingSource(records),
                      outputs=Outputs(dead_letters=[TestingSink(dead)],
                                      stats=[TestingSink(stats)]),
                      rules=parse_rules(default_rules_doc()), profiles=InMemoryProfileStore(),
                      now_ms=lambda: NOW)
    run_main(flow)
    assert [(d.pos, d.reason, d.detail) for d in dead] == [
        (2, "too_large", "message is larger than 1000 bytes"),
        (4, "too_large", "attrs is larger than 100 bytes"),
    ]
    assert stats[-1]["events"] == {"click": 1, "location": 1}


# --- rules ----------------------------------------------------------------------------


def test_rules_file_of_exactly_max_bytes_loads_one_more_byte_does_not(tmp_path: Path) -> None:
    text = DEFAULT_RULES_PATH.read_text("utf-8") + "# "
    at = tmp_path / "at.yaml"
    at.write_text(text + "x" * (MAX_RULES_FILE_BYTES - len(text.encode()) - 1) + "\n", "utf-8")
    over = tmp_path / "over.yaml"
    over.write_text(text + "x" * (MAX_RULES_FILE_BYTES - len(text.encode())) + "\n", "utf-8")
    assert (at.stat().st_size, over.stat().st_size) == (MAX_RULES_FILE_BYTES,
                                                         MAX_RULES_FILE_BYTES + 1)
    assert len(load_rules(at).rules) == 7
    with pytest.raises(RulesError) as ei:
        load_rules(over)
    assert ei.value.errors == [f"{over}: file is larger than 1048576 bytes"]


def test_at_most_500_rules(tmp_path: Path) -> None:
    doc = default_rules_doc()
    music = next(r for r in doc["rules"] if r["id"] == "music-pref")

    def with_rules(n: int) -> dict[str, Any]:
        return {**doc, "rules": [{**music, "id": f"music-{i}"} for i in range(n)]}

    assert len(parse_rules(with_rules(MAX_RULES)).rules) == 500
    with pytest.raises(RulesError) as ei:
        parse_rules(with_rules(MAX_RULES + 1), "many.yaml")
    assert ei.value.errors == ["many.yaml: rules: List should have at most 500 items "
                               "after validation, not 501"]
