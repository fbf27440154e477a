"""Hostile and broken input: property tests of the decoder and fuzz runs of the live flow.

Every malformed message (truncated JSON or MessagePack, wrong types, huge strings, deep
nesting, NaN and infinities, invalid UTF-8, timestamps far in the past or future, keys
that disagree with bodies, ...) must land in the dead letters with its reason; valid
traffic mixed with it must give exactly the outputs it gives alone; the flow must run
to the end; and memory must not grow with the number of bad messages.

The bad messages come from :data:`CATEGORIES`: each category builds, from a seeded
``random.Random``, a message that is bad in one known way and says which dead-letter
reason it must get. Hypothesis drives the categories (``st.randoms``) for the property
tests; the flow runs draw them from ``random.Random(f"{seed}:{n}")``, so the sink can
rebuild the n-th bad message to check its dead letter without keeping a list.
"""

from __future__ import annotations

import random
import string
import threading
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import yaml
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import cluster_main, run_main
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flows.codec import json_dumps, pack
from flows.engine import EngineConfig, ShardEngine
from flows.experience import LiveIntake, Outputs, ShardRouter, build_flow
from flows.model import (
    CLICK_ACTIONS,
    DEFAULT_LIMITS,
    MAX_TS_MS,
    MIN_TS_MS,
    Alert,
    DeadLetter,
    Envelope,
    Format,
    Profile,
    Push,
    RawRecord,
)
from flows.rules import RuleSet, parse_rules
from flows.settings import load_settings
from state.profiles import InMemoryProfileStore
from tests.flows.helpers import DEFAULT_RULES_PATH

NOW = 1_790_000_000_000  # the injected live clock
S = 1_000
MIN = 60 * S
H = 60 * MIN

SETTINGS = load_settings(mode="live")
ES = SETTINGS.engine
LATENESS_MS = int(ES.allowed_lateness_s * 1000)
HORIZON_MS = int(ES.history_horizon_s * 1000)
SKEW_MS = int(ES.max_clock_skew_s * 1000)
LIMITS = DEFAULT_LIMITS
assert (LIMITS.max_message_bytes, LIMITS.max_attrs_bytes) == (
    ES.max_message_bytes, ES.max_attrs_bytes), "the flow's limits are the defaults"
INTAKE = LiveIntake(LIMITS, LATENESS_MS, HORIZON_MS, SKEW_MS)

CLICKS = f"{SETTINGS.kafka.clicks_topic}/0"
LOCATION = f"{SETTINGS.kafka.location_topic}/0"
CALLS = f"{SETTINGS.kafka.calls_topic}/0"
SOURCES = (CLICKS, LOCATION, CALLS)
FORMATS: tuple[Format, ...] = ("json", "msgpack")

REASONS = frozenset({
    "invalid_json", "invalid_msgpack", "too_large", "not_an_object", "missing_field",
    "wrong_type", "invalid_value", "ts_out_of_range", "unknown_type", "key_mismatch",
    "late", "ts_in_future",
})



