"""Rule conditions (``when``, CEL): checked at load, evaluated only when a trigger fires."""

from __future__ import annotations

import copy
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

import flows.cel
from flows.cel import ALLOWED_FUNCTIONS, ConditionError, compile_condition
from flows.model import Profile
from flows.rules import (
    MAX_WHEN_CHARS,
    MAX_WHEN_DEPTH,
    MAX_WHEN_LOOPS,
    MAX_WHEN_NODES,
    RulesError,
    RuleSet,
    load_rules,
    parse_rules,
)
from flows.runner import replay
from flows.settings import load_settings
from tests.flows.helpers import (
    MIN,
    T0,
    H,
    Harness,
    S,
    calls,
    click,
    envelope,
    location,
    profile,
)

JAZZ_WHEN = 'profile.segment == "youth" && "jazz" in profile.prefs.music'


def rule(rid: str = "r", when: str | None = None, **fields: Any) -> dict[str, Any]:
    """A module_enter(music) push rule with a condition, fields overridable."""
    doc: dict[str, Any] = {
        "id": rid,
        "trigger": {"kind": "module_enter", "module": "music"},
        "push": {"module": "music", "kind": "content"},
        "once_per": "session",
    }
    if when is not None:
        doc["when"] = when
    doc.update(fields)
    return doc


def ruleset(*rules: dict[str, Any], timezone: str | None = None) -> RuleSet:
    doc: dict[str, Any] = {"version": 1, "guards": {"max_pushes_per_customer": 0},
                           "rules": list(rules)}
    if timezone is not None:
        doc["timezone"] = timezone
    return parse_rules(doc, "cond.yaml")


def errors_of(*rules: dict[str, Any], timezone: str | None = None) -> list[str]:
    with pytest.raises(RulesError) as ei:
        ruleset(*rules, timezone=timezone)
    return ei.value.errors


def clicked(cid: str, ts: int, action: str, module: str | None = None,
            attrs: dict[str, Any] | None = None, terminal: str = "T1",
            hall: str = "H1") -> Any:
    """A click with ``attrs`` (the helpers' ``click`` has none)."""
    doc: dict[str, Any] = {"type": "click", "customer_id": cid, "ts": ts, "action": action,
                           "terminal_id": terminal, "hall_id": hall}
    if module is not None:
        doc["module"] = module
    if attrs is not None:
        doc["attrs"] = attrs
    return envelope(doc)


def enter_music(h: Harness, cid: str, ts: int, **kw: Any) -> list[Any]:
    return h.feed(click(cid, ts, "session_start", **kw), click(cid, ts + S, "module_enter",
                                                               "music", **kw))


# --- conditions on profiles, events and context ----------------------------------------


def test_jazz_youth_pushes_only_for_young_jazz_lovers():
    h = Harness(ruleset(rule("jazz-youth", JAZZ_WHEN)), profiles=[
        profile("c1", segment="youth", prefs={"music": ["rock", "jazz"]}),
        profile("c2", segment="youth", prefs={"music": ["rock"]}),
        profile("c3", segment="adult", prefs={"music": ["jazz"]}),
        profile("c4", segment="youth"),  # no music prefs: 'in' on a missing key fails
    ])
    for i, cid in enumerate(["c1", "c2", "c3", "c4", "c5"]):  # c5 has no profile at all
        enter_music(h, cid, T0 + i * MIN, terminal=f"T{i}")
    assert [p.customer_id for p in h.pushes] == ["c1"]
    assert h.pushes[0].channel == "terminal:T0"
    assert h.count("rule", "jazz-youth", "pushes") == 1
    # c5's empty profile has segment "" (never null), so '&&' stops before prefs
    assert h.count("rule", "jazz-youth", "blocked:when") == 3  # c2, c3, c5
    # c4 has no 'music' key in prefs: a runtime error, counted, never a crash
    assert h.count("rule", "jazz-youth", "blocked:when_error") == 1


