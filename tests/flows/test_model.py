"""The input model's hand-written constructors and the envelope's idempotency key.

RawRecord, the three events and Envelope write their fields through slot setters in
their own ``__init__`` (cheaper than the generated one); these tests hold them to what
``@dataclass(frozen=True, slots=True)`` would give: every field set, defaults, keyword
arguments, ``dataclasses.replace``, equality, frozenness and pickling.
"""

from __future__ import annotations

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
    RawRecord,
    decode_record,
)

LOC = LocationEvent("13900000001", 1_795_000_000_000, None, "cell-7", "cinema", "cinema-3")
SAMPLES: list[Any] = [
    RawRecord("net.location/0", 5, b"{}", b"13900000001", "msgpack"),
    ClickEvent("13900000001", 1_795_000_000_000, "e-1", "H01-T01", "H01", "help", "pay",
               "bind", {"n": 1}),
    LOC,
    CallsEvent("13900000001", 1_795_000_000_000, None, 300, 4, 2, 1),
    Envelope(LOC, "net.location/0", 5, b"raw", False),
]


@pytest.mark.parametrize("obj", SAMPLES, ids=lambda o: type(o).__name__)
def test_constructors_behave_like_generated_dataclasses(obj: Any) -> None:
    cls = type(obj)
    init = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    assert cls(**init) == obj  # keyword arguments, every init field
    assert cls(*init.values()) == obj  # positional, in field order
    assert dataclasses.replace(obj) == obj
    assert pickle.loads(pickle.dumps(obj)) == obj
    if not any(type(v) is dict for v in init.values()):  # a click's attrs is a dict
        assert hash(obj) == hash(cls(**init))
    first = dataclasses.fields(obj)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, first, None)
    for f in dataclasses.fields(obj):
        getattr(obj, f.name)  # every slot is set (an unset slot raises AttributeError)


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
