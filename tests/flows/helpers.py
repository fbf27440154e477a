"""Small builders for engine tests: events through the real decoder, and a harness.

Every builder encodes a dict with :func:`flows.codec.json_dumps` and decodes it with
:func:`flows.model.decode_record`, so the tests exercise the real wire decoder. The
:class:`Harness` drives one :class:`ShardEngine` in replay style (buffer, then advance
the watermark) and a live :class:`FrictionEngine` fed with the visits it finishes.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from flows.aggregates import FrictionEngine
from flows.codec import json_dumps
from flows.engine import EngineConfig, ShardEngine, StatDelta, VisitDone
from flows.model import Alert, DeadLetter, Envelope, Profile, Push, RawRecord, decode_record
from flows.rules import RuleSet, load_default_rules, parse_rules
from state.profiles import InMemoryProfileStore

__all__ = [
    "DEFAULT_RULES_PATH",
    "MIN",
    "T0",
    "D",
    "H",
    "Harness",
    "M",
    "S",
    "calls",
    "click",
    "default_rules_doc",
    "envelope",
    "location",
    "profile",
    "rules_with",
]

T0 = 1_700_000_000_000
S = 1_000
MIN = 60 * S
M = MIN
H = 60 * MIN
D = 24 * H

DEFAULT_RULES_PATH = Path(__file__).resolve().parents[2] / "flows" / "default_rules.yaml"

_pos = itertools.count(1)


def envelope(doc: dict[str, Any], source: str = "test") -> Envelope:
    """Encode ``doc`` as JSON and decode it with the real decoder (must be valid)."""
    rec = RawRecord(source, next(_pos), json_dumps(doc))
    env = decode_record(rec)
    if isinstance(env, DeadLetter):
        raise AssertionError(f"test event did not decode: {env.reason}: {env.detail}: {doc}")
    return env


def click(
    cid: str,
    ts: int,
    action: str,
    module: str | None = None,
    step: str | None = None,
    terminal: str = "T1",
    hall: str = "H1",
    event_id: str | None = None,
) -> Envelope:
    """A terminal click."""
    doc: dict[str, Any] = {
        "type": "click",
        "customer_id": cid,
        "ts": ts,
        "action": action,
        "terminal_id": terminal,
        "hall_id": hall,
    }
    if module is not None:
        doc["module"] = module
    if step is not None:
        doc["step"] = step
    if event_id is not None:
        doc["event_id"] = event_id
    return envelope(doc)


def location(
    cid: str,
    ts: int,
    poi: str | None = "cinema",
    cell: str = "C1",
    event_id: str | None = None,
) -> Envelope:
    """A network location signal (``poi=None`` for a cell that maps to no place)."""
    doc: dict[str, Any] = {"type": "location", "customer_id": cid, "ts": ts, "cell_id": cell}
    if poi is not None:
        doc["poi"] = poi
    if event_id is not None:
        doc["event_id"] = event_id
    return envelope(doc)


def calls(
    cid: str,
    ts: int,
    calls_in: int,
    calls_out: int,
    missed: int = 0,
    interval_s: int = 900,
    event_id: str | None = None,
) -> Envelope:
    """A call-volume record for one interval."""
    doc: dict[str, Any] = {
        "type": "calls",
        "customer_id": cid,
        "ts": ts,
        "interval_s": interval_s,
        "calls_in": calls_in,
        "calls_out": calls_out,
        "missed": missed,
    }
    if event_id is not None:
        doc["event_id"] = event_id
    return envelope(doc)


def profile(
    cid: str,
    subscriptions: tuple[str, ...] | list[str] = (),
    configured: tuple[str, ...] | list[str] = (),
    prefs: dict[str, list[str]] | None = None,
    opt_out: bool = False,
    trials: dict[str, int] | None = None,
    handset: str | None = None,
    segment: str | None = None,
) -> Profile:
    """A customer profile from plain lists."""
    return Profile(
        customer_id=cid,
        subscriptions=frozenset(subscriptions),
        configured=frozenset(configured),
        handset=handset,
        segment=segment,
        prefs={k: tuple(v) for k, v in (prefs or {}).items()},
        opt_out=opt_out,
        trials=dict(trials or {}),
    )


def default_rules_doc() -> dict[str, Any]:
    """A fresh copy of the default rules file as parsed YAML."""
    doc = yaml.safe_load(DEFAULT_RULES_PATH.read_text("utf-8"))
    assert isinstance(doc, dict)
    return copy.deepcopy(doc)


def rules_with(guards: dict[str, Any] | None = None, **overrides: dict[str, Any]) -> RuleSet:
    """The default rules with changed trigger parameters, by rule id.

    ``rules_with(**{"cinema-pay": {"min_visits": 3}})`` changes one trigger parameter;
    a value of ``None`` for a whole rule (``{"call-spike": None}``) drops that rule;
    ``guards={...}`` changes the guards.
    """
    doc = default_rules_doc()
    by_id = {r["id"]: r for r in doc["rules"]}
    unknown = set(overrides) - set(by_id)
    if unknown:
        raise KeyError(f"no such default rule: {sorted(unknown)}")
    for rid, params in overrides.items():
        if params is None:
            doc["rules"].remove(by_id[rid])
        else:
            by_id[rid]["trigger"].update(params)
    if guards:
        doc["guards"].update(guards)
    return parse_rules(doc, "test-rules.yaml")


class Harness:
    """One shard engine (replay style) plus a live friction engine, collecting outputs."""

    def __init__(
        self,
        rules: RuleSet | None = None,
        profiles: list[Profile] | tuple[Profile, ...] = (),
        config: EngineConfig | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.rules = rules if rules is not None else load_default_rules()
        self.profiles = InMemoryProfileStore(profiles)
        self.config = config if config is not None else EngineConfig(shards=1)
        self.engine = ShardEngine(0, self.rules, self.profiles, self.config, state)
        self.friction = FrictionEngine(self.rules, 1, live=True)
        self.out: list[Any] = []
        self.pushes: list[Push] = []
        self.alerts: list[Alert] = []
        self.visits: list[VisitDone] = []
        self.counts: Counter[tuple[str, ...]] = Counter()

    def put_profiles(self, *profiles: Profile) -> None:
        """Add or replace profiles in the store."""
        self.profiles.put_many(profiles)

    def feed(self, *envs: Envelope) -> list[Any]:
        """Buffer every event, then advance to the greatest event time; new outputs."""
        for env in envs:
            self.engine.buffer_event(env)
        return self.advance(max(e.event.ts for e in envs))

    def advance(self, wm: int) -> list[Any]:
        """Advance the watermark to ``wm``; return the outputs it produced."""
        out: list[Any] = []
        self.engine.advance(wm, out)
        return self._collect(out)

    def _collect(self, out: list[Any]) -> list[Any]:
        produced: list[Any] = []
        for item in out:
            produced.append(item)
            if type(item) is Push:
                self.pushes.append(item)
            elif type(item) is Alert:
                self.alerts.append(item)
            elif type(item) is VisitDone:
                self.visits.append(item)
                fout: list[Any] = []
                self.friction.on_visit(item, fout)
                for f in fout:
                    produced.append(f)
                    if type(f) is Alert:
                        self.alerts.append(f)
                    elif type(f) is StatDelta:
                        self.counts.update(f.counts)
        self.out.extend(produced)
        return produced

    def stats(self) -> Counter[tuple[str, ...]]:
        """Every counter so far (drains the engine's pending stats)."""
        delta = self.engine.take_stats()
        if delta is not None:
            self.counts.update(delta.counts)
        return self.counts

    def count(self, *key: str) -> int:
        """One counter, e.g. ``count("rule", "cinema-pay", "blocked:opt_out")``."""
        return self.stats()[key]

    def pushes_of(self, rule_id: str) -> list[Push]:
        """The pushes of one rule."""
        return [p for p in self.pushes if p.rule_id == rule_id]

    def alerts_of(self, alert_type: str) -> list[Alert]:
        """The alerts of one CloudEvents type."""
        return [a for a in self.alerts if a.type == alert_type]