def test_missing_prefs_key_can_be_guarded_in_the_expression():
    when = 'has(profile.prefs.music) && "jazz" in profile.prefs.music'
    h = Harness(ruleset(rule("r", when)), profiles=[profile("c1", segment="youth")])
    enter_music(h, "c1", T0)
    assert h.pushes == []
    assert h.count("rule", "r", "blocked:when") == 1
    assert h.count("rule", "r", "blocked:when_error") == 0


def test_condition_is_evaluated_only_when_the_trigger_fires():
    # Without attrs the condition fails at run time, which is counted: so the counter
    # shows exactly how often it was evaluated.
    h = Harness(ruleset(rule("r", 'event.attrs.kiosk == "big"')))
    h.feed(click("c1", T0, "session_start"), click("c1", T0 + S, "module_enter", "video"),
           click("c1", T0 + 2 * S, "step_enter", "video", "s1"),
           click("c1", T0 + 3 * S, "order", "video"), location("c1", T0 + 4 * S),
           calls("c1", T0 + 5 * S, 50, 50))
    assert h.count("rule", "r", "blocked:when_error") == 0
    h.feed(click("c1", T0 + 10 * S, "module_enter", "music"))
    assert h.count("rule", "r", "blocked:when_error") == 1
    assert h.pushes == []
    h.feed(clicked("c1", T0 + 20 * S, "module_enter", "music", attrs={"kiosk": "big"}))
    assert [p.customer_id for p in h.pushes] == ["c1"]
    assert h.count("rule", "r", "blocked:when_error") == 1


def test_a_blocked_condition_does_not_use_up_once_per():
    h = Harness(ruleset(rule("r", 'event.attrs.kiosk == "big"')))
    h.feed(clicked("c1", T0, "session_start"),
           clicked("c1", T0 + S, "module_enter", "music", attrs={"kiosk": "small"}),
           clicked("c1", T0 + 2 * S, "module_enter", "music", attrs={"kiosk": "big"}),
           clicked("c1", T0 + 3 * S, "module_enter", "music", attrs={"kiosk": "big"}))
    assert [p.event_ts for p in h.pushes] == [T0 + 2 * S]
    assert h.count("rule", "r", "blocked:when") == 1
    assert h.count("rule", "r", "blocked:once_per") == 1


def test_a_non_bool_result_counts_as_an_error():
    h = Harness(ruleset(rule("r", "event.attrs.flag")))  # dyn: allowed, checked at run time
    h.feed(clicked("c1", T0, "session_start"),
           clicked("c1", T0 + S, "module_enter", "music", attrs={"flag": "yes"}),
           clicked("c2", T0 + 2 * S, "session_start", terminal="T2"),
           clicked("c2", T0 + 3 * S, "module_enter", "music", attrs={"flag": True},
                   terminal="T2"))
    assert [p.customer_id for p in h.pushes] == ["c2"]
    assert h.count("rule", "r", "blocked:when_error") == 1


def test_runtime_error_is_logged_without_the_customer_id(caplog):
    cid = "13812345678"
    h = Harness(ruleset(rule("r", "event.attrs[event.customer_id] == 1")))
    with caplog.at_level(logging.WARNING, logger="flows.engine"):
        for i in range(5):
            h.feed(click(cid, T0 + i * H, "session_start"),
                   click(cid, T0 + i * H + S, "module_enter", "music"))
    assert h.count("rule", "r", "blocked:when_error") == 5
    msgs = [r.getMessage() for r in caplog.records if r.name == "flows.engine"]
    assert len(msgs) == 3  # the 1st, 2nd and 4th time: the log thins out
    assert all("'r'" in m and "KeyError" in m for m in msgs)
    assert not any(cid in m for m in msgs)


