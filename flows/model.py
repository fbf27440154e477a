"""The data model: input events, profiles and the three outputs, as frozen dataclasses.

Times are integer epoch milliseconds (UTC) everywhere inside the engine; they become
UTC-aware :class:`datetime` objects or RFC 3339 strings only at the edges.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias

from flows.codec import DecodeError, EncodeError, json_dumps, json_loads, unpack

__all__ = [
    "CLICK_ACTIONS",
    "Alert",
    "CallsEvent",
    "ClickEvent",
    "DeadLetter",
    "Envelope",
    "Event",
    "Limits",
    "LocationEvent",
    "Profile",
    "Push",
    "RawRecord",
    "check_profile_customer_id",
    "decode_record",
    "ms_to_datetime",
    "ms_to_rfc3339",
    "new_profile",
    "profile_from_dict",
    "raw_record",
    "stable_id",
]

CLICK_ACTIONS: Final = frozenset(
    {
        "session_start",
        "module_enter",
        "step_enter",
        "step_exit",
        "help",
        "demo_play",
        "order",
        "rate",
        "session_end",
    }
)
STEP_ACTIONS: Final = frozenset({"step_enter", "step_exit"})

# 2000-01-01T00:00:00Z .. 2100-01-01T00:00:00Z: anything outside is not a real event time.
MIN_TS_MS: Final = 946_684_800_000
MAX_TS_MS: Final = 4_102_444_800_000

Format: TypeAlias = Literal["json", "msgpack"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Input limits; a message beyond any of them is a dead letter, never a crash.

    ``max_message_bytes`` bounds the raw message; ``max_customer_id_len`` and
    ``max_field_len`` bound string fields in characters; ``attrs`` (a click's free-form
    object) may have at most ``max_attrs_keys`` top-level keys, be nested at most
    ``max_attrs_depth`` objects or arrays deep (``attrs`` itself is level 1) and take
    at most ``max_attrs_bytes`` as compact JSON.
    """

    max_message_bytes: int = 65_536
    max_customer_id_len: int = 64
    max_field_len: int = 128
    max_attrs_bytes: int = 4_096
    max_attrs_keys: int = 32
    max_attrs_depth: int = 8


DEFAULT_LIMITS: Final = Limits()

def _draft(cls: type) -> type:
    """A plain class with the same slots as the frozen slotted dataclass ``cls``.

    The classes made for every input record (:class:`RawRecord`, the three events,
    :class:`Envelope`) and every profile read (:class:`Profile`) stay frozen
    dataclasses (equality, repr, no assignment after construction), but each is built
    by one function that makes an instance of its draft, writes the fields with plain
    attribute stores (the draft has no frozen ``__setattr__``) and then sets the
    instance's ``__class__`` to the frozen class. Python allows that because both
    classes have the same slots on the same base, so their layouts are equal;
    ``tests/flows/test_model.py`` checks every field is written. A location event so
    built costs about a quarter of the generated ``__init__`` (which writes each field
    through ``object.__setattr__``) and half of writing each through its slot's
    ``__set__`` (``python -m bench decode``, "event init"). Python raises the audit
    event ``object.__setattr__`` for each ``__class__`` assignment.

    A call of one of these classes goes through its builder too (its ``__new__``), so
    they are not for subclassing (a subclass's call would build the base class), and
    each pickles as a call of its builder with its fields (``__reduce__``: ``__new__``
    needs them, and records, envelopes and profiles cross processes).
    :class:`Profile` keeps its generated ``__init__``; only the profile stores use its
    builder, :func:`new_profile`.
    """
    slots = cls.__dict__["__slots__"]
    return type(f"_{cls.__name__}Draft", (), {"__slots__": slots, "__module__": __name__})


