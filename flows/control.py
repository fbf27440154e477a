"""Changing the rules while the engine runs: change messages, validation, versions.

A *change* comes from one of the rule sources (the rules file, a Redis key, the Kafka
control topic ``ops.rules``; see :mod:`connectors.rules_sources`) and is one of:

* ``replace``: a whole rule set (the rules file format, as a mapping);
* ``upsert``: one rule, added or replacing the rule with the same id;
* ``delete``: one rule id, removed.

Every change carries the rule set ``version`` it makes (``replace`` takes it from the
set itself). :func:`decide` checks a change against the active set once, before it is
broadcast to the shards: the candidate set must pass the full rules validation
(:func:`flows.rules.parse_rules`), its version must be higher than the active one, and
a rule whose content changed must carry a higher rule ``version`` than before (pushes
and alerts name the rule id and version that made them, so one version names one
content). An optional ``base_version`` must equal the active version (a compare-and-set
for concurrent editors). A rejected change leaves the active set as it is; either way
the decision comes with a :class:`RulesStatus` to report.

The accepted set travels as a :class:`RulesUpdate` (plain data: the validated document,
its version and digest), which every shard compiles with :func:`compile_update` (cached
per process by digest) and applies once.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from flows.codec import DecodeError, EncodeError, json_dumps, json_loads
from flows.rules import MAX_RULES_FILE_BYTES, RulesError, RuleSet, doc_digest, parse_rules

__all__ = [
    "ActiveRules",
    "Decision",
    "RulesChange",
    "RulesStatus",
    "RulesUpdate",
    "change_message",
    "compile_update",
    "decide",
    "doc_digest",
    "normalise_doc",
    "parse_change",
    "parse_rules_text",
    "rejected",
    "ruleset_doc",
]

ChangeOp = Literal["replace", "upsert", "delete"]
Outcome = Literal["accepted", "rejected", "unchanged"]


def normalise_doc(doc: Any, origin: str) -> dict[str, Any]:
    """``doc`` as plain JSON data (a mapping); raise :class:`RulesError` otherwise.

    YAML can hold dates, sets and other types that neither JSON nor the snapshots carry.
    """
    if not isinstance(doc, dict):
        raise RulesError([f"{origin}: a rule set must be a mapping with 'version' and 'rules'"])
    try:
        plain = json_loads(json_dumps(doc))
    except (EncodeError, DecodeError) as exc:
        raise RulesError([f"{origin}: not plain JSON data: {exc}"]) from None
    assert isinstance(plain, dict)
    return plain


def parse_rules_text(data: bytes | str, origin: str) -> dict[str, Any]:
    """A rules document from YAML or JSON text (safe loader; size-limited)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > MAX_RULES_FILE_BYTES:
        raise RulesError([f"{origin}: larger than {MAX_RULES_FILE_BYTES} bytes"])
    try:
        doc = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RulesError([f"{origin}: not UTF-8 text"]) from None
    except yaml.YAMLError as exc:
        raise RulesError([f"{origin}: not valid YAML/JSON: {exc}"]) from None
    except RecursionError:
        raise RulesError([f"{origin}: nested too deeply"]) from None
    return normalise_doc(doc, origin)


@dataclass(frozen=True, slots=True)
class RulesChange:
    """One requested change (not yet checked against the active set)."""

    op: ChangeOp
    version: int
    origin: str
    ruleset: dict[str, Any] | None = None  # replace
    rule: dict[str, Any] | None = None  # upsert
    rule_id: str | None = None  # delete
    base_version: int | None = None

    @classmethod
    def replace(cls, doc: dict[str, Any], origin: str) -> RulesChange:
        """A whole rule set; the version is the set's own."""
        v = doc.get("version")
        if not isinstance(v, int) or isinstance(v, bool):
            raise RulesError([f"{origin}: version: a rule set needs an integer version"])
        return cls("replace", v, origin, ruleset=doc)