def test_location_rule_condition_on_the_cell():
    cinema = {"id": "cinema", "trigger": {"kind": "location_frequency", "poi": "cinema",
                                          "min_visits": 2},
              "when": 'event.cell_id.startsWith("BJ-") && event.poi == "cinema"',
              "push": {"module": "mobile_pay", "kind": "offer"}}
    h = Harness(ruleset(cinema))
    h.feed(location("c1", T0, cell="BJ-1"), location("c1", T0 + 2 * H, cell="BJ-2"),
           location("c2", T0, cell="SH-1"), location("c2", T0 + 2 * H, cell="SH-2"))
    assert [p.customer_id for p in h.pushes] == ["c1"]
    assert h.count("rule", "cinema", "blocked:when") == 1


def test_call_spike_condition_on_missed_calls():
    spike = {"id": "spike", "trigger": {"kind": "call_spike", "min_total": 10, "factor": 3.0,
                                        "min_history": 1},
             "when": "event.missed >= 2 && event.calls_in > event.calls_out",
             "push": {"module": "call_reminder", "kind": "offer"}}
    h = Harness(ruleset(spike))
    h.feed(calls("c1", T0, 1, 1), calls("c1", T0 + 15 * MIN, 20, 5, missed=2),
           calls("c2", T0, 1, 1), calls("c2", T0 + 15 * MIN, 20, 5, missed=1))
    assert [p.customer_id for p in h.pushes] == ["c1"]
    assert h.count("rule", "spike", "blocked:when") == 1


def test_step_dwell_condition_gates_both_alert_and_push():
    dwell = {"id": "door", "trigger": {"kind": "step_dwell", "dwell": "90s"},
             "when": 'event.module == "remote_cam" && event.step == "door_sensor_setup"'
                     ' && event.ts == context.ts - 90000 && context.hall == "H1"',
             "push": {"kind": "help"}, "alert": {"type": "touchstream.dwell.customer"}}
    h = Harness(ruleset(dwell))
    h.feed(click("c1", T0, "session_start"),
           click("c1", T0 + S, "step_enter", "remote_cam", "door_sensor_setup"),
           click("c2", T0, "session_start", terminal="T2"),
           click("c2", T0 + S, "step_enter", "remote_cam", "pairing", terminal="T2"))
    h.advance(T0 + 5 * MIN)
    assert [p.customer_id for p in h.pushes] == ["c1"]
    assert [a.subject for a in h.alerts] == ["c1"]
    assert h.count("rule", "door", "blocked:when") == 1


def test_setup_and_trial_conditions_see_the_service_as_context_module():
    setup = {"id": "setup", "trigger": {"kind": "session_start_unconfigured",
                                        "services": ["care_link", "remote_cam"]},
             "when": 'context.module == "remote_cam" && profile.handset.startsWith("HW")',
             "push": {"kind": "setup_guide"}, "once_per": "session_service"}
    trial = {"id": "trial", "trigger": {"kind": "trial_ending", "within": "48h"},
             "when": 'context.module in profile.subscriptions',
             "push": {"kind": "trial_ending"}, "once_per": "service"}
    h = Harness(ruleset(setup, trial), profiles=[
        profile("c1", subscriptions=["care_link", "remote_cam", "video"], handset="HW-P60",
                trials={"video": T0 + H, "music": T0 + 2 * H}),
        profile("c2", subscriptions=["remote_cam"], handset="XM-14"),
    ])
    h.feed(click("c1", T0, "session_start"), click("c2", T0, "session_start", terminal="T2"))
    got = sorted((p.rule_id, p.customer_id, p.content["module"]) for p in h.pushes)
    assert got == [("setup", "c1", "remote_cam"), ("trial", "c1", "video")]
    assert h.count("rule", "setup", "blocked:when") == 2  # c1 care_link, c2 remote_cam
    assert h.count("rule", "trial", "blocked:when") == 1  # c1 music: not subscribed