def hypothesis(examples: int) -> settings:
    """Reproducible Hypothesis settings (derandomized: the same examples in CI)."""
    return settings(derandomize=True, database=None, deadline=None, max_examples=examples,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- valid traffic -----------------------------------------------------------------

N_CUSTOMERS = 180
# The longest id allowed, a non-ASCII one and one with a space: valid, never dead letters.
SPECIAL_IDS = ("9" * LIMITS.max_customer_id_len, "客户-0001", "cust 0002")


def cid_of(i: int) -> str:
    """The i-th customer of the valid traffic."""
    return SPECIAL_IDS[i] if i < len(SPECIAL_IDS) else f"139{i:08d}"


def valid_profiles() -> list[Profile]:
    """Profiles that make the default rules fire: setup guide, music, trial ending."""
    out = []
    for i in range(N_CUSTOMERS):
        kind = i % 5
        out.append(Profile(
            cid_of(i),
            subscriptions=frozenset({"care_link"} if kind == 0 else set()),
            prefs={"music": ("jazz", "folk")} if kind == 1 else {},
            trials={"video_ring": NOW + 24 * H} if kind == 2 else {},
        ))
    return out


SLOW = frozenset(range(0, N_CUSTOMERS, 36))  # five customers stuck on the door step


def fuzz_rules() -> RuleSet:
    """The default rules with a 10-minute help sprite.

    Live, a timer whose deadline has passed fires at the next batch: with the clock
    pinned at ``NOW`` and a 90 s dwell, the door step's timers would fire or not
    depending on where batches break, bad messages or not.
    """
    doc = yaml.safe_load(DEFAULT_RULES_PATH.read_text("utf-8"))
    for r in doc["rules"]:
        if r["id"] == "help-sprite":
            r["trigger"]["dwell"] = "10m"
    return parse_rules(doc, "fuzz-rules")


def customer_events(i: int) -> list[tuple[str, dict[str, Any]]]:
    """One customer's valid events in order: stale history, then a fresh visit.

    Kind 3 goes to the cinema twice (cinema-pay), kind 4 has a call spike
    (call-spike); the five :data:`SLOW` customers stay 220 s on the door step
    (step-friction: exactly these five, whatever the order they arrive in), the
    others 30 s on the intro step.
    """
    cid = cid_of(i)
    kind = i % 5
    events: list[tuple[str, dict[str, Any]]] = []

    def add(source: str, doc: dict[str, Any]) -> None:
        events.append((source, {"customer_id": cid, "event_id": f"{cid}/{len(events)}",
                                **doc}))

    poi = "cinema" if kind == 3 else "mall"
    # Older than the lateness but within the horizon: history only, no triggers.
    add(LOCATION, {"type": "location", "ts": NOW - 3 * H, "cell_id": "C17", "poi": poi})
    for k in range(4):
        add(CALLS, {"type": "calls", "ts": NOW - 4 * H + k * 15 * MIN, "interval_s": 900,
                    "calls_in": 2, "calls_out": 1, "missed": 0})
    hall = f"H{i % 7:02d}"
    click = {"type": "click", "terminal_id": f"{hall}-T01", "hall_id": hall}
    add(CLICKS, {**click, "ts": NOW - 250 * S, "action": "session_start"})
    enter: dict[str, Any] = {**click, "ts": NOW - 245 * S, "action": "module_enter",
                             "module": "music" if kind == 1 else "remote_cam"}
    if i % 2:
        enter["attrs"] = {"lang": "zh", "screen": {"w": 1080, "h": 1920}, "ab": [1, 2.5]}
    add(CLICKS, enter)
    step = "door" if i in SLOW else "intro"
    add(CLICKS, {**click, "ts": NOW - (240 if i in SLOW else 50) * S, "action": "step_enter",
                 "module": "remote_cam", "step": step})
    add(CLICKS, {**click, "ts": NOW - 20 * S, "action": "step_exit", "module": "remote_cam",
                 "step": step})
    add(CLICKS, {**click, "ts": NOW - 15 * S, "action": "help", "module": "remote_cam"})
    add(LOCATION, {"type": "location", "ts": NOW - 60 * S, "cell_id": "C18", "poi": poi})
    add(CALLS, {"type": "calls", "ts": NOW - 30 * S, "interval_s": 900,
                "calls_in": 25 if kind == 4 else 2, "calls_out": 5 if kind == 4 else 1,
                "missed": 0})
    add(CLICKS, {**click, "ts": NOW - 10 * S, "action": "session_end"})
    return events


def encode(doc: Any, fmt: Format) -> bytes:
    """A document as JSON (orjson) or MessagePack bytes."""
    return json_dumps(doc) if fmt == "json" else bytes(msgpack.packb(doc, use_bin_type=True))


def valid_traffic(seed: int = 5) -> list[RawRecord]:
    """Every customer's events, interleaved at random but each customer's in order;
    JSON and MessagePack alternate, and one record in four has no key."""
    rng = random.Random(seed)
    queues = {i: customer_events(i) for i in range(N_CUSTOMERS)}
    out: list[RawRecord] = []
    while queues:
        i = rng.choice(list(queues))
        source, doc = queues[i].pop(0)
        if not queues[i]:
            del queues[i]
        n = len(out)
        fmt: Format = "msgpack" if (i + n) % 2 else "json"
        key = None if (i + n) % 4 == 3 else doc["customer_id"].encode()
        out.append(RawRecord(source, n, encode(doc, fmt), key, fmt))
    return out


# --- bad messages ------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One malformed message and the dead-letter reason it must get."""

    value: bytes
    key: bytes | None
    fmt: Format
    reason: str


def base_doc(rng: random.Random, typ: str | None = None) -> dict[str, Any]:
    """A valid, fresh event of a customer of the valid traffic (before it is spoiled)."""
    typ = typ or rng.choice(("click", "location", "calls"))
    doc: dict[str, Any] = {"type": typ, "customer_id": cid_of(rng.randrange(N_CUSTOMERS)),
                           "ts": NOW - rng.randrange(LATENESS_MS)}
    if rng.random() < 0.5:
        doc["event_id"] = f"x{rng.getrandbits(40):x}"
    if typ == "click":
        action = rng.choice(sorted(CLICK_ACTIONS))
        doc.update(terminal_id="H01-T02", hall_id="H01", action=action)
        if action not in ("session_start", "session_end") or rng.random() < 0.3:
            doc["module"] = rng.choice(("music", "remote_cam", "care_link"))
        if action in ("step_enter", "step_exit"):
            doc["step"] = "door"
    elif typ == "location":
        doc["cell_id"] = f"C{rng.randrange(100)}"
        if rng.random() < 0.7:
            doc["poi"] = rng.choice(("cinema", "mall", "stadium"))
    else:
        doc.update(interval_s=300, calls_in=rng.randrange(50), calls_out=rng.randrange(50),
                   missed=rng.randrange(5))
    return doc


def _required(doc: dict[str, Any]) -> list[str]:
    req = ["type", "customer_id", "ts"]
    if doc["type"] == "click":
        req += ["action", "terminal_id", "hall_id"]
        req += ["module"] if doc["action"] not in ("session_start", "session_end") else []
        req += ["step"] if doc["action"] in ("step_enter", "step_exit") else []
    elif doc["type"] == "location":
        req += ["cell_id"]
    else:
        req += ["interval_s", "calls_in", "calls_out", "missed"]
    return req


def _str_fields(doc: dict[str, Any]) -> list[str]:
    return [k for k, v in doc.items() if type(v) is str and k != "type"]


def _limit(name: str) -> int:
    return LIMITS.max_customer_id_len if name == "customer_id" else LIMITS.max_field_len


def _key(rng: random.Random, doc: Any) -> bytes | None:
    """The message key a bad message travels with: its own customer's id, mostly."""
    if rng.random() < 0.25:
        return None
    cid = doc.get("customer_id") if isinstance(doc, dict) else None
    if type(cid) is not str:
        cid = cid_of(rng.randrange(N_CUSTOMERS))
    return cid.encode()


def _fmt(rng: random.Random) -> Format:
    return "json" if rng.random() < 0.5 else "msgpack"


def _text(rng: random.Random, n: int) -> str:
    alphabet = string.ascii_letters + string.digits + "é中文😀"
    return "".join(rng.choice(alphabet) for _ in range(n)) if n < 256 else (
        rng.choice(alphabet) * n)


def _spoiled(rng: random.Random, doc: dict[str, Any], reason: str,
             fmt: Format | None = None) -> Bad:
    fmt = fmt or _fmt(rng)
    return Bad(encode(doc, fmt), _key(rng, doc), fmt, reason)


# Each category: rng -> a message bad in one known way. Format-independent ones pick
# JSON or MessagePack at random; the others are specific to one format.


def cat_missing_field(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    name = rng.choice(_required(doc))
    if rng.random() < 0.5:
        del doc[name]
    else:
        doc[name] = None
    return _spoiled(rng, doc, "missing_field")


def cat_wrong_type(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    ints = ["ts"] + (["interval_s", "calls_in", "calls_out", "missed"]
                     if doc["type"] == "calls" else [])
    name = rng.choice(_str_fields(doc) + ints)
    if name in ints:
        doc[name] = rng.choice([str(doc[name]), float(doc[name]) + 0.5, float(doc[name]),
                                True, False, [doc[name]], {"v": doc[name]}])
    else:
        doc[name] = rng.choice([7, -1, 1.5, True, [doc[name]], {"v": doc[name]}, []])
    return _spoiled(rng, doc, "wrong_type")


def cat_invalid_value(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    choice = rng.randrange(4)
    if choice == 0:
        doc[rng.choice(_str_fields(doc))] = ""
    elif choice == 1:
        # Control, format and separator characters in the customer id.
        cid = doc["customer_id"][: LIMITS.max_customer_id_len - 1]
        at = rng.randrange(len(cid) + 1)
        bad = rng.choice(["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\u202e", "\u2028",
                          "\u200b", "\ufeff", "\x85"])
        doc["customer_id"] = cid[:at] + bad + cid[at:]
    elif choice == 2 or doc["type"] == "location":
        doc = base_doc(rng, "click")
        doc["action"] = rng.choice(["dance", "Session_Start", "session start", "orders",
                                    "help ", "DROP TABLE", "📱"])
    else:
        doc = base_doc(rng, "calls")
        name = rng.choice(["interval_s", "calls_in", "calls_out", "missed"])
        doc[name] = rng.choice([-1, -rng.randrange(1, 10**12), 1_000_000_001,
                                rng.randrange(10**9 + 1, 2**62)])
        if name == "interval_s" and rng.random() < 0.5:
            doc[name] = 0
    return _spoiled(rng, doc, "invalid_value")


def cat_too_long(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    name = rng.choice(_str_fields(doc))
    doc[name] = _text(rng, _limit(name) + rng.choice([1, 2, 50, 1_000, 15_000]))
    return _spoiled(rng, doc, "too_large")


def cat_huge_message(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    if rng.random() < 0.5:
        doc[rng.choice(_str_fields(doc))] = "y" * rng.randrange(LIMITS.max_message_bytes,
                                                                 3 * LIMITS.max_message_bytes)
        return _spoiled(rng, doc, "too_large")
    # Valid JSON but for its size: whitespace after the object.
    body = json_dumps(doc)
    return Bad(body + b" " * (LIMITS.max_message_bytes + 1 - len(body)), _key(rng, doc),
               "json", "too_large")


def cat_ts_out_of_range(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    doc["ts"] = rng.choice([0, -1, MIN_TS_MS - 1, MAX_TS_MS, rng.randrange(-2**53, MIN_TS_MS),
                            rng.randrange(MAX_TS_MS, 2**62), 1_790_000_000,
                            1_790_000_000_000_000])
    return _spoiled(rng, doc, "ts_out_of_range")


def cat_late(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    doc["ts"] = rng.choice([NOW - HORIZON_MS - 1, MIN_TS_MS,
                            rng.randrange(MIN_TS_MS, NOW - HORIZON_MS)])
    return _spoiled(rng, doc, "late")


def cat_future(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    doc["ts"] = rng.choice([NOW + SKEW_MS + 1, MAX_TS_MS - 1,
                            rng.randrange(NOW + SKEW_MS + 1, MAX_TS_MS)])
    return _spoiled(rng, doc, "ts_in_future")


def cat_unknown_type(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    doc["type"] = rng.choice(["teleport", "", "Click", "CLICK", "clicks", " click", 3, 1.5,
                              True, ["click"], {"type": "click"}])
    return _spoiled(rng, doc, "unknown_type")


def cat_not_an_object(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    value = rng.choice([[doc], [], 1, -2.5, "click", None, True, False, [[[1]]]])
    fmt = _fmt(rng)
    return Bad(encode(value, fmt), _key(rng, doc), fmt, "not_an_object")


def _nest(depth: int, leaf: Any, rng: random.Random) -> Any:
    """``leaf`` inside ``depth`` lists or objects."""
    v = leaf
    for _ in range(depth):
        v = [v] if rng.random() < 0.5 else {"k": v}
    return v


def cat_bad_attrs(rng: random.Random) -> Bad:
    doc = base_doc(rng, "click")
    choice = rng.randrange(4)
    if choice == 0:
        doc["attrs"] = rng.choice([[1, 2], "lang=zh", 7, True, 1.5, []])
        return _spoiled(rng, doc, "wrong_type")
    if choice == 1:
        n = rng.randrange(LIMITS.max_attrs_keys + 1, 4 * LIMITS.max_attrs_keys)
        doc["attrs"] = {f"k{j}": j for j in range(n)}
    elif choice == 2:
        doc["attrs"] = {"note": "z" * rng.randrange(LIMITS.max_attrs_bytes, 20_000)}
    else:  # nested deeper than allowed (attrs itself is level 1)
        depth = rng.choice([LIMITS.max_attrs_depth + 1, 50, 200, 1000])
        if depth <= 200:
            doc["attrs"] = {"deep": _nest(depth - 1, 1, rng)}
        else:  # deeper than the encoders go: splice the bytes in
            fmt = _fmt(rng)
            doc["attrs"] = "@@HERE@@"
            if fmt == "json":
                raw = b'{"k":' * depth + b"1" + b"}" * depth
                body = json_dumps(doc).replace(b'"@@HERE@@"', raw)
            else:
                raw = b"\x81\xa1k" * depth + b"\x01"
                body = msgpack.packb(doc, use_bin_type=True).replace(b"\xa8@@HERE@@", raw)
            return Bad(body, _key(rng, doc), fmt, "too_large")
    return _spoiled(rng, doc, "too_large")


def cat_key_mismatch(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    cid: str = doc["customer_id"]
    raw = cid.encode()
    key = rng.choice([
        cid_of(rng.randrange(N_CUSTOMERS)).encode(), raw + b" ", b" " + raw, b"", raw[:-1],
        b"\xff" + raw, raw.upper() + b"X", raw * 2, rng.randbytes(rng.randrange(1, 300)),
        cid.encode("utf-16"),
    ])
    if key == raw:
        key = raw + b"\x00"
    fmt = _fmt(rng)
    return Bad(encode(doc, fmt), key, fmt, "key_mismatch")


# --- JSON only ---


def _json_with(rng: random.Random, replacement: bytes, reason: str,
               where: str | None = None) -> Bad:
    """A valid JSON event with one string field's value replaced by raw bytes."""
    doc = base_doc(rng)
    name = where or rng.choice(_str_fields(doc))
    doc[name] = "@@HERE@@"
    body = json_dumps(doc).replace(b'"@@HERE@@"', replacement)
    return Bad(body, _key(rng, doc), "json", reason)


def cat_json_truncated(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    body = json_dumps(doc)
    return Bad(body[: rng.randrange(len(body))], _key(rng, doc), "json", "invalid_json")


def cat_json_invalid_utf8(rng: random.Random) -> Bad:
    bad = rng.choice([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf",
                      b"\x80", b"\xe2\x82", b"\xfe\xfe\xff\xff"])
    return _json_with(rng, b'"ab' + bad + b'cd"', "invalid_json")


def cat_json_lone_surrogate(rng: random.Random) -> Bad:
    esc = rng.choice([b"\\ud800", b"\\udfff", b"\\ud800\\u0041", b"x\\udbff"])
    return _json_with(rng, b'"' + esc + b'"', "invalid_json")


def cat_json_nan(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    name = rng.choice(["ts"] + (["calls_in", "missed"] if doc["type"] == "calls" else []))
    doc[name] = "@@HERE@@"
    literal = rng.choice([b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"nan", b"inf",
                          b"1e999", b"-1e400", b"1.8e308"])
    body = json_dumps(doc).replace(b'"@@HERE@@"', literal)
    return Bad(body, _key(rng, doc), "json", "invalid_json")


def cat_json_big_number(rng: random.Random) -> Bad:
    # Integers beyond 64 bits parse as floats: a float where an integer belongs.
    doc = base_doc(rng, "calls")
    name = rng.choice(["ts", "calls_in", "interval_s"])
    doc[name] = "@@HERE@@"
    literal = rng.choice([b"18446744073709551616", b"-9223372036854775809",
                          b"1" + b"0" * rng.randrange(20, 300), b"1.79e12"])
    body = json_dumps(doc).replace(b'"@@HERE@@"', literal)
    return Bad(body, _key(rng, doc), "json", "wrong_type")


def cat_json_trailing(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    body = json_dumps(doc)
    tail = rng.choice([b"x", b"}", b"{}", b",", b"\x00", b"]", body, b" //", b"\n{"])
    return Bad(body + tail, _key(rng, doc), "json", "invalid_json")


def cat_json_not_json(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    value = rng.choice([
        b"", b" ", b"\n\t", b"\xef\xbb\xbf" + json_dumps(doc), b"{'type': 'click'}",
        b'{"type": "click",}', b"/* c */" + json_dumps(doc), b"\x00" + rng.randbytes(40),
        b"undefined", b"{type: click}", msgpack.packb(doc, use_bin_type=True),
        json_dumps(doc).replace(b'"', b"'"), json_dumps(doc).decode().encode("utf-16"),
    ])
    return Bad(value, _key(rng, doc), "json", "invalid_json")


def cat_json_deep(rng: random.Random) -> Bad:
    n = rng.choice([1025, 1100, 5_000, 20_000])
    if rng.random() < 0.5:
        value = b"[" * n + b"]" * n
        return Bad(value, _key(rng, None), "json", "invalid_json")
    if rng.random() < 0.5:  # too deep for the parser, inside a field
        return _json_with(rng, b"[" * n + b"]" * n, "invalid_json", "customer_id")
    depth = rng.choice([1, 2, 100, 1000])  # parses, but a list is no customer id
    return _json_with(rng, b"[" * depth + b"]" * depth, "wrong_type", "customer_id")


# --- MessagePack only ---


def cat_msgpack_truncated(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    body = msgpack.packb(doc, use_bin_type=True)
    return Bad(body[: rng.randrange(len(body))], _key(rng, doc), "msgpack", "invalid_msgpack")


def cat_msgpack_invalid_utf8(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    doc[rng.choice(_str_fields(doc))] = "@@HERE@@"
    bad = rng.choice([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"])
    body = msgpack.packb(doc, use_bin_type=True).replace(b"@@HERE@@", bad.ljust(8, b"a"))
    return Bad(body, _key(rng, doc), "msgpack", "invalid_msgpack")


def cat_msgpack_malformed(rng: random.Random) -> Bad:
    doc = base_doc(rng)
    body = msgpack.packb(doc, use_bin_type=True)
    n = rng.choice([1025, 3_000, 20_000])
    int_key: dict[Any, Any] = {1: 2, **doc}
    value = rng.choice([
        b"", body + body, body + b"\xc0", b"\xc1", b"\x82\xa4type\xa5click\xa1k\xc1",
        b"\x91" * n + b"\xc0", b"\x81\xa1k" * n + b"\xc0",
        b"\xdb\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff\xa1a\x01",
        b"\xc6\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01", b"\xc7\x05\xff\x00\x00\x00\x00\x00",
        json_dumps(doc),  # JSON sent where MessagePack is expected
        encode(int_key, "msgpack"),  # an integer map key
        msgpack.packb({**doc, "attrs": {None: 1}}, use_bin_type=True),
    ])
    return Bad(value, _key(rng, doc), "msgpack", "invalid_msgpack")


def cat_msgpack_values(rng: random.Random) -> Bad:
    """What MessagePack can carry and JSON cannot: NaN, infinities, bytes, extension
    types, timestamps, huge integers, bytes keys."""
    doc = base_doc(rng)
    choice = rng.randrange(8)
    odd = rng.choice([float("nan"), float("inf"), float("-inf"), b"13800001234",
                      msgpack.ExtType(5, b"\x00\x01"), msgpack.Timestamp(1_790_000_000, 0)])
    if choice == 0:
        doc["ts"] = odd
        reason = "wrong_type"
    elif choice == 1:
        doc[rng.choice(_str_fields(doc))] = odd
        reason = "wrong_type"
    elif choice == 2:
        doc = base_doc(rng, "calls")
        doc[rng.choice(["calls_in", "interval_s"])] = float(rng.choice(["nan", "inf", "-inf"]))
        reason = "wrong_type"
    elif choice == 3:
        doc = base_doc(rng, "click")
        bad = rng.choice([float("nan"), float("inf"), float("-inf")])
        doc["attrs"] = {"score": bad} if rng.random() < 0.5 else {"xs": [1, {"y": bad}]}
        reason = "invalid_value"
    elif choice == 4:
        doc = base_doc(rng, "click")
        odd = rng.choice([b"raw", msgpack.ExtType(5, b"x"), msgpack.Timestamp(1, 0)])
        choices: list[dict[Any, Any]] = [{"v": odd}, {"l": [1, odd]}, {b"bytes-key": 1}]
        doc["attrs"] = rng.choice(choices)
        reason = "wrong_type"
    elif choice == 5:
        doc["ts"] = rng.choice([2**64 - 1, -(2**63), 2**63])
        reason = "ts_out_of_range"
    elif choice == 6:
        doc = base_doc(rng, "calls")
        doc[rng.choice(["calls_in", "missed"])] = rng.choice([2**64 - 1, -(2**63)])
        reason = "invalid_value"
    else:  # a bytes key where the customer_id string key belongs
        odd_doc: dict[Any, Any] = dict(doc)
        odd_doc[b"customer_id"] = odd_doc.pop("customer_id")
        return Bad(encode(odd_doc, "msgpack"), _key(rng, None), "msgpack", "missing_field")
    return Bad(encode(doc, "msgpack"), _key(rng, doc), "msgpack", reason)


CATEGORIES: dict[str, tuple[Callable[[random.Random], Bad], float]] = {
    "missing_field": (cat_missing_field, 1.0),
    "wrong_type": (cat_wrong_type, 1.0),
    "invalid_value": (cat_invalid_value, 1.0),
    "too_long": (cat_too_long, 1.0),
    "huge_message": (cat_huge_message, 0.2),
    "ts_out_of_range": (cat_ts_out_of_range, 1.0),
    "late": (cat_late, 1.0),
    "future": (cat_future, 1.0),
    "unknown_type": (cat_unknown_type, 0.5),
    "not_an_object": (cat_not_an_object, 0.5),
    "bad_attrs": (cat_bad_attrs, 1.0),
    "key_mismatch": (cat_key_mismatch, 1.0),
    "json_truncated": (cat_json_truncated, 1.0),
    "json_invalid_utf8": (cat_json_invalid_utf8, 1.0),
    "json_lone_surrogate": (cat_json_lone_surrogate, 0.5),
    "json_nan": (cat_json_nan, 1.0),
    "json_big_number": (cat_json_big_number, 0.5),
    "json_trailing": (cat_json_trailing, 0.5),
    "json_not_json": (cat_json_not_json, 1.0),
    "json_deep": (cat_json_deep, 0.5),
    "msgpack_truncated": (cat_msgpack_truncated, 1.0),
    "msgpack_invalid_utf8": (cat_msgpack_invalid_utf8, 1.0),
    "msgpack_malformed": (cat_msgpack_malformed, 1.0),
    "msgpack_values": (cat_msgpack_values, 1.0),
}
_NAMES = list(CATEGORIES)
_WEIGHTS = [w for _, w in CATEGORIES.values()]


@dataclass(frozen=True)
class BadRecord:
    """The n-th bad record of a seeded stream, its category and expected reason."""

    record: RawRecord
    category: str
    reason: str


BAD_POS0 = 10_000_000  # bad records' positions; valid ones count from 0


def bad_record(seed: int, n: int) -> BadRecord:
    """The n-th bad record of stream ``seed`` (a pure function of both)."""
    rng = random.Random(f"{seed}:{n}")
    name = rng.choices(_NAMES, _WEIGHTS)[0]
    bad = CATEGORIES[name][0](rng)
    rec = RawRecord(rng.choice(SOURCES), BAD_POS0 + n, bad.value, bad.key, bad.fmt)
    return BadRecord(rec, name, bad.reason)


def mixed(valid: list[RawRecord], ratio: int, seed: int) -> Iterator[RawRecord]:
    """A burst of bad records, then each valid record followed by ``ratio`` bad ones."""
    n = 0
    for _ in range(4 * ratio):
        yield bad_record(seed, n).record
        n += 1
    for rec in valid:
        yield rec
        for _ in range(ratio):
            yield bad_record(seed, n).record
            n += 1


def _mixed_of(valid: list[RawRecord], ratio: int,
              seed: int) -> Callable[[], Iterator[RawRecord]]:
    return lambda: mixed(valid, ratio, seed)


def bad_count(valid: list[RawRecord], ratio: int) -> int:
    """How many bad records :func:`mixed` yields."""
    return ratio * (4 + len(valid))


def intake_one(rec: RawRecord) -> Envelope | DeadLetter:
    """The live intake (decode, key check, time check) of one record at ``NOW``."""
    out: list[Any] = []
    envs = INTAKE([[rec]], NOW, out)
    assert len(envs) + len(out) == 1, (envs, out)
    return envs[0] if envs else out[0]


# --- property tests of the decoder --------------------------------------------------


def test_every_category_is_bad_in_both_formats_and_its_base_is_valid() -> None:
    """The generators themselves: base events are valid; each category hits its reason."""
    rng = random.Random(1)
    for _ in range(300):
        doc = base_doc(rng)
        for fmt in FORMATS:
            env = intake_one(RawRecord("t", 0, encode(doc, fmt), doc["customer_id"].encode(),
                                       fmt))
            assert type(env) is Envelope and env.fresh, env
    formats: dict[str, set[str]] = {}
    for n in range(3_000):
        b = bad_record(99, n)
        formats.setdefault(b.category, set()).add(b.record.fmt)
    assert set(formats) == set(CATEGORIES)
    both = {"missing_field", "wrong_type", "invalid_value", "too_long", "ts_out_of_range",
            "late", "future", "unknown_type", "not_an_object", "bad_attrs", "key_mismatch"}
    assert all(formats[c] == {"json", "msgpack"} for c in both)


@hypothesis(3_000)
@given(rng=st.randoms(use_true_random=False), name=st.sampled_from(_NAMES))
def test_each_malformed_message_is_a_dead_letter_with_its_reason(
        rng: random.Random, name: str) -> None:
    bad = CATEGORIES[name][0](rng)
    rec = RawRecord(CLICKS, 7, bad.value, bad.key, bad.fmt)
    got = intake_one(rec)
    assert type(got) is DeadLetter, (name, bad)
    assert (got.reason, got.raw, got.source, got.pos) == (bad.reason, bad.value, CLICKS, 7), (
        name, got.detail)
    assert got.detail
    assert got.to_dict()["reason"] == bad.reason


@hypothesis(1_500)
@given(value=st.binary(max_size=600), fmt=st.sampled_from(["json", "msgpack"]),
       key=st.none() | st.binary(max_size=70))
def test_arbitrary_bytes_never_raise(value: bytes, fmt: Format, key: bytes | None) -> None:
    got = intake_one(RawRecord("fuzz/0", 3, value, key, fmt))
    if type(got) is DeadLetter:
        assert got.reason in REASONS and got.detail and got.raw == value
        got.to_dict()  # the dead-letter output can always be written
    else:
        assert got.raw == value


_id_chars = st.characters(codec="utf-8", exclude_categories=["Cc", "Cf", "Cs", "Co", "Cn",
                                                             "Zl", "Zp", "Zs"])
_ids = st.text(_id_chars, min_size=1, max_size=LIMITS.max_customer_id_len)
_names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1,
                 max_size=LIMITS.max_field_len)
_json_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
              | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
_attrs = st.dictionaries(
    st.text(max_size=10),
    st.recursive(_json_leaf, lambda c: st.lists(c, max_size=3)
                 | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=12),
    max_size=8)


@st.composite
def valid_docs(draw: st.DrawFn) -> dict[str, Any]:
    """Valid events with hostile-looking but legal values."""
    typ = draw(st.sampled_from(["click", "location", "calls"]))
    doc: dict[str, Any] = {"type": typ, "customer_id": draw(_ids),
                           "ts": draw(st.integers(NOW - LATENESS_MS, NOW + SKEW_MS))}
    if draw(st.booleans()):
        doc["event_id"] = draw(_names)
    if typ == "click":
        action = draw(st.sampled_from(sorted(CLICK_ACTIONS)))
        doc.update(terminal_id=draw(_names), hall_id=draw(_names), action=action,
                   module=draw(_names))
        if action in ("step_enter", "step_exit") or draw(st.booleans()):
            doc["step"] = draw(_names)
        if draw(st.booleans()):
            doc["attrs"] = draw(_attrs)
    elif typ == "location":
        doc["cell_id"] = draw(_names)
        if draw(st.booleans()):
            doc["poi"] = draw(_names)
    else:
        counts = st.integers(0, 1_000_000_000)
        doc.update(interval_s=draw(st.integers(1, 1_000_000_000)), calls_in=draw(counts),
                   calls_out=draw(counts), missed=draw(counts))
    return doc


def _depth(v: Any) -> int:
    """Nesting depth in lists and objects (a scalar is 0)."""
    if type(v) is dict:
        return 1 + max(map(_depth, v.values()), default=0)
    if type(v) is list:
        return 1 + max(map(_depth, v), default=0)
    return 0


def _fields(env: Envelope) -> dict[str, Any]:
    ev = env.event
    names = [n for n in ev.__slots__ if n != "type"]
    return {n: getattr(ev, n) for n in names if getattr(ev, n) is not None}


@hypothesis(1_000)
@given(doc=valid_docs(), fmt=st.sampled_from(["json", "msgpack"]), keyed=st.booleans())
def test_valid_events_decode_to_exactly_what_was_sent(doc: dict[str, Any], fmt: Format,
                                                      keyed: bool) -> None:
    attrs = doc.get("attrs")
    assume(attrs is None or (len(json_dumps(attrs)) <= LIMITS.max_attrs_bytes
                             and _depth(attrs) <= LIMITS.max_attrs_depth))
    key = doc["customer_id"].encode() if keyed else None
    got = intake_one(RawRecord("t", 1, encode(doc, fmt), key, fmt))
    assert type(got) is Envelope, (got, doc)
    assert got.event.type == doc["type"]
    assert _fields(got) == {k: v for k, v in doc.items() if k != "type"}


@hypothesis(1_500)
@given(doc=valid_docs(), fmt=st.sampled_from(["json", "msgpack"]), data=st.data())
def test_truncated_and_mutated_valid_messages_never_raise(doc: dict[str, Any], fmt: Format,
                                                          data: st.DataObject) -> None:
    body = encode(doc, fmt)
    cut = data.draw(st.integers(0, len(body) - 1))
    got = intake_one(RawRecord("t", 1, body[:cut], None, fmt))
    assert type(got) is DeadLetter
    assert got.reason == ("invalid_json" if fmt == "json" else "invalid_msgpack")
    # Random byte edits: the result may or may not be valid, but it never raises.
    edited = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(edited)))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        byte = data.draw(st.integers(0, 255))
        if op == "insert" or at == len(edited):
            edited.insert(at, byte)
        elif op == "flip":
            edited[at] ^= byte or 1
        else:
            del edited[at]
    got = intake_one(RawRecord("t", 1, bytes(edited), None, fmt))
    assert (type(got) is DeadLetter and got.reason in REASONS and got.detail) or (
        type(got) is Envelope)


# --- the live flow under fuzz -------------------------------------------------------


class _Part(StatefulSourcePartition[RawRecord, None]):
    def __init__(self, records: Iterator[RawRecord], batch: int, memory: list[int]) -> None:
        self.records = records
        self.batch = batch
        self.memory = memory
        self.batches = 0

    def next_batch(self) -> list[RawRecord]:
        tracing = tracemalloc.is_tracing()
        if tracing and self.batches % 50 == 0:
            self.memory[0] = max(self.memory[0], held_memory())
        self.batches += 1
        out = [r for _, r in zip(range(self.batch), self.records, strict=False)]
        if not out:
            if tracing:
                self.memory[1] = held_memory()
            raise StopIteration
        return out

    def snapshot(self) -> None:
        return None


def held_memory() -> int:
    """Traced bytes held now, without single blocks of 128 KiB or more.

    A block that large is a process-wide table growing once (CPython's interned
    strings: msgpack interns map keys, and a resize allocates the whole new table in
    one block), not what messages leave behind: that would be many small blocks.
    """
    return sum(t.size for t in tracemalloc.take_snapshot().traces if t.size < 2**17)


class LazySource(FixedPartitionedSource[RawRecord, None]):
    """One partition that reads records from a generator (so no input list is held).

    While tracemalloc traces, ``memory[0]`` is the most held (:func:`held_memory`)
    between two batches (sampled every 50), ``memory[1]`` what is held when the last
    record has gone through: what the flow kept of everything it read.
    """

    def __init__(self, make: Callable[[], Iterator[RawRecord]], batch: int = 8) -> None:
        self.make = make
        self.batch = batch
        self.memory = [0, 0]

    def list_parts(self) -> list[str]:
        return ["fuzz"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _Part:
        return _Part(self.make(), self.batch, self.memory)


@dataclass
class Tally:
    """What the sinks saw; dead letters are checked and counted, never kept."""

    seed: int
    pushes: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # the latest document only
    dead: Counter[str] = field(default_factory=Counter)
    categories: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check_dead(self, d: DeadLetter) -> None:
        """Rebuild the bad record this dead letter stands for and compare."""
        b = bad_record(self.seed, d.pos - BAD_POS0) if d.pos >= BAD_POS0 else None
        with self.lock:
            self.dead[d.reason] += 1
            if b is None or (d.reason, d.raw, d.source) != (b.reason, b.record.value,
                                                            b.record.source) or not d.detail:
                if len(self.wrong) < 20:
                    self.wrong.append(f"pos {d.pos}: {d.reason}: {d.detail} "
                                      f"(expected {b.reason if b else 'no dead letter'})")
            else:
                self.categories[b.category] += 1


class _Sink(StatelessSinkPartition[Any]):
    def __init__(self, write: Callable[[Any], None]) -> None:
        self.write = write

    def write_batch(self, items: list[Any]) -> None:
        for x in items:
            self.write(x)


class CallSink(DynamicSink[Any]):
    """Hands every item to a function (from any worker)."""

    def __init__(self, write: Callable[[Any], None]) -> None:
        self.write = write

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Sink:
        return _Sink(self.write)


def run_fuzz(make: Callable[[], Iterator[RawRecord]], seed: int, workers: int = 1,
             trace: bool = False) -> tuple[Tally, tuple[int, int, int]]:
    """Run the live flow over the records: the tally, and with ``trace`` the traced
    peak, the most held between batches and what was held at the end (bytes)."""
    t = Tally(seed)

    def put(lst: list[dict[str, Any]], x: dict[str, Any]) -> None:
        with t.lock:
            lst.append(x)

    def on_push(p: Push) -> None:
        put(t.pushes, p.to_dict())

    def on_alert(a: Alert) -> None:
        put(t.alerts, a.to_cloudevent())

    def on_stats(s: dict[str, Any]) -> None:
        with t.lock:
            t.stats = s

    source = LazySource(make)
    flow = build_flow(
        SETTINGS, source=source,
        outputs=Outputs(pushes=[CallSink(on_push)], alerts=[CallSink(on_alert)],
                        dead_letters=[CallSink(t.check_dead)], stats=[CallSink(on_stats)]),
        rules=fuzz_rules(), profiles=InMemoryProfileStore(valid_profiles()),
        now_ms=lambda: NOW,
    )
    if trace:
        tracemalloc.start()
    try:
        if workers == 1:
            run_main(flow)
        else:
            cluster_main(flow, [], 0, worker_count_per_proc=workers)
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
    finally:
        if trace:
            tracemalloc.stop()
    return t, (peak, source.memory[0], source.memory[1])


def _final_stats(t: Tally) -> dict[str, Any]:
    return t.stats  # the stats step's last document, written at the end of input


def _sorted(docs: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    # Outputs of different shards interleave by batch: compare them as sets.
    return sorted(docs, key=lambda d: d[key])


def _expected_histogram(seed: int, n: int) -> Counter[str]:
    return Counter(bad_record(seed, j).reason for j in range(n))


@pytest.fixture(scope="module")
def valid() -> list[RawRecord]:
    return valid_traffic()


@pytest.fixture(scope="module")
def clean(valid: list[RawRecord]) -> Tally:
    t, _ = run_fuzz(lambda: iter(valid), seed=0)
    return t


def test_the_valid_traffic_exercises_the_rules(clean: Tally, valid: list[RawRecord]) -> None:
    rules = Counter(p["rule_id"] for p in clean.pushes)
    per_kind = N_CUSTOMERS // 5
    assert rules == {"setup-first": per_kind, "music-pref": per_kind, "trial-ending": per_kind,
                     "cinema-pay": per_kind, "call-spike": per_kind}, rules
    [alert] = clean.alerts
    assert (alert["type"], alert["subject"]) == ("touchstream.dwell.step", "remote_cam/door")
    assert {s["customer_id"] for s in alert["data"]["samples"]} == {cid_of(i) for i in SLOW}
    assert clean.dead == Counter() and clean.wrong == []
    stats = _final_stats(clean)
    assert sum(stats["events"].values()) == len(valid)
    assert stats["dead_letters_total"] == 0


def test_fuzz_live_flow_dead_letters_every_bad_message_and_changes_nothing_else(
        valid: list[RawRecord], clean: Tally) -> None:
    """One worker, 1x and 5x bad messages (11,000+ at 5x): exact dead letters, the same
    outputs as the clean run, and a traced memory peak that does not grow with them."""
    memory: dict[int, tuple[int, int, int]] = {}
    for ratio, seed in ((1, 11), (5, 55)):
        t, memory[ratio] = run_fuzz(_mixed_of(valid, ratio, seed), seed, trace=True)
        n_bad = bad_count(valid, ratio)
        assert t.wrong == []
        assert t.dead == _expected_histogram(seed, n_bad)
        assert sum(t.dead.values()) == n_bad
        assert set(t.categories) == set(CATEGORIES)
        # Every valid message processed as if the bad ones were not there.
        assert _sorted(t.pushes, "push_id") == _sorted(clean.pushes, "push_id")
        assert t.alerts == clean.alerts
        stats = _final_stats(t)
        assert stats["dead_letters_total"] == n_bad
        assert stats["dead_letters"] == dict(t.dead)
        assert stats["events"] == _final_stats(clean)["events"]
    # 9,376 more bad messages (16 MB of them) leave the memory where it was: what is
    # held at the end within 512 KiB, at most within 1 MiB (a batch in flight).
    (_, most1, end1), (_, most5, end5) = memory[1], memory[5]
    assert end5 < end1 + 2**19, memory
    assert most5 < most1 + 2**20, memory


def test_fuzz_live_flow_on_two_workers(valid: list[RawRecord]) -> None:
    clean2, _ = run_fuzz(lambda: iter(valid), seed=0, workers=2)
    t, _ = run_fuzz(lambda: mixed(valid, 1, 22), seed=22, workers=2)
    n_bad = bad_count(valid, 1)
    assert t.wrong == []
    assert sum(t.dead.values()) == n_bad and t.dead == _expected_histogram(22, n_bad)
    assert _sorted(t.pushes, "push_id") == _sorted(clean2.pushes, "push_id")
    assert len(clean2.pushes) == N_CUSTOMERS
    assert t.alerts == clean2.alerts and len(t.alerts) == 1
    assert _final_stats(t)["dead_letters_total"] == n_bad


def _engine_run(records: Iterator[RawRecord]) -> tuple[dict[str, bytes],
                                                      dict[str, list[Any]]]:
    """The live shard path in plain Python: route, decode, apply. The shards'
    snapshots and what each shard emitted, dead letters aside."""
    router = ShardRouter(ES.shards, LIMITS, None)
    rules = fuzz_rules()
    profiles = InMemoryProfileStore(valid_profiles())
    config = EngineConfig(shards=ES.shards, idle_ttl_ms=int(ES.idle_ttl_s * 1000))
    engines: dict[str, ShardEngine] = {}
    outputs: dict[str, list[Any]] = {}
    batch: list[RawRecord] = []

    def flush() -> None:
        for key, group in router(batch):
            eng = engines.get(key)
            if eng is None:
                eng = engines[key] = ShardEngine(-1, rules, profiles, config)
            out: list[Any] = []
            eng.on_live_batch(INTAKE([group.records], NOW, out), NOW, out, group.profiles)
            kept = [x for x in out if type(x) is not DeadLetter]
            if kept:
                outputs.setdefault(key, []).extend(kept)
        batch.clear()

    for rec in records:
        batch.append(rec)
        if len(batch) == 32:
            flush()
    flush()
    snaps = {}
    for key, eng in engines.items():
        eng.take_stats()
        snaps[key] = pack(eng.snapshot())
    return snaps, outputs


def test_bad_messages_leave_no_state_behind(valid: list[RawRecord]) -> None:
    """The shards' whole state after the clean stream and after 1x and 5x bad messages
    mixed in is byte for byte the same: nothing of a bad message is kept."""
    clean_snaps, clean_out = _engine_run(iter(valid))
    kinds = Counter(type(x).__name__ for v in clean_out.values() for x in v)
    assert kinds == {"Push": N_CUSTOMERS, "VisitDone": N_CUSTOMERS}, kinds
    idle = ShardEngine(-1, fuzz_rules(), InMemoryProfileStore(),
                       EngineConfig(shards=ES.shards,
                                    idle_ttl_ms=int(ES.idle_ttl_s * 1000)))
    idle.on_live_batch([], NOW, [])
    empty = pack(idle.snapshot())
    for ratio in (1, 5):
        snaps, out = _engine_run(mixed(valid, ratio, 7 * ratio))
        assert out == clean_out
        for key, snap in snaps.items():
            # A shard only bad messages reached holds what an idle shard holds.
            assert snap == clean_snaps.get(key, empty), key