def _int(v: Any, what: str, origin: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise RulesError([f"{origin}: {what}: must be a positive integer"])
    return v


def parse_change(data: bytes | str | dict[str, Any], origin: str) -> RulesChange:
    """A change message (JSON or YAML) → :class:`RulesChange`.

    Accepted shapes::

        {"op": "replace", "ruleset": {<rules file>}}        (or a bare rules file)
        {"op": "upsert", "version": 8, "rule": {<one rule>}, "base_version": 7}
        {"op": "delete", "version": 9, "rule_id": "cinema-pay"}

    :raises RulesError: not a change message (names ``origin``).
    """
    doc = data if isinstance(data, dict) else parse_rules_text(data, origin)
    doc = normalise_doc(doc, origin)
    op = doc.get("op", "replace" if "rules" in doc else None)
    base = doc.get("base_version")
    base_version = None if base is None else _int(base, "base_version", origin)
    if op == "replace":
        rs = doc.get("ruleset") if "ruleset" in doc else {
            k: v for k, v in doc.items() if k not in ("op", "base_version")}
        if not isinstance(rs, dict):
            raise RulesError([f"{origin}: ruleset: a replace needs the whole rule set"])
        ch = RulesChange.replace(rs, origin)
        if "ruleset" in doc and "version" in doc and doc["version"] != ch.version:
            raise RulesError([f"{origin}: version: {doc['version']!r} differs from the "
                              f"rule set's own version {ch.version}"])
        return RulesChange("replace", ch.version, origin, ruleset=rs,
                           base_version=base_version)
    if op == "upsert":
        rule = doc.get("rule")
        if not isinstance(rule, dict) or not isinstance(rule.get("id"), str):
            raise RulesError([f"{origin}: rule: an upsert needs one rule with an id"])
        return RulesChange("upsert", _int(doc.get("version"), "version", origin), origin,
                           rule=rule, base_version=base_version)
    if op == "delete":
        rid = doc.get("rule_id")
        if not isinstance(rid, str) or not rid:
            raise RulesError([f"{origin}: rule_id: a delete needs the id of a rule"])
        return RulesChange("delete", _int(doc.get("version"), "version", origin), origin,
                           rule_id=rid, base_version=base_version)
    raise RulesError([f"{origin}: op: must be 'replace', 'upsert' or 'delete', not {op!r}"])


def change_message(change: RulesChange) -> bytes:
    """The JSON wire form of a change (what ``touchstream rules publish`` writes)."""
    d: dict[str, Any] = {"op": change.op, "version": change.version}
    if change.ruleset is not None:
        d["ruleset"] = change.ruleset
    if change.rule is not None:
        d["rule"] = change.rule
    if change.rule_id is not None:
        d["rule_id"] = change.rule_id
    if change.base_version is not None:
        d["base_version"] = change.base_version
    return json_dumps(d)


@dataclass(frozen=True, slots=True)
class ActiveRules:
    """The rule set in force: its validated document, version and digest."""

    version: int
    doc: dict[str, Any]
    digest: str
    origin: str = "<start>"

    @classmethod
    def of(cls, doc: dict[str, Any], origin: str = "<start>") -> ActiveRules:
        """Wrap a validated document (its ``version`` field is the version)."""
        return cls(int(doc["version"]), doc, doc_digest(doc), origin)

    def to_state(self) -> list[Any]:
        """Plain data for snapshots."""
        return [self.version, self.doc, self.digest, self.origin]

    @classmethod
    def from_state(cls, d: list[Any]) -> ActiveRules:
        """Back from :meth:`to_state`."""
        return cls(int(d[0]), dict(d[1]), str(d[2]), str(d[3]))


@dataclass(frozen=True, slots=True)
class RulesUpdate:
    """The control record broadcast to every shard: an accepted rule set."""

    version: int
    doc: dict[str, Any]
    digest: str
    origin: str

    @classmethod
    def of(cls, active: ActiveRules) -> RulesUpdate:
        """The update that makes ``active`` the rule set everywhere."""
        return cls(active.version, active.doc, active.digest, active.origin)

    def active(self) -> ActiveRules:
        """Back to :class:`ActiveRules`."""
        return ActiveRules(self.version, self.doc, self.digest, self.origin)


@dataclass(frozen=True, slots=True)
class RulesStatus:
    """The outcome of one change: what ``ops.rules.status`` carries."""

    outcome: Outcome
    op: str
    version: int | None
    active_version: int
    origin: str
    at_ms: int
    errors: tuple[str, ...] = ()
    digest: str | None = None
    rule_ids: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "outcome": self.outcome,
            "op": self.op,
            "version": self.version,
            "active_version": self.active_version,
            "origin": self.origin,
            "at_ms": self.at_ms,
            "errors": list(self.errors),
            "digest": self.digest,
            "rule_ids": list(self.rule_ids),
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """:func:`decide`'s answer: the new active set (None unless accepted) and the status."""

    active: ActiveRules
    update: RulesUpdate | None
    status: RulesStatus


def _candidate(active: ActiveRules, ch: RulesChange) -> dict[str, Any]:
    if ch.op == "replace":
        assert ch.ruleset is not None
        return ch.ruleset
    doc = json_loads(json_dumps(active.doc))  # a deep copy of plain data
    rules = doc.setdefault("rules", [])
    if ch.op == "upsert":
        assert ch.rule is not None
        idx = next((i for i, r in enumerate(rules)
                    if isinstance(r, dict) and r.get("id") == ch.rule["id"]), None)
        if idx is None:
            rules.append(ch.rule)
        else:
            rules[idx] = ch.rule
    else:
        before = len(rules)
        doc["rules"] = [r for r in rules if not (isinstance(r, dict)
                                                 and r.get("id") == ch.rule_id)]
        if len(doc["rules"]) == before:
            raise RulesError([f"{ch.origin}: rule_id: no rule {ch.rule_id!r} in the active "
                              f"set (version {active.version})"])
    doc["version"] = ch.version
    assert isinstance(doc, dict)
    return doc


def _rule_versions(active: ActiveRules, cand: dict[str, Any], origin: str) -> list[str]:
    old = {r["id"]: r for r in active.doc.get("rules", []) if isinstance(r, dict)}
    errors = []
    for r in cand.get("rules", []):
        if not isinstance(r, dict) or r.get("id") not in old:
            continue
        prev = old[r["id"]]
        if json_dumps(r) == json_dumps(prev):
            continue
        v_old, v_new = prev.get("version", 1), r.get("version", 1)
        if isinstance(v_old, int) and isinstance(v_new, int) and v_new <= v_old:
            errors.append(f"{origin}: rule {r['id']!r}: version: the rule changed, so its "
                          f"version must be higher than {v_old} (is {v_new})")
    return errors


def decide(active: ActiveRules, ch: RulesChange, now_ms: int) -> Decision:
    """Check ``ch`` against the ``active`` set: accept it whole or reject it whole.

    An identical set at the active version is ``unchanged`` (a file saved again, the
    same message read twice): nothing to apply.
    """
    errors: list[str] = []
    cand: dict[str, Any] | None = None
    try:
        cand = _candidate(active, ch)
    except RulesError as exc:
        errors.extend(exc.errors)
    if cand is not None and ch.version == active.version and doc_digest(cand) == active.digest:
        return Decision(active, None, RulesStatus("unchanged", ch.op, ch.version,
                                                  active.version, ch.origin, now_ms,
                                                  digest=active.digest))
    if ch.base_version is not None and ch.base_version != active.version:
        errors.append(f"{ch.origin}: base_version: {ch.base_version} is not the active "
                      f"version {active.version}")
    if ch.version <= active.version:
        errors.append(f"{ch.origin}: version: {ch.version} must be higher than the active "
                      f"version {active.version}")
    rule_ids: tuple[str, ...] = ()
    if cand is not None:
        try:
            rs = parse_rules(cand, ch.origin)
            rule_ids = tuple(r.id for r in rs.rules)
        except RulesError as exc:
            errors.extend(exc.errors)
        errors.extend(_rule_versions(active, cand, ch.origin))
    if errors or cand is None:
        return Decision(active, None, RulesStatus("rejected", ch.op, ch.version,
                                                  active.version, ch.origin, now_ms,
                                                  tuple(errors)))
    new = ActiveRules(ch.version, cand, doc_digest(cand), ch.origin)
    return Decision(new, RulesUpdate.of(new),
                    RulesStatus("accepted", ch.op, ch.version, ch.version, ch.origin, now_ms,
                                digest=new.digest, rule_ids=rule_ids))


def rejected(active: ActiveRules, exc: RulesError, op: str, origin: str,
             now_ms: int) -> RulesStatus:
    """The status of a message that is not even a change (bad JSON, no op, ...)."""
    return RulesStatus("rejected", op, None, active.version, origin, now_ms,
                       tuple(exc.errors))


_CACHE_SIZE = 8
_cache: OrderedDict[str, RuleSet] = OrderedDict()
_cache_lock = threading.Lock()


def compile_update(version: int, doc: dict[str, Any], digest: str, origin: str) -> RuleSet:
    """The compiled rule set of an accepted document (one compile per process per digest:
    every shard of a worker shares it; it is frozen)."""
    with _cache_lock:
        rs = _cache.get(digest)
        if rs is not None:
            _cache.move_to_end(digest)
            return rs
    rs = parse_rules(doc, f"{origin} (v{version})")
    with _cache_lock:
        _cache[digest] = rs
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return rs


def ruleset_doc(text_or_doc: str | bytes | dict[str, Any], origin: str) -> dict[str, Any]:
    """A validated rules document (raises :class:`RulesError` with every problem)."""
    doc = (normalise_doc(text_or_doc, origin) if isinstance(text_or_doc, dict)
           else parse_rules_text(text_or_doc, origin))
    parse_rules(doc, origin)
    return doc


def dumps_doc(doc: dict[str, Any]) -> str:
    """Readable JSON of a document (for ``rules show``)."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False)
