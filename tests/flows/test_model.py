"""The input model's hand-written constructors and the envelope's idempotency key.

RawRecord, the three events and Envelope are built by one function each that writes a
plain draft of the same slots and then sets its class (``flows.model._draft``; cheaper
than the generated ``__init__``); these tests hold them to what
``@dataclass(frozen=True, slots=True)`` would give: every field set, defaults, keyword
arguments, ``dataclasses.replace``, equality, frozenness, copying and pickling.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import pickle
from typing import Any

import orjson
import pytest

from flows.model import (
    CallsEvent,
    ClickEvent,
    DeadLetter,
    Envelope,
    LocationEvent,
    Profile,
    RawRecord,
    decode_record,
    new_profile,
    raw_record,
)

LOC = LocationEvent("13900000001", 1_795_000_000_000, None, "cell-7", "cinema", "cinema-3")
SAMPLES: list[Any] = [
    RawRecord("net.location/0", 5, b"{}", b"13900000001", "msgpack"),
    ClickEvent("13900000001", 1_795_000_000_000, "e-1", "H01-T01", "H01", "help", "pay",
               "bind", {"n": 1}),
    LOC,
    CallsEvent("13900000001", 1_795_000_000_000, None, 300, 4, 2, 1),
    Envelope(LOC, "net.location/0", 5, b"raw", False),
    new_profile("13900000001", frozenset({"care_link"}), frozenset(), "iPhone 15", "youth",
                {"genres": ("comedy",)}, False, {"cloud_drive": 1_795_000_000_000}),
]


@pytest.mark.parametrize("obj", SAMPLES, ids=lambda o: type(o).__name__)
def test_constructors_behave_like_generated_dataclasses(obj: Any) -> None:
    cls = type(obj)
    init = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    assert cls(**init) == obj  # keyword arguments, every init field
    assert cls(*init.values()) == obj  # positional, in field order
    assert dataclasses.replace(obj) == obj
    assert pickle.loads(pickle.dumps(obj)) == obj
    assert copy.copy(obj) == obj
    assert copy.deepcopy(obj) == obj
    assert type(copy.copy(obj)) is cls
    if not any(type(v) is dict for v in init.values()):  # a click's attrs is a dict
        assert hash(obj) == hash(cls(**init))
    first = dataclasses.fields(obj)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, first, None)
    for f in dataclasses.fields(obj):
        getattr(obj, f.name)  # every slot is set (an unset slot raises AttributeError)


def test_every_slot_of_the_model_is_written_by_its_builder() -> None:
    # A field added to a class but not to its builder would be an unset slot.
    for obj in SAMPLES:
        cls = type(obj)
        assert cls in (RawRecord, ClickEvent, LocationEvent, CallsEvent, Envelope, Profile)
        assert {f.name for f in dataclasses.fields(obj)} == set(cls.__slots__)
        for name in cls.__slots__:
            getattr(obj, name)


def test_the_hot_paths_build_the_frozen_classes() -> None:
    rec = raw_record("net.location/0", 5, b"{}", b"13900000001", "msgpack")
    assert type(rec) is RawRecord and rec == SAMPLES[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.pos = 6  # type: ignore[misc]
    docs = [
        {"type": "location", "customer_id": "13900000001", "ts": 1_795_000_000_000,
         "cell_id": "cell-7", "poi": "cinema", "poi_id": "cinema-3"},
        {"type": "calls", "customer_id": "13900000001", "ts": 1_795_000_000_000,
         "interval_s": 300, "calls_in": 4, "calls_out": 2, "missed": 1},
        {"type": "click", "customer_id": "13900000001", "ts": 1_795_000_000_000,
         "event_id": "e-1", "terminal_id": "H01-T01", "hall_id": "H01", "action": "help",
         "module": "pay", "step": "bind", "attrs": {"n": 1}},
    ]
    for doc, expected in zip(docs, [SAMPLES[2], SAMPLES[3], SAMPLES[1]], strict=True):
        env = _decoded(doc)
        assert type(env) is Envelope and type(env.event) is type(expected)
        assert env.event == expected and env.fresh is True
        with pytest.raises(dataclasses.FrozenInstanceError):
            env.event.ts = 0  # type: ignore[misc]


def test_a_built_profile_equals_the_generated_constructors() -> None:
    built = SAMPLES[-1]
    assert built == Profile("13900000001", frozenset({"care_link"}), frozenset(), "iPhone 15",
                            "youth", {"genres": ("comedy",)}, False,
                            {"cloud_drive": 1_795_000_000_000})
    assert new_profile("c", frozenset(), frozenset(), None, None, {}, False, {}) == Profile("c")


def test_defaults_and_type_tags() -> None:
    assert RawRecord("s", 1, b"x") == RawRecord("s", 1, b"x", None, "json")
    assert LocationEvent("c", 1, None, "cell", None).poi_id is None
    assert ClickEvent("c", 1, None, "t", "h", "session_start", None, None).attrs is None
    assert Envelope(LOC, "s", 1) == Envelope(LOC, "s", 1, b"", True)
    assert [LOC.type, SAMPLES[1].type, SAMPLES[3].type] == ["location", "click", "calls"]
    assert dataclasses.asdict(LOC)["type"] == "location"
    assert LOC != dataclasses.replace(LOC, cell_id="cell-8")


def _decoded(doc: dict[str, Any]) -> Envelope:
    env = decode_record(RawRecord("net.location/0", 9, orjson.dumps(doc),
                                  str(doc["customer_id"]).encode()))
    assert type(env) is Envelope, env
    return env


def test_key_is_the_event_id_or_a_hash_of_the_bytes() -> None:
    doc = {"type": "location", "customer_id": "13900000002", "ts": 1_795_000_000_000,
           "cell_id": "cell-1", "poi": "cinema"}
    with_id = _decoded({**doc, "event_id": "net-42"})
    assert with_id.key == "net-42"
    without = _decoded(doc)
    raw = orjson.dumps(doc)
    assert without.key == hashlib.blake2b(raw, digest_size=12).hexdigest()
    assert _decoded(doc).key == without.key  # the same message, the same key
    assert _decoded({**doc, "cell_id": "cell-2"}).key != without.key


def test_bad_record_still_dead_letters() -> None:
    out = decode_record(RawRecord("net.location/0", 1, b"{nope", b"1"))
    assert type(out) is DeadLetter and out.reason == "invalid_json"