@dataclass(frozen=True, slots=True, init=False)
class RawRecord:
    """One undecoded message as a source read it.

    ``pos`` orders records of one source (line number, or a Kafka offset); ``key`` is
    the message key where the transport has one.
    """

    source: str
    pos: int
    value: bytes
    key: bytes | None = None
    fmt: Format = "json"

    def __new__(cls, source: str, pos: int, value: bytes, key: bytes | None = None,
                fmt: Format = "json") -> RawRecord:
        return raw_record(source, pos, value, key, fmt)

    def __reduce__(self) -> tuple[Callable[..., RawRecord],
                                  tuple[str, int, bytes, bytes | None, Format]]:
        # Records cross processes (Bytewax pickles what goes to another process's
        # shard): a plain builder call pickles 5x faster than the slotted dataclass's
        # default state protocol, and the builder skips the class call on unpickling.
        return (raw_record, (self.source, self.pos, self.value, self.key, self.fmt))


_RawDraft: Final = _draft(RawRecord)


def raw_record(source: str, pos: int, value: bytes, key: bytes | None = None,
               fmt: Format = "json") -> RawRecord:
    """``RawRecord(source, pos, value, key, fmt)`` without the class call (sources' hot path)."""
    d = _RawDraft()
    d.source = source
    d.pos = pos
    d.value = value
    d.key = key
    d.fmt = fmt
    d.__class__ = RawRecord
    return d  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True, init=False)
class ClickEvent:
    """A terminal click: session, module, step, help, demo, order, rating."""

    customer_id: str
    ts: int
    event_id: str | None
    terminal_id: str
    hall_id: str
    action: str
    module: str | None
    step: str | None
    attrs: dict[str, Any] | None = None

    type: Final[str] = field(default="click", init=False, repr=False)

    def __new__(cls, customer_id: str, ts: int, event_id: str | None, terminal_id: str,
                hall_id: str, action: str, module: str | None, step: str | None,
                attrs: dict[str, Any] | None = None) -> ClickEvent:
        return _click(customer_id, ts, event_id, terminal_id, hall_id, action, module, step,
                      attrs)

    def __reduce__(self) -> tuple[Callable[..., ClickEvent], tuple[Any, ...]]:
        return (_click, (self.customer_id, self.ts, self.event_id, self.terminal_id,
                         self.hall_id, self.action, self.module, self.step, self.attrs))


_ClickDraft: Final = _draft(ClickEvent)


def _click(customer_id: str, ts: int, event_id: str | None, terminal_id: str, hall_id: str,
           action: str, module: str | None, step: str | None,
           attrs: dict[str, Any] | None) -> ClickEvent:
    d = _ClickDraft()
    d.customer_id = customer_id
    d.ts = ts
    d.event_id = event_id
    d.terminal_id = terminal_id
    d.hall_id = hall_id
    d.action = action
    d.module = module
    d.step = step
    d.attrs = attrs
    d.type = "click"
    d.__class__ = ClickEvent
    return d  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True, init=False)
class LocationEvent:
    """A network location signal: the phone seen in a cell that maps to a place."""

    customer_id: str
    ts: int
    event_id: str | None
    cell_id: str
    poi: str | None
    poi_id: str | None = None

    type: Final[str] = field(default="location", init=False, repr=False)

    def __new__(cls, customer_id: str, ts: int, event_id: str | None, cell_id: str,
                poi: str | None, poi_id: str | None = None) -> LocationEvent:
        return _location(customer_id, ts, event_id, cell_id, poi, poi_id)

    def __reduce__(self) -> tuple[Callable[..., LocationEvent], tuple[Any, ...]]:
        return (_location, (self.customer_id, self.ts, self.event_id, self.cell_id,
                            self.poi, self.poi_id))


_LocationDraft: Final = _draft(LocationEvent)


def _location(customer_id: str, ts: int, event_id: str | None, cell_id: str,
              poi: str | None, poi_id: str | None) -> LocationEvent:
    d = _LocationDraft()
    d.customer_id = customer_id
    d.ts = ts
    d.event_id = event_id
    d.cell_id = cell_id
    d.poi = poi
    d.poi_id = poi_id
    d.type = "location"
    d.__class__ = LocationEvent
    return d  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True, init=False)
