"""The profile hash codec: :class:`state.redis_store.ProfileDecoder` and its memo."""

from __future__ import annotations

import pytest

from flows.model import Profile
from state.redis_store import PROFILE_FIELDS, ProfileDecoder, encode_profile

T0 = 1_700_000_000_000

PROFILES = [
    Profile("C1"),
    Profile("C2", subscriptions=frozenset({"5G", "VOLTE"}), configured=frozenset({"5G"}),
            handset="Mate 60", segment="youth", prefs={"music": ("jazz", "rock")},
            opt_out=True, trials={"5G": T0}),
    Profile("C3", segment="family", prefs={"lang": ("zh",)}),
]


def values_of(p: Profile) -> list[bytes | None]:
    """What HMGET returns for the hash ``put_many`` writes (bytes, None for absent)."""
    fields = encode_profile(p)
    out: list[bytes | None] = []
    for f in PROFILE_FIELDS:
        v = fields.get(f)
        out.append(None if v is None else v if isinstance(v, bytes) else str(v).encode())
    return out


@pytest.fixture(params=[4096, 0], ids=["memo", "no-memo"])
def decoder(request: pytest.FixtureRequest) -> ProfileDecoder:
    return ProfileDecoder(request.param)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.customer_id)
def test_values_round_trip(decoder: ProfileDecoder, profile: Profile) -> None:
    assert decoder.decode(profile.customer_id, values_of(profile)) == profile
    # decoded str values (a client with decode_responses) read the same
    text = [None if v is None else v.decode() for v in values_of(profile)]
    assert decoder.decode(profile.customer_id, text) == profile


def test_no_field_is_the_empty_profile(decoder: ProfileDecoder) -> None:
    assert decoder.decode("C9", [None] * len(PROFILE_FIELDS)) == Profile("C9")
    assert decoder.decode_hash("C9", {}) == Profile("C9")


def test_the_hash_form_reads_the_known_fields_only(decoder: ProfileDecoder) -> None:
    raw = {b"segment": b"gold", b"crm_note": b"{not json", b"opt_out": b"true"}
    assert decoder.decode_hash("C1", raw) == Profile("C1", segment="gold", opt_out=True)


def test_customers_with_equal_values_share_no_mutable_part(decoder: ProfileDecoder) -> None:
    values = values_of(PROFILES[1])
    a = decoder.decode("A", values)
    b = decoder.decode("B", values)  # from the memo
    assert (a.customer_id, b.customer_id) == ("A", "B")
    assert a.prefs == b.prefs and a.prefs is not b.prefs
    assert a.trials is not b.trials
    a.prefs["music"] = ("pop",)  # a caller that mutates its own profile's dict...
    a.trials.clear()
    c = decoder.decode("C", values)
    assert c.prefs == {"music": ("jazz", "rock")}  # ...does not change the next one
    assert c.trials == {"5G": T0}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("subscriptions", b"not json", "JSON"),
        ("subscriptions", b'"5G"', "subscriptions"),
        ("prefs", b'{"lang": "en"}', "prefs.lang"),
        ("trials", b'{"5G": "yesterday"}', "trials"),
        ("trials", b'{"5G": true}', "trials"),
        ("opt_out", b"maybe", "opt_out"),
        ("configured", b"[1, 2]", "configured"),
        ("handset", b"\xff\xfe", "utf-8"),
    ],
)
def test_a_bad_value_raises_every_time(decoder: ProfileDecoder, field: str, value: bytes,
                                       message: str) -> None:
    values: list[bytes | None] = [None] * len(PROFILE_FIELDS)
    values[PROFILE_FIELDS.index(field)] = value
    for _ in range(2):  # a failure is not remembered as a good profile
        with pytest.raises(ValueError, match=message):
            decoder.decode("C1", values)


@pytest.mark.parametrize("cid", ["", "x" * 65])
def test_a_bad_customer_id_raises(decoder: ProfileDecoder, cid: str) -> None:
    with pytest.raises(ValueError, match="customer_id"):
        decoder.decode(cid, [None] * len(PROFILE_FIELDS))


def test_values_must_match_the_fields(decoder: ProfileDecoder) -> None:
    with pytest.raises(ValueError, match="profile fields"):
        decoder.decode("C1", [None, None])