def test_context_time_is_local_to_the_rules_timezone():
    # T0 is Tuesday 2023-11-14 22:13:20 UTC = Wednesday 06:13:20 in Asia/Shanghai.
    when = "context.weekday == 3 && context.hour == 6 && context.minute == 13"
    for tz, expected in (("Asia/Shanghai", ["c1"]), (None, []), ("UTC", [])):
        h = Harness(ruleset(rule("r", when), timezone=tz))
        enter_music(h, "c1", T0 - S)
        assert [p.customer_id for p in h.pushes] == expected, tz
        assert h.rules.timezone == (tz or "UTC")


def test_opening_hours_condition():
    h = Harness(ruleset(rule("r", "context.hour >= 9 && context.hour < 21"),
                        timezone="Asia/Shanghai"))
    enter_music(h, "c1", T0)           # 06:13 local
    enter_music(h, "c2", T0 + 3 * H)   # 09:13 local
    assert [p.customer_id for p in h.pushes] == ["c2"]


def test_context_names_the_rule_hall_and_terminal():
    when = ('context.rule == "r7" && context.rule_version == 3 && context.hall == "H7"'
            ' && context.terminal == "T9" && context.ts == event.ts')
    h = Harness(ruleset(rule("r7", when, version=3)))
    enter_music(h, "c1", T0, terminal="T9", hall="H7")
    enter_music(h, "c2", T0, terminal="T8", hall="H7")
    assert [p.customer_id for p in h.pushes] == ["c1"]


def test_macros_over_prefs_and_attrs():
    when = ('profile.prefs.exists(k, k == "music") && profile.prefs.music.exists_one('
            'g, g.matches("^j.*z$")) && size(event.attrs.tags.filter(t, t != "")) == 2')
    h = Harness(ruleset(rule("r", when)), profiles=[
        profile("c1", prefs={"music": ["jazz", "rock"]}),
        profile("c2", prefs={"music": ["jazz", "jizz"]}),
    ])
    for i, cid in enumerate(["c1", "c2"]):
        h.feed(clicked(cid, T0, "session_start", terminal=f"T{i}"),
               clicked(cid, T0 + S, "module_enter", "music", attrs={"tags": ["a", "", "b"]},
                       terminal=f"T{i}"))
    assert [p.customer_id for p in h.pushes] == ["c1"]


# --- load-time errors name file, rule and field ---------------------------------------


@pytest.mark.parametrize(
    ("when", "trigger", "message"),
    [
        ("profile.segment ==", None,
         "when: syntax error at column 19: expected an expression, found end of input"),
        ('profile.segment = "x"', None, "when: syntax error at column 17: unexpected '='"),
        ('user.segment == "x"', None,
         "when: unknown variable 'user'; the variables are event, profile and context"),
        ('profile.segmnt == "youth"', None, "when: unknown field 'segmnt' of profile; "
         "profile has configured, customer_id, handset, opt_out, prefs, segment, "
         "subscriptions, trials (at column 9)"),
        ("event.calls_in > 3", None,
         "when: unknown field 'calls_in' of event for trigger module_enter"),
        ('event.attrs.x == 1', {"kind": "step_dwell"},
         "when: unknown field 'attrs' of event for trigger step_dwell"),
        ("profile.segment == 3", None,
         "when: '==' compares string with int, which is never equal (at column 17)"),
        ("profile.segment + 1 > 0", None, "when: '+' does not apply to string and int"),
        ('"jazz" in profile.segment', None,
         "when: 'in' needs a list or a map on its right, not string"),
        ("1 in profile.prefs.music", None, "when: 'in': int is never in list(string)"),
        ("profile.opt_out < 1", None, "when: '<' cannot order bool and int"),
        ("profile.segment", None, "when: the expression is a string, not a bool"),
        ("profile.prefs.size()", None, "when: the expression is a int, not a bool"),
        ('profile.segment == null', None, "when: '==' compares string with null"),
        ("size(profile) > 0", None, "when: profile is not a value"),
        ('profile.segment.lowerAscii() == "x"', None, "when: unknown function 'lowerAscii'"),
        ('profile.segment.matches("(")', None, "when: not a valid regular expression"),
        ("profile.segment.matches(event.attrs.re)", None,
         "when: matches() takes a quoted pattern, not a computed one"),
        ('true ? 1 : "a"', None, "when: the branches of '?:' differ: int and string"),
        ("string(profile.opt_out) == 'true'", None, "when: string() cannot convert bool"),
        ("", None, "when: empty expression"),
        ("   ", None, "when: empty expression"),
        ("profile.prefs.all(x, profile.prefs.all(profile, true))", None,
         "when: all(): the name 'profile' is already taken"),
        ("true", {"kind": "step_friction"},
         "when: not supported for trigger step_friction"),
    ],
)
def test_when_errors_name_the_file_rule_and_field(when, trigger, message):
    r = rule("bad-rule", when)
    if trigger is not None:
        r["trigger"] = trigger
        r["push" if trigger["kind"] == "step_dwell" else "alert"] = (
            {"kind": "help"} if trigger["kind"] == "step_dwell" else {"type": "a.b"})
        if trigger["kind"] == "step_friction":
            del r["push"]
        r.pop("once_per")
    errs = errors_of(rule("ok", JAZZ_WHEN), r)
    assert len(errs) == 1, errs
    assert errs[0].startswith(f"cond.yaml: rule 'bad-rule': {message}"), errs[0]