class CallsEvent:
    """A network call-volume record for one interval."""

    customer_id: str
    ts: int
    event_id: str | None
    interval_s: int
    calls_in: int
    calls_out: int
    missed: int

    type: Final[str] = field(default="calls", init=False, repr=False)

    def __new__(cls, customer_id: str, ts: int, event_id: str | None, interval_s: int,
                calls_in: int, calls_out: int, missed: int) -> CallsEvent:
        return _calls(customer_id, ts, event_id, interval_s, calls_in, calls_out, missed)

    def __reduce__(self) -> tuple[Callable[..., CallsEvent], tuple[Any, ...]]:
        return (_calls, (self.customer_id, self.ts, self.event_id, self.interval_s,
                         self.calls_in, self.calls_out, self.missed))


_CallsDraft: Final = _draft(CallsEvent)


def _calls(customer_id: str, ts: int, event_id: str | None, interval_s: int, calls_in: int,
           calls_out: int, missed: int) -> CallsEvent:
    d = _CallsDraft()
    d.customer_id = customer_id
    d.ts = ts
    d.event_id = event_id
    d.interval_s = interval_s
    d.calls_in = calls_in
    d.calls_out = calls_out
    d.missed = missed
    d.type = "calls"
    d.__class__ = CallsEvent
    return d  # type: ignore[no-any-return]


Event: TypeAlias = ClickEvent | LocationEvent | CallsEvent


@dataclass(frozen=True, slots=True, init=False)
class Envelope:
    """A decoded event with where it came from and its idempotency key.

    :attr:`key` is the event's ``event_id`` when it has one, else a hash of its bytes,
    so the same message always yields the same push and alert ids. ``raw`` keeps the
    original bytes (a late event is a dead letter with them, and they are what a key
    without an ``event_id`` is hashed from); ``fresh`` is False for a live event too old
    to trigger anything, which still updates history (a late network record of a past
    cinema visit, say).
    """

    event: Event
    source: str
    pos: int
    raw: bytes = b""
    fresh: bool = True

    def __new__(cls, event: Event, source: str, pos: int, raw: bytes = b"",
                fresh: bool = True) -> Envelope:
        return _envelope(event, source, pos, raw, fresh)

    def __reduce__(self) -> tuple[Callable[..., Envelope], tuple[Any, ...]]:
        return (_envelope, (self.event, self.source, self.pos, self.raw, self.fresh))

    @property
    def key(self) -> str:
        """``event_id``, else a 24-hex-digit hash of the raw bytes.

        Computed when asked (a push, an alert, a session or step that needs it), not at
        decoding: most network records trigger nothing, and hashing each cost about
        470 ns, a sixth of decoding it (``python -m bench decode``).
        """
        eid = self.event.event_id
        if eid is not None:
            return eid
        return hashlib.blake2b(self.raw, digest_size=12).hexdigest()


_EnvelopeDraft: Final = _draft(Envelope)


