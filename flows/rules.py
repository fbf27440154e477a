"""Rules as data: the YAML format, its validation, and the compiled, frozen rule set.

A rules file names a version, the guards every push passes, and a list of rules. Each
rule has a trigger (one of the built-in kinds, with its thresholds as parameters), an
action (a push, an alert, or both), how often it may fire (``once_per``) and, optionally,
a condition (``when``: a CEL expression over ``event``, ``profile`` and ``context``,
checked and compiled once here, evaluated only when the trigger fires; see
:mod:`flows.cel`). Errors name the file, the rule and the field, e.g.::

    rules.yaml: rule 'cinema-pay': trigger.min_visits: Input should be a valid integer
    rules.yaml: rule 'jazz-youth': when: unknown field 'segmnt' of profile; ...
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from flows.cel import Condition, compile_condition
from flows.codec import EncodeError, json_dumps

__all__ = [
    "DEFAULT_RULES_RESOURCE",
    "AlertAction",
    "Campaign",
    "Guards",
    "PushAction",
    "Rule",
    "RuleSet",
    "RulesError",
    "doc_digest",
    "load_default_rules",
    "load_rules",
    "parse_duration_ms",
    "parse_rules",
]

DEFAULT_RULES_RESOURCE = "default_rules.yaml"
MAX_RULES_FILE_BYTES = 1_048_576
MAX_RULES = 500
# Limits on a rule's ``when`` (CEL) expression: characters, AST depth (``&&``/``||``
# chains count as balanced trees), AST nodes, and nested loop macros (all, exists,
# exists_one, map, filter: each level multiplies the work by a list's length).
MAX_WHEN_CHARS = 1000
MAX_WHEN_DEPTH = 32
MAX_WHEN_NODES = 200
MAX_WHEN_LOOPS = 2

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1000}
MAX_DURATION_MS = 3660 * 86_400_000  # ten years: longer is a typo, and would overflow state


class RulesError(ValueError):
    """A rules file that cannot be used; the message names file, rule and field."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def parse_duration_ms(value: Any) -> int:
    """``"90s"``, ``"60m"``, ``"24h"``, ``"7d"``, ``"250ms"`` or a number of seconds → ms."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '90s'")
    ms: int | None = None
    if isinstance(value, int | float):
        if math.isnan(value):
            raise ValueError("a duration must be a number, not NaN")
        if value < 0:
            raise ValueError("a duration must not be negative")
        ms = round(value * 1000) if value < 1e15 else MAX_DURATION_MS + 1
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            try:
                ms = round(float(m.group(1)) * _UNIT_MS[m.group(2)])
            except OverflowError:
                ms = MAX_DURATION_MS + 1
    if ms is not None:
        if ms > MAX_DURATION_MS:
            raise ValueError(f"a duration must be at most ten years: {value!r}")
        return ms
    raise ValueError(f"not a duration: {value!r} (use e.g. '90s', '60m', '24h', '7d')")


DurationMs = Annotated[int, BeforeValidator(parse_duration_ms)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]

_MODEL = ConfigDict(frozen=True, extra="forbid")


class LocationFrequency(BaseModel):
    """A location event at ``poi`` that makes at least ``min_visits`` visits in ``window``.

    Visits are runs of events at that place separated by at least ``visit_gap``.
    """

    model_config = _MODEL
    kind: Literal["location_frequency"]
    poi: Name
    min_visits: int = Field(2, ge=1, le=100)
    window: DurationMs = 7 * 86_400_000
    visit_gap: DurationMs = 3_600_000


class CallSpike(BaseModel):
    """A calls record at least ``min_total`` and ``factor`` times the recent mean."""

    model_config = _MODEL
    kind: Literal["call_spike"]
    min_total: int = Field(10, ge=0)
    factor: float = Field(3.0, gt=0)
    min_history: int = Field(3, ge=1, le=100)
    max_history: int = Field(12, ge=1, le=100)


class ModuleEnter(BaseModel):
    """``module_enter`` of ``module``, optionally only with a preference list ``pref``."""

    model_config = _MODEL
    kind: Literal["module_enter"]
    module: Name
    pref: Name | None = None


class SessionStartUnconfigured(BaseModel):
    """``session_start`` by a customer subscribed to one of ``services`` but not set up."""

    model_config = _MODEL
    kind: Literal["session_start_unconfigured"]
    services: list[Name] = Field(min_length=1)


class StepDwell(BaseModel):
    """A customer in one step for ``dwell`` without leaving it."""

    model_config = _MODEL
    kind: Literal["step_dwell"]
    dwell: DurationMs = 90_000


class StepFriction(BaseModel):
    """Many customers slow on one (module, step) over a trailing event-time window."""

    model_config = _MODEL
    kind: Literal["step_friction"]
    window: DurationMs = 3_600_000
    min_customers: int = Field(5, ge=1)
    mean_dwell: DurationMs = 100_000
    samples: int = Field(5, ge=0, le=50)
    modules: list[Name] = Field(default_factory=list, description="empty = every module")


TrialAction = Literal["session_start", "module_enter"]
_TRIAL_ACTIONS: tuple[TrialAction, ...] = ("session_start", "module_enter")


class TrialEnding(BaseModel):
    """A trial ending within ``within`` of one of ``actions`` (session_start, module_enter)."""

    model_config = _MODEL
    kind: Literal["trial_ending"]
    within: DurationMs = 48 * 3_600_000
    actions: list[TrialAction] = Field(
        default_factory=lambda: list(_TRIAL_ACTIONS), min_length=1
    )


EventType = Literal["click", "location", "calls"]


class AnyEvent(BaseModel):
    """Any event of ``type`` (optionally only click ``action``, ``module`` or one of
    ``modules``, ``step``, or a location at ``poi``): the generic trigger."""

    model_config = _MODEL
    kind: Literal["event"]
    type: EventType
    action: Name | None = None
    module: Name | None = None
    modules: list[Name] = Field(default_factory=list, max_length=100)
    step: Name | None = None
    poi: Name | None = None


Trigger = Annotated[
    AnyEvent
    | LocationFrequency
    | CallSpike
    | ModuleEnter
    | SessionStartUnconfigured
    | StepDwell
    | StepFriction
    | TrialEnding,
    Field(discriminator="kind"),
]

ONCE_SCOPES = ("session", "visit", "service", "session_service")
_ALLOWED_ONCE: dict[str, set[str]] = {
    "location_frequency": {"period"},
    "call_spike": {"period"},
    "module_enter": {"period", "session"},
    "session_start_unconfigured": {"session_service", "period"},
    "step_dwell": {"visit"},
    "step_friction": {"period"},
    "trial_ending": {"service", "period"},
    "event": {"period", "session"},
}


class PushModel(BaseModel):
    model_config = _MODEL
    kind: Name
    module: Name | None = None
    text: str | None = Field(None, max_length=500)


class AlertModel(BaseModel):
    model_config = _MODEL
    type: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[a-z0-9_.-]+$")]


_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _minute_of_day(v: str) -> int:
    m = _HHMM.match(v)
    if m is None:
        raise ValueError(f"not a time of day: {v!r} (use 'HH:MM', e.g. '22:00')")
    return int(m.group(1)) * 60 + int(m.group(2))


def _zone(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*", v):
        raise ValueError(f"not a time zone name: {v!r} (use e.g. 'Asia/Shanghai')")
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {v!r} (use e.g. 'Asia/Shanghai')") from None
    return v


def _instant_ms(v: Any) -> int:
    """An RFC 3339 timestamp with an offset (YAML may hand over a datetime) -> epoch ms."""
    if isinstance(v, datetime):
        dt = v
    elif isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"not an RFC 3339 timestamp: {v!r} "
                             "(use e.g. '2026-12-01T00:00:00+08:00')") from None
    else:
        raise ValueError("a timestamp must be a string like '2026-12-01T00:00:00+08:00'")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"timestamp {v!r} needs an offset (e.g. '+08:00' or 'Z')")
    return round(dt.astimezone(UTC).timestamp() * 1000)


class ScopeModel(BaseModel):
    model_config = _MODEL
    halls: list[Name] = Field(default_factory=list, max_length=1000)
    terminals: list[Name] = Field(default_factory=list, max_length=1000)
    segments: list[Name] = Field(default_factory=list, max_length=100)
    pois: list[Name] = Field(default_factory=list, max_length=100)


class QuietHoursModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    start: str = Field(alias="from")
    until: str
    timezone: str | None = Field(None, max_length=64)

    @field_validator("start", "until")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        _minute_of_day(v)
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        return None if v is None else _zone(v)


class QuotaModel(BaseModel):
    model_config = _MODEL
    max: int = Field(ge=0, le=1_000_000_000)
    per: Literal["campaign"] = "campaign"


class RuleModel(BaseModel):
    model_config = _MODEL
    id: Name
    version: int = Field(1, ge=1)
    enabled: bool = True
    trigger: Trigger
    push: PushModel | None = None
    alert: AlertModel | None = None
    once_per: str | None = None
    when: str | None = None
    description: str | None = Field(None, max_length=1000)
    campaign: Name | None = None
    valid_from: Annotated[int, BeforeValidator(_instant_ms)] | None = None
    valid_until: Annotated[int, BeforeValidator(_instant_ms)] | None = None
    scope: ScopeModel | None = None
    hours: list[str] | None = Field(None, min_length=1, max_length=24)
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] | None = Field(
        None, min_length=1, max_length=7)
    quiet_hours: QuietHoursModel | None = None
    quota: QuotaModel | None = None
    probability: float | None = Field(None, ge=0.0, le=1.0)
    control_group: float | None = Field(None, ge=0.0, lt=1.0)

    @field_validator("hours")
    @classmethod
    def _windows(cls, v: list[str] | None) -> list[str] | None:
        for w in v or ():
            a, sep, b = w.partition("-")
            if not sep:
                raise ValueError(f"not a time window: {w!r} (use 'HH:MM-HH:MM')")
            if _minute_of_day(a.strip()) == _minute_of_day(b.strip()):
                raise ValueError(f"empty time window: {w!r}")
        return v


class GuardsModel(BaseModel):
    model_config = _MODEL
    max_pushes_per_customer: int = Field(3, ge=0)
    cap_window: DurationMs = 86_400_000
    respect_opt_out: bool = True


class FileModel(BaseModel):
    model_config = _MODEL
    version: int = Field(ge=1)
    timezone: str = Field("UTC", max_length=64)
    guards: GuardsModel = Field(default_factory=lambda: GuardsModel.model_validate({}))
    rules: list[dict[str, Any]] = Field(max_length=MAX_RULES)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        return _zone(v)


@dataclass(frozen=True, slots=True)
class PushAction:
    """What a rule pushes: ``kind`` and (unless taken from the trigger) ``module``."""

    kind: str
    module: str | None
    text: str | None


@dataclass(frozen=True, slots=True)
class AlertAction:
    """What a rule alerts: a CloudEvents ``type``."""

    type: str


def _in_window(minute: int, start: int, end: int) -> bool:
    """``start`` inclusive, ``end`` exclusive; a window with ``start > end`` crosses
    midnight."""
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


@dataclass(frozen=True, slots=True)
class Campaign:
    """A rule's campaign guards and targeting (all optional; see the README, "Campaign
    guards and targeting").

    ``valid_from_ms`` is inclusive and ``valid_until_ms`` exclusive (event time);
    scopes are sets (empty = any); ``hours`` are ``(start, end)`` minutes of the day in
    ``timezone``, start inclusive, end exclusive, crossing midnight when start > end;
    ``days`` are ISO weekdays 1..7 (of the local date of the trigger); ``quiet`` is
    ``(start, end)`` minutes in ``quiet_timezone``; ``quota`` is the campaign-wide
    number of pushes (``campaign`` names it, by default the rule id); ``probability``
    the lottery's chance to win; ``control_group`` the share held out.
    """

    campaign: str
    valid_from_ms: int | None = None
    valid_until_ms: int | None = None
    halls: frozenset[str] = frozenset()
    terminals: frozenset[str] = frozenset()
    segments: frozenset[str] = frozenset()
    pois: frozenset[str] = frozenset()
    timezone: str = "UTC"
    hours: tuple[tuple[int, int], ...] = ()
    days: frozenset[int] = frozenset()
    quiet: tuple[int, int] | None = None
    quiet_timezone: str = "UTC"
    quota: int | None = None
    probability: float | None = None
    control_group: float | None = None

    @property
    def timed(self) -> bool:
        """Whether the local time of day or weekday matters."""
        return bool(self.hours or self.days or self.quiet is not None)

    def in_hours(self, ts_ms: int) -> bool:
        """Whether ``ts_ms`` is in one of the ``hours`` windows on one of the ``days``."""
        if not self.hours and not self.days:
            return True
        local = datetime.fromtimestamp(ts_ms / 1000, ZoneInfo(self.timezone))
        if self.days and local.isoweekday() not in self.days:
            return False
        minute = local.hour * 60 + local.minute
        return not self.hours or any(_in_window(minute, a, b) for a, b in self.hours)

    def in_quiet_hours(self, ts_ms: int) -> bool:
        """Whether ``ts_ms`` is within the quiet hours (``from`` inclusive, ``until``
        exclusive)."""
        if self.quiet is None:
            return False
        local = datetime.fromtimestamp(ts_ms / 1000, ZoneInfo(self.quiet_timezone))
        return _in_window(local.hour * 60 + local.minute, *self.quiet)


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule. ``once_scope`` is ``period`` (with ``once_ms``) or a scope name;
    ``when`` is its compiled condition, if it has one."""

    id: str
    version: int
    trigger: Any
    push: PushAction | None
    alert: AlertAction | None
    once_scope: str
    once_ms: int
    description: str | None = None
    when: Condition | None = None
    campaign: Campaign | None = None

    @property
    def kind(self) -> str:
        """The trigger kind."""
        return str(self.trigger.kind)