def test_when_must_be_a_string():
    errs = errors_of(rule("r", 42))  # type: ignore[arg-type]
    assert errs == ["cond.yaml: rule 'r': when: Input should be a valid string"]


def test_every_bad_condition_is_reported():
    errs = errors_of(rule("a", "profile.x"), rule("b", "event.y == 1"), rule("c", JAZZ_WHEN))
    assert [e.split(": ")[1] for e in errs] == ["rule 'a'", "rule 'b'"]


def test_a_disabled_rule_is_still_checked():
    errs = errors_of(rule("off", "profile.nope", enabled=False))
    assert errs[0].startswith("cond.yaml: rule 'off': when: unknown field 'nope'")


@pytest.mark.parametrize(
    ("tz", "message"),
    [("Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
     ("../../etc/passwd", "not a time zone name: '../../etc/passwd'"),
     ("/etc/localtime", "not a time zone name")],
)
def test_bad_timezone(tz, message):
    errs = errors_of(rule("r", JAZZ_WHEN), timezone=tz)
    assert len(errs) == 1
    assert errs[0].startswith("cond.yaml: timezone: Value error, " + message), errs[0]


# --- complexity limits, at the boundary ------------------------------------------------


def _padded(n: int) -> str:
    """A valid expression of exactly ``n`` characters."""
    head = 'profile.segment != "'
    return head + "x" * (n - len(head) - 1) + '"'


def test_expression_length_limit():
    assert len(_padded(MAX_WHEN_CHARS)) == MAX_WHEN_CHARS
    assert ruleset(rule("r", _padded(MAX_WHEN_CHARS))).rules[0].when is not None
    errs = errors_of(rule("r", _padded(MAX_WHEN_CHARS + 1)))
    assert errs == [f"cond.yaml: rule 'r': when: too complex: {MAX_WHEN_CHARS + 1} "
                    f"characters, more than the limit of {MAX_WHEN_CHARS}"]


def test_ast_depth_limit():
    # each '!' is one level above the literal: depth = number of '!' + 1
    ok = "!" * (MAX_WHEN_DEPTH - 1) + "false"
    assert ruleset(rule("r", ok)).rules[0].when is not None
    errs = errors_of(rule("r", "!" + ok))
    assert errs[0].startswith(f"cond.yaml: rule 'r': when: too complex: nested more than "
                              f"{MAX_WHEN_DEPTH} levels deep")


def test_parenthesis_nesting_limit():
    ok = "(" * (MAX_WHEN_DEPTH - 1) + "true" + ")" * (MAX_WHEN_DEPTH - 1)
    assert ruleset(rule("r", ok)).rules[0].when is not None
    errs = errors_of(rule("r", "(" + ok + ")"))
    assert "when: too complex: nested more than" in errs[0]


def test_long_and_or_chains_are_balanced_not_deep():
    # 40 alternatives would be 41 levels as a left-deep tree; balanced, 8
    when = " || ".join(f"event.ts == {i}" for i in range(40))
    assert len(when) <= MAX_WHEN_CHARS
    rs = ruleset(rule("r", when))
    assert rs.rules[0].when is not None


def test_node_count_limit():
    # size([1, ..., 1]) > 0: k literals + list + size + '>' + 0 = k + 4 nodes
    def expr(nodes: int) -> str:
        return "size([" + ", ".join(["1"] * (nodes - 4)) + "]) > 0"

    assert ruleset(rule("r", expr(MAX_WHEN_NODES))).rules[0].when is not None
    errs = errors_of(rule("r", expr(MAX_WHEN_NODES + 1)))
    assert errs == [f"cond.yaml: rule 'r': when: too complex: more than {MAX_WHEN_NODES} "
                    "nodes"]


def test_nested_loop_limit():
    def nested(depth: int) -> str:
        e = "true"
        for i in reversed(range(depth)):
            e = f"profile.subscriptions.exists(v{i}, {e})"
        return e

    assert ruleset(rule("r", nested(MAX_WHEN_LOOPS))).rules[0].when is not None
    # loops side by side are fine: only nesting multiplies the work
    side = " && ".join([nested(MAX_WHEN_LOOPS)] * 3)
    assert ruleset(rule("r", side)).rules[0].when is not None
    errs = errors_of(rule("r", nested(MAX_WHEN_LOOPS + 1)))
    assert errs[0].startswith(f"cond.yaml: rule 'r': when: too complex: more than "
                              f"{MAX_WHEN_LOOPS} nested loops")


# --- nothing but CEL over the values handed in ----------------------------------------


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("__import__('os') == 0", "when: unknown function '__import__'"),
        ("__import__('os').system('true') == 0", "when: unknown function 'system'"),
        ("event.__class__.__name__ == 'x'", "when: unknown field '__class__' of event"),
        ("profile.segment.__class__ == 'x'", "when: string has no fields (.__class__)"),
        ("open('/etc/passwd').size() > 0", "when: unknown function 'open'"),
        ("base64.decode(event.attrs.x) == b''", "when: unknown function 'decode'"),
        ("eval('1') == 1", "when: unknown function 'eval'"),
        ("google.protobuf.Any{} == null", "when: syntax error"),
    ],
)
def test_hostile_expressions_are_refused_at_load(when, message):
    errs = errors_of(rule("evil", when))
    assert len(errs) == 1
    assert errs[0].startswith(f"cond.yaml: rule 'evil': {message}"), errs[0]