def _envelope(event: Event, source: str, pos: int, raw: bytes, fresh: bool) -> Envelope:
    d = _EnvelopeDraft()
    d.event = event
    d.source = source
    d.pos = pos
    d.raw = raw
    d.fresh = fresh
    d.__class__ = Envelope
    return d  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be used, with the reason and its original bytes."""

    reason: str
    detail: str
    raw: bytes
    source: str
    pos: int

    def to_dict(self) -> dict[str, Any]:
        """The dead letter as written to the dead-letter output."""
        try:
            text: str = self.raw.decode("utf-8")
            encoding = "utf-8"
        except UnicodeDecodeError:
            text = base64.b64encode(self.raw).decode("ascii")
            encoding = "base64"
        return {
            "reason": self.reason,
            "detail": self.detail,
            "raw": text,
            "raw_encoding": encoding,
            "source": self.source,
            "pos": self.pos,
        }


@dataclass(frozen=True, slots=True)
class Profile:
    """The VGOP side of a customer. A missing profile is the empty profile."""

    customer_id: str
    subscriptions: frozenset[str] = frozenset()
    configured: frozenset[str] = frozenset()
    handset: str | None = None
    segment: str | None = None
    prefs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    opt_out: bool = False
    trials: dict[str, int] = field(default_factory=dict)

    def __reduce__(self) -> tuple[Callable[..., Profile], tuple[Any, ...]]:
        # A live router hands the profiles it read to shards on other processes
        # (pickled by Bytewax): a plain builder call, not the slotted dataclass's
        # default state protocol, which costs more both ways.
        return (new_profile, (self.customer_id, self.subscriptions, self.configured,
                              self.handset, self.segment, self.prefs, self.opt_out,
                              self.trials))

    def to_dict(self) -> dict[str, Any]:
        """The profile as JSON-ready data (the JSONL and Redis layout)."""
        return {
            "customer_id": self.customer_id,
            "subscriptions": sorted(self.subscriptions),
            "configured": sorted(self.configured),
            "handset": self.handset,
            "segment": self.segment,
            "prefs": {k: list(v) for k, v in sorted(self.prefs.items())},
            "opt_out": self.opt_out,
            "trials": dict(sorted(self.trials.items())),
        }


_ProfileDraft: Final = _draft(Profile)


def new_profile(customer_id: str, subscriptions: frozenset[str], configured: frozenset[str],
                handset: str | None, segment: str | None, prefs: dict[str, tuple[str, ...]],
                opt_out: bool, trials: dict[str, int]) -> Profile:
    """``Profile(...)`` with every field given, without the generated ``__init__``.

    What the profile stores build for every profile they read (see :func:`_draft`);
    nothing is checked here, as ``Profile(...)`` checks nothing either.
    """
    d = _ProfileDraft()
    d.customer_id = customer_id
    d.subscriptions = subscriptions
    d.configured = configured
    d.handset = handset
    d.segment = segment
    d.prefs = prefs
    d.opt_out = opt_out
    d.trials = trials
    d.__class__ = Profile
    return d  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class PushGuard:
    """What the delivery guard (``state.guards.GuardStore``) enforces for one push.

    The flow applies the same guards in its own state; this travels with the push so
    that the guard at delivery can hold them across workers, processes and restarts.
    ``once_key`` (rule id, or ``<rule id>:<module>``) is scoped to the push's customer
    and blocks for ``once_ttl_ms`` of event time (None = for good); ``cap`` pushes per
    customer per ``cap_window_ms`` (0 = no cap). Not part of :meth:`Push.to_dict`.
    """

    once_key: str | None = None
    once_ttl_ms: int | None = None
    cap: int = 0
    cap_window_ms: int = 86_400_000


@dataclass(frozen=True, slots=True)
class Push:
    """Content for one terminal or customer channel, with its idempotency key.

    ``guard`` is an internal delivery instruction, never on the wire: :meth:`to_dict`
    (what outside clients read) leaves it out.
    """

    push_id: str
    customer_id: str
    channel: str
    rule_id: str
    rule_version: int
    content: dict[str, Any]
    event_ts: int
    reason: dict[str, Any]
    guard: PushGuard | None = None

    def to_dict(self) -> dict[str, Any]:
        """The push as delivered (JSON-ready; without ``guard``)."""
        return {
            "push_id": self.push_id,
            "customer_id": self.customer_id,
            "channel": self.channel,
            "rule_id": self.rule_id,
            "rule_version": self.rule_version,
            "content": self.content,
            "event_ts": self.event_ts,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Alert:
    """An alert for operations; serialised as a CloudEvents 1.0 structured event."""

    id: str
    type: str
    source: str
    time_ms: int
    subject: str
    data: dict[str, Any]

    def to_cloudevent(self) -> dict[str, Any]:
        """The CloudEvents 1.0 structured JSON object."""
        return {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": ms_to_rfc3339(self.time_ms),
            "subject": self.subject,
            "datacontenttype": "application/json",
            "data": self.data,
        }


def stable_id(*parts: object) -> str:
    """A deterministic 32-hex-digit id from its parts (the idempotency keys)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(str(p).encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()


def ms_to_datetime(ms: int) -> datetime:
    """Epoch milliseconds to a UTC-aware datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def ms_to_rfc3339(ms: int) -> str:
    """Epoch milliseconds to RFC 3339 with millisecond precision and a ``Z``."""
    return ms_to_datetime(ms).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# --- decoding -------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _str(doc: dict[str, Any], name: str, limit: int, required: bool = True) -> str | None:
    v = doc.get(name)
    if type(v) is str and 0 < len(v) <= limit:
        return v  # the common case, checked first
    if v is None:
        if required:
            raise _Bad("missing_field", f"{name} is required")
        return None
    if type(v) is not str:
        raise _Bad("wrong_type", f"{name} must be a string")
    if not v:
        raise _Bad("invalid_value", f"{name} must not be empty")
    if len(v) > limit:
        raise _Bad("too_large", f"{name} is longer than {limit} characters")
    return v


def _int(doc: dict[str, Any], name: str) -> int:
    v = doc.get(name)
    if v is None:
        raise _Bad("missing_field", f"{name} is required")
    if type(v) is not int:
        raise _Bad("wrong_type", f"{name} must be an integer")
    if v < 0 or v > 1_000_000_000:
        raise _Bad("invalid_value", f"{name} is out of range")
    return v


def _check_attrs(attrs: dict[Any, Any], limits: Limits) -> None:
    """Raise :class:`_Bad` unless ``attrs`` is plain JSON data within the limits.

    JSON input is JSON data by construction, but MessagePack can carry what JSON
    cannot (NaN and infinities, bytes, extension types and timestamps, bytes keys);
    and nesting is bounded so that no later step (a snapshot, say)
    can hit a recursion limit. The walk is iterative and the message size bounds it.
    """
    max_depth = limits.max_attrs_depth
    stack: list[tuple[Any, int]] = [(attrs, 1)]
    while stack:
        v, depth = stack.pop()
        t = type(v)
        if t is str or t is int or t is bool or v is None:
            continue  # neither decoder makes an integer beyond 64 bits
        if t is dict or t is list:
            if depth > max_depth:
                raise _Bad("too_large", f"attrs is nested more than {max_depth} levels deep")
            if t is dict:
                for k, x in v.items():
                    if type(k) is not str:
                        raise _Bad("wrong_type", "attrs keys must be strings")
                    stack.append((x, depth + 1))
            else:
                stack.extend((x, depth + 1) for x in v)
        elif t is float:
            if not math.isfinite(v):
                raise _Bad("invalid_value", "attrs holds NaN or an infinite number")
        else:
            raise _Bad("wrong_type", f"attrs holds a value of type {t.__name__}, not JSON")
    try:
        size = len(json_dumps(attrs))
    except EncodeError as exc:
        raise _Bad("wrong_type", f"attrs cannot be encoded: {exc}") from exc
    if size > limits.max_attrs_bytes:
        raise _Bad("too_large", f"attrs is larger than {limits.max_attrs_bytes} bytes")


def _decode_doc(doc: Any, limits: Limits) -> Event:
    if type(doc) is not dict:
        raise _Bad("not_an_object", "the message is not a JSON object")
    typ = doc.get("type")
    customer_id = _str(doc, "customer_id", limits.max_customer_id_len)
    assert customer_id is not None
    if not customer_id.isprintable():
        # Control, format and line-separator characters have no place in an id (they
        # would forge log lines or hide in a display); ASCII space is allowed.
        raise _Bad("invalid_value", "customer_id has non-printable characters")
    ts = doc.get("ts")
    if ts is None:
        raise _Bad("missing_field", "ts is required")
    if type(ts) is not int:
        raise _Bad("wrong_type", "ts must be integer epoch milliseconds")
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        raise _Bad("ts_out_of_range", "ts is not between 2000 and 2100")
    event_id = _str(doc, "event_id", limits.max_field_len, False)
    if typ == "click":
        action = _str(doc, "action", limits.max_field_len)
        if action not in CLICK_ACTIONS:
            raise _Bad("invalid_value", "action is not a known click action")
        module = _str(doc, "module", limits.max_field_len,
                      required=action not in {"session_start", "session_end"})
        step = _str(doc, "step", limits.max_field_len, required=action in STEP_ACTIONS)
        attrs = doc.get("attrs")
        if attrs is not None:
            if type(attrs) is not dict:
                raise _Bad("wrong_type", "attrs must be an object")
            if len(attrs) > limits.max_attrs_keys:
                raise _Bad("too_large", f"attrs has more than {limits.max_attrs_keys} keys")
            if attrs:
                _check_attrs(attrs, limits)
        return _click(
            customer_id,
            ts,
            event_id,
            _str(doc, "terminal_id", limits.max_field_len),  # type: ignore[arg-type]
            _str(doc, "hall_id", limits.max_field_len),  # type: ignore[arg-type]
            action,
            module,
            step,
            attrs,
        )
    if typ == "location":
        return _location(
            customer_id,
            ts,
            event_id,
            _str(doc, "cell_id", limits.max_field_len),  # type: ignore[arg-type]
            _str(doc, "poi", limits.max_field_len, False),
            _str(doc, "poi_id", limits.max_field_len, False),
        )
    if typ == "calls":
        interval_s = _int(doc, "interval_s")
        if interval_s == 0:
            raise _Bad("invalid_value", "interval_s must be positive")
        return _calls(
            customer_id,
            ts,
            event_id,
            interval_s,
            _int(doc, "calls_in"),
            _int(doc, "calls_out"),
            _int(doc, "missed"),
        )
    if typ is None:
        raise _Bad("missing_field", "type is required")
    raise _Bad("unknown_type", "type must be click, location or calls")


def decode_record(rec: RawRecord, limits: Limits = DEFAULT_LIMITS) -> Envelope | DeadLetter:
    """Decode one raw record into an :class:`Envelope`, or say why it is a dead letter."""
    value = rec.value
    if len(value) > limits.max_message_bytes:
        return DeadLetter("too_large", f"message is larger than {limits.max_message_bytes} bytes",
                          value, rec.source, rec.pos)
    try:
        doc = json_loads(value) if rec.fmt == "json" else unpack(value)
    except DecodeError as exc:
        reason = "invalid_json" if rec.fmt == "json" else "invalid_msgpack"
        return DeadLetter(reason, str(exc), value, rec.source, rec.pos)
    except RecursionError:
        return DeadLetter("too_large", "message is nested too deeply", value, rec.source, rec.pos)
    try:
        event = _decode_doc(doc, limits)
    except _Bad as bad:
        return DeadLetter(bad.reason, bad.detail, value, rec.source, rec.pos)
    if rec.key is not None and rec.key != event.customer_id.encode("utf-8"):
        return DeadLetter("key_mismatch", "message key differs from customer_id", value,
                          rec.source, rec.pos)
    return _envelope(event, rec.source, rec.pos, value, True)


# --- profiles ---------------------------------------------------------------------


def _str_list(v: Any, name: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{name} must be a list of strings")
    return tuple(v)


def check_profile_customer_id(cid: Any) -> str:
    """``cid`` if it can be a profile's customer id; else raise ValueError saying why."""
    limit = DEFAULT_LIMITS.max_customer_id_len
    if not isinstance(cid, str) or not cid or len(cid) > limit:
        raise ValueError(f"customer_id must be a non-empty string of at most {limit} "
                         "characters")
    return cid


def profile_from_dict(doc: Any) -> Profile:
    """Validate one profile document; raise ValueError naming the bad field."""
    if not isinstance(doc, dict):
        raise ValueError("a profile must be a JSON object")
    cid = check_profile_customer_id(doc.get("customer_id"))
    prefs_raw = doc.get("prefs") or {}
    if not isinstance(prefs_raw, dict):
        raise ValueError("prefs must be an object")
    prefs = {str(k): _str_list(v, f"prefs.{k}") for k, v in prefs_raw.items()}
    trials_raw = doc.get("trials") or {}
    if not isinstance(trials_raw, dict) or not all(
        type(v) is int for v in trials_raw.values()
    ):
        raise ValueError("trials must map service codes to epoch milliseconds")
    handset = doc.get("handset")
    segment = doc.get("segment")
    if handset is not None and not isinstance(handset, str):
        raise ValueError("handset must be a string")
    if segment is not None and not isinstance(segment, str):
        raise ValueError("segment must be a string")
    opt_out = doc.get("opt_out", False)
    if not isinstance(opt_out, bool):
        raise ValueError("opt_out must be a boolean")
    return Profile(
        customer_id=cid,
        subscriptions=frozenset(_str_list(doc.get("subscriptions"), "subscriptions")),
        configured=frozenset(_str_list(doc.get("configured"), "configured")),
        handset=handset,
        segment=segment,
        prefs=prefs,
        opt_out=opt_out,
        trials=dict(trials_raw),
    )