@dataclass(frozen=True, slots=True)
class Guards:
    """Guards for every push: opt-out and the per-customer cap."""

    max_pushes_per_customer: int = 3
    cap_window_ms: int = 86_400_000
    respect_opt_out: bool = True


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The active rules, indexed by trigger kind; ``timezone`` is where conditions read
    ``context.hour``, ``minute`` and ``weekday``; ``digest`` is the :func:`doc_digest`
    of the document it was compiled from (empty for a set built in code)."""

    version: int
    rules: tuple[Rule, ...]
    guards: Guards
    source: str = "<memory>"
    by_kind: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)
    timezone: str = "UTC"
    digest: str = ""

    @classmethod
    def of(
        cls,
        version: int,
        rules: tuple[Rule, ...],
        guards: Guards,
        source: str,
        timezone: str = "UTC",
        digest: str = "",
    ) -> RuleSet:
        """Build a rule set and its index by trigger kind."""
        idx: dict[str, list[Rule]] = {}
        for r in rules:
            idx.setdefault(r.kind, []).append(r)
        return cls(version, rules, guards, source, {k: tuple(v) for k, v in idx.items()},
                   timezone, digest)

    def of_kind(self, kind: str) -> tuple[Rule, ...]:
        """The rules with this trigger kind (empty tuple if none)."""
        return self.by_kind.get(kind, ())

    def places(self) -> frozenset[str]:
        """The place categories any location rule watches."""
        return frozenset(r.trigger.poi for r in self.of_kind("location_frequency"))


def _fmt_loc(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p in _TRIGGER_KINDS)]
    return ".".join(parts) if parts else "(rule)"


_TRIGGER_KINDS = {
    "location_frequency",
    "call_spike",
    "module_enter",
    "session_start_unconfigured",
    "step_dwell",
    "step_friction",
    "trial_ending",
    "event",
}


def _compile_rule(m: RuleModel, timezone: str = "UTC") -> Rule:
    kind = m.trigger.kind
    allowed = _ALLOWED_ONCE[kind]
    once = m.once_per
    if once is None:
        scope = sorted(allowed)[0] if "period" not in allowed else "period"
        if kind == "step_dwell":
            scope = "visit"
        once_ms = 86_400_000 if scope == "period" else 0
    elif once in ONCE_SCOPES:
        scope, once_ms = once, 0
    else:
        scope, once_ms = "period", parse_duration_ms(once)
    if scope not in allowed:
        raise ValueError(
            f"once_per: {once!r} does not fit trigger {kind} (allowed: "
            + ", ".join(sorted(a if a != "period" else "a duration" for a in allowed))
            + ")"
        )
    if m.push is None and m.alert is None:
        raise ValueError("a rule needs a push, an alert or both")
    if kind == "step_friction" and m.push is not None:
        raise ValueError("push: step_friction concerns many customers; it can only alert")
    if m.alert is not None and kind not in {"step_dwell", "step_friction"}:
        raise ValueError(f"alert: trigger {kind} can only push (alerts come from step_dwell "
                         "and step_friction)")
    needs_module = kind in {"location_frequency", "call_spike"} or (
        isinstance(m.trigger, AnyEvent) and m.trigger.module is None
        and not m.trigger.modules)
    if m.push is not None and needs_module and m.push.module is None:
        raise ValueError(f"push.module: required for trigger {kind}")
    if isinstance(m.trigger, CallSpike) and m.trigger.min_history > m.trigger.max_history:
        raise ValueError("trigger.min_history: must not exceed max_history")
    when = None
    if m.when is not None:
        when = compile_condition(m.when, kind, m.id, m.version, timezone, MAX_WHEN_CHARS,
                                 MAX_WHEN_DEPTH, MAX_WHEN_NODES, MAX_WHEN_LOOPS)
    if isinstance(m.trigger, AnyEvent):
        t = m.trigger
        if t.type != "click" and (t.action or t.module or t.modules or t.step):
            raise ValueError("trigger: action, module(s) and step are for click events")
        if t.module and t.modules:
            raise ValueError("trigger: give module or modules, not both")
        if t.type != "location" and t.poi:
            raise ValueError("trigger.poi: only for location events")
    return Rule(
        id=m.id,
        version=m.version,
        trigger=m.trigger,
        push=PushAction(m.push.kind, m.push.module, m.push.text) if m.push else None,
        alert=AlertAction(m.alert.type) if m.alert else None,
        once_scope=scope,
        once_ms=once_ms,
        description=m.description,
        when=when,
        campaign=_compile_campaign(m, timezone),
    )


def _compile_campaign(m: RuleModel, timezone: str) -> Campaign | None:
    fields = (m.campaign, m.valid_from, m.valid_until, m.scope, m.hours, m.days,
              m.quiet_hours, m.quota, m.probability, m.control_group)
    if all(f is None for f in fields):
        return None
    if m.trigger.kind == "step_friction":
        raise ValueError("step_friction concerns many customers: campaign guards and "
                         "targeting apply to rules about one customer")
    if (m.valid_from is not None and m.valid_until is not None
            and m.valid_until <= m.valid_from):
        raise ValueError("valid_until: must be after valid_from")
    if m.alert is not None and (m.quota is not None or m.probability is not None
                                or m.control_group is not None):
        raise ValueError("quota, probability and control_group apply to pushes; "
                         "a rule with an alert cannot have them")
    hours: list[tuple[int, int]] = []
    for w in m.hours or ():
        a, _, b = w.partition("-")
        hours.append((_minute_of_day(a.strip()), _minute_of_day(b.strip())))
    q = m.quiet_hours
    quiet = None
    if q is not None:
        quiet = (_minute_of_day(q.start), _minute_of_day(q.until))
        if quiet[0] == quiet[1]:
            raise ValueError("quiet_hours: 'from' and 'until' must differ")
    sc = m.scope
    return Campaign(
        campaign=m.campaign or m.id,
        valid_from_ms=m.valid_from,
        valid_until_ms=m.valid_until,
        halls=frozenset(sc.halls) if sc else frozenset(),
        terminals=frozenset(sc.terminals) if sc else frozenset(),
        segments=frozenset(sc.segments) if sc else frozenset(),
        pois=frozenset(sc.pois) if sc else frozenset(),
        timezone=timezone,
        hours=tuple(hours),
        days=frozenset(_DAYS.index(d) + 1 for d in m.days or ()),
        quiet=quiet,
        quiet_timezone=(q.timezone or timezone) if q is not None else timezone,
        quota=m.quota.max if m.quota is not None else None,
        probability=m.probability,
        control_group=m.control_group,
    )


def doc_digest(doc: dict[str, Any]) -> str:
    """A short, stable digest of a rule set document (sorted-key JSON, SHA-256): the same
    document gives the same digest in every process (no hash seed in it)."""
    return hashlib.sha256(json_dumps(doc)).hexdigest()[:16]


def parse_rules(doc: Any, source: str = "<memory>") -> RuleSet:
    """Validate a parsed rules document; raise :class:`RulesError` with every problem."""
    errors: list[str] = []
    try:
        fm = FileModel.model_validate(doc)
    except ValidationError as exc:
        for e in exc.errors():
            errors.append(f"{source}: {_fmt_loc(tuple(e['loc']))}: {e['msg']}")
        raise RulesError(errors) from exc
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, raw in enumerate(fm.rules):
        rid = raw.get("id") if isinstance(raw, dict) else None
        label = f"rule {rid!r}" if isinstance(rid, str) else f"rule #{i + 1}"
        try:
            m = RuleModel.model_validate(raw)
            rule = _compile_rule(m, fm.timezone)
        except ValidationError as exc:
            for e in exc.errors():
                errors.append(f"{source}: {label}: {_fmt_loc(tuple(e['loc']))}: {e['msg']}")
            continue
        except ValueError as exc:
            errors.append(f"{source}: {label}: {exc}")
            continue
        if rule.id in seen:
            errors.append(f"{source}: {label}: id: duplicate rule id")
            continue
        seen.add(rule.id)
        if m.enabled:
            rules.append(rule)
    if errors:
        raise RulesError(errors)
    g = fm.guards
    guards = Guards(g.max_pushes_per_customer, g.cap_window, g.respect_opt_out)
    try:
        digest = doc_digest(doc)
    except EncodeError:  # YAML types JSON has not (sets): rule changes refuse such a file
        digest = ""
    return RuleSet.of(fm.version, tuple(rules), guards, source, fm.timezone, digest)


def load_rules(path: str | Path) -> RuleSet:
    """Read and validate a YAML rules file (safe loader only; nothing in it runs)."""
    p = Path(path)
    try:
        # Read at most one byte past the limit: a FIFO or a device reports size 0.
        with p.open("rb") as fh:
            data = fh.read(MAX_RULES_FILE_BYTES + 1)
        if len(data) > MAX_RULES_FILE_BYTES:
            raise RulesError([f"{p}: file is larger than {MAX_RULES_FILE_BYTES} bytes"])
        text = data.decode("utf-8")
    except OSError as exc:
        raise RulesError([f"{p}: cannot read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise RulesError([f"{p}: not UTF-8 text"]) from exc
    return _parse_text(text, str(p))


def _parse_text(text: str, source: str) -> RuleSet:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise RulesError([f"{source}: {where}not valid YAML: {exc}"]) from exc
    except RecursionError:
        raise RulesError([f"{source}: nested too deeply"]) from None
    if not isinstance(doc, dict):
        raise RulesError([f"{source}: the file must be a mapping with 'version' and 'rules'"])
    return parse_rules(doc, source)


def load_default_rules() -> RuleSet:
    """The shipped default rules (``flows/default_rules.yaml``)."""
    text = resources.files("flows").joinpath(DEFAULT_RULES_RESOURCE).read_text("utf-8")
    return _parse_text(text, f"flows/{DEFAULT_RULES_RESOURCE}")