def test_a_map_field_is_a_key_lookup_never_python_attribute_access():
    h = Harness(ruleset(rule("r", 'event.attrs.__class__ == "dict"')))
    h.feed(clicked("c1", T0, "session_start"),
           clicked("c1", T0 + S, "module_enter", "music", attrs={}),
           clicked("c2", T0, "session_start", terminal="T2"),
           clicked("c2", T0 + S, "module_enter", "music", attrs={"__class__": "dict"},
                   terminal="T2"))
    assert [p.customer_id for p in h.pushes] == ["c2"]  # the key, as data
    assert h.count("rule", "r", "blocked:when_error") == 1  # no such key for c1


def test_the_compiled_program_is_checked_against_the_allow_list(monkeypatch):
    # Defence in depth: whatever the Rust compiler says the program calls must be allowed.
    monkeypatch.setattr(flows.cel, "ALLOWED_FUNCTIONS", ALLOWED_FUNCTIONS - {"size"})
    with pytest.raises(ValueError, match="when: uses size, which conditions do not support"):
        compile_condition("size(profile.segment) > 0", "module_enter", "r", 1, "UTC",
                          1000, 32, 200, 2)


def test_every_supported_construct_compiles_within_the_allow_list():
    when = ('!(profile.segment in ["a", "b"]) && -event.ts < 0 && event.ts % 7 * 2 / 1 - 1 >= 0'
            ' && profile.prefs.all(k, k != "") && profile.subscriptions.exists(s, s == "x")'
            ' || profile.configured.exists_one(s, s.endsWith("y"))'
            ' || profile.prefs.map(k, k.contains("m")).filter(b, b).size() > 0'
            ' || profile.prefs.map(k, true, size(k))[0] == 1 || {"a": 1}["a"] == 1u'
            ' || (has(event.attrs.x) ? int(event.attrs.x) : 0) > uint("1")'
            ' || double("1.5") > 1.0 || string(1) + "x" == "1x" || bytes("a") == b"a"'
            ' || dyn(event.step).startsWith("s") || event.module.matches("^m")')
    cond = compile_condition(when, "module_enter", "r", 1, "UTC", 1000, 32, 200, 2)
    assert set(cond.program.functions()) <= ALLOWED_FUNCTIONS
    ev = click("c1", T0, "module_enter", "music").event
    assert cond.holds(ev, Profile("c1"), "", "", "music", T0) is True


def test_conditions_survive_pickle_and_deepcopy():
    rs = ruleset(rule("jazz", JAZZ_WHEN))
    ev = click("c1", T0, "module_enter", "music").event
    fan = profile("c1", segment="youth", prefs={"music": ["jazz"]})
    for copy_ in (pickle.loads(pickle.dumps(rs)), copy.deepcopy(rs)):
        cond = copy_.rules[0].when
        assert cond is not None and cond == rs.rules[0].when
        assert cond.holds(ev, fan, "", "", "music", T0) is True
        rock = profile("c1", segment="youth", prefs={"music": ["rock"]})
        assert cond.holds(ev, rock, "", "", "music", T0) is False
        with pytest.raises(ConditionError, match="KeyError"):
            cond.holds(ev, Profile("c1", segment="youth"), "", "", "music", T0)


# --- a rule with a condition in the whole dataflow --------------------------------------


def test_replay_pushes_only_for_matching_profiles(tmp_path: Path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({
        "version": 1, "timezone": "Asia/Shanghai",
        "rules": [{"id": "jazz-youth", "trigger": {"kind": "module_enter", "module": "music"},
                   "when": JAZZ_WHEN, "push": {"module": "music", "kind": "content"},
                   "once_per": "session"}],
    }), "utf-8")
    assert load_rules(rules).rules[0].when is not None
    profiles = [
        profile(f"c{i}", segment="youth" if i % 2 else "adult",
                prefs={"music": ["jazz"] if i % 3 else ["rock"]})
        for i in range(12)
    ]
    (tmp_path / "profiles.jsonl").write_text(
        "".join(json.dumps(p.to_dict()) + "\n" for p in profiles), "utf-8")
    rows = []
    for i in range(12):
        ts = T0 + i * MIN
        base = {"type": "click", "customer_id": f"c{i}", "terminal_id": f"T{i}",
                "hall_id": "H1"}
        rows.append({**base, "ts": ts, "action": "session_start"})
        rows.append({**base, "ts": ts + S, "action": "module_enter", "module": "music"})
    (tmp_path / "events.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    settings = load_settings(mode="replay", out_dir=tmp_path / "out",
                             profiles_file=tmp_path / "profiles.jsonl", rules_file=rules,
                             engine={"workers": 1})
    out = replay(settings, tmp_path / "events.jsonl")
    pushes = [json.loads(x) for x in (out / "pushes.jsonl").read_text().splitlines()]
    expected = sorted(f"c{i}" for i in range(12) if i % 2 and i % 3)
    assert sorted(p["customer_id"] for p in pushes) == expected == ["c1", "c11", "c5", "c7"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rules"]["jazz-youth"]["pushes"] == 4
    assert stats["rules"]["jazz-youth"]["blocked"] == {"when": 8}
