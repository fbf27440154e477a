"""Rules file validation: errors name file, rule and field; durations; the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.cli import main as cli_main
from flows.rules import (
    MAX_RULES_FILE_BYTES,
    Guards,
    RulesError,
    load_default_rules,
    load_rules,
    parse_duration_ms,
    parse_rules,
)
from tests.flows.helpers import DEFAULT_RULES_PATH, default_rules_doc


def _write(tmp_path: Path, doc: Any, name: str = "rules.yaml") -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False), "utf-8")
    return p


def _rule(doc: dict[str, Any], rid: str) -> dict[str, Any]:
    return next(r for r in doc["rules"] if r["id"] == rid)


def _errors(tmp_path: Path, doc: Any) -> tuple[str, list[str]]:
    p = _write(tmp_path, doc)
    with pytest.raises(RulesError) as ei:
        load_rules(p)
    return str(p), ei.value.errors


# --- the shipped rules ------------------------------------------------------------


def test_default_rules_load():
    rs = load_default_rules()
    assert rs.version == 1
    assert rs.source == "flows/default_rules.yaml"
    assert [(r.id, r.kind) for r in rs.rules] == [
        ("cinema-pay", "location_frequency"),
        ("call-spike", "call_spike"),
        ("music-pref", "module_enter"),
        ("setup-first", "session_start_unconfigured"),
        ("help-sprite", "step_dwell"),
        ("step-friction", "step_friction"),
        ("trial-ending", "trial_ending"),
    ]
    assert rs.guards == Guards(3, 86_400_000, True)
    assert rs.places() == frozenset({"cinema"})
    by_id = {r.id: r for r in rs.rules}
    assert (by_id["cinema-pay"].once_scope, by_id["cinema-pay"].once_ms) == ("period", 86_400_000)
    assert by_id["music-pref"].once_scope == "session"
    assert by_id["setup-first"].once_scope == "session_service"
    assert by_id["help-sprite"].once_scope == "visit"
    assert (by_id["step-friction"].once_scope, by_id["step-friction"].once_ms) == (
        "period", 3_600_000)
    assert by_id["trial-ending"].once_scope == "service"
    t = by_id["cinema-pay"].trigger
    assert (t.poi, t.min_visits, t.window, t.visit_gap) == ("cinema", 2, 604_800_000, 3_600_000)
    t = by_id["help-sprite"].trigger
    assert t.dwell == 90_000
    assert by_id["help-sprite"].push is not None and by_id["help-sprite"].alert is not None
    assert by_id["step-friction"].push is None
    assert rs.of_kind("call_spike")[0].id == "call-spike"
    assert rs.of_kind("nothing") == ()


def test_default_rules_file_loads_by_path(tmp_path):
    rs = load_rules(DEFAULT_RULES_PATH)
    assert rs.rules == load_default_rules().rules
    assert rs.source == str(DEFAULT_RULES_PATH)


def test_defaults_fill_missing_parameters(tmp_path):
    p = _write(tmp_path, {"version": 2, "rules": [
        {"id": "stuck", "trigger": {"kind": "step_dwell"}, "alert": {"type": "x.y"}},
        {"id": "calls", "trigger": {"kind": "call_spike"},
         "push": {"kind": "offer", "module": "m"}},
    ]})
    rs = load_rules(p)
    assert rs.version == 2
    assert rs.guards == Guards()
    stuck, calls = rs.rules
    assert stuck.trigger.dwell == 90_000 and stuck.once_scope == "visit"
    assert (calls.once_scope, calls.once_ms) == ("period", 86_400_000)
    assert calls.trigger.min_history == 3 and calls.trigger.max_history == 12


def test_disabled_rule_is_left_out():
    doc = default_rules_doc()
    _rule(doc, "call-spike")["enabled"] = False
    rs = parse_rules(doc)
    assert "call-spike" not in [r.id for r in rs.rules]
    assert rs.of_kind("call_spike") == ()


# --- errors name file, rule and field -------------------------------------------------


def test_bad_type_names_file_rule_and_field(tmp_path):
    doc = default_rules_doc()
    _rule(doc, "cinema-pay")["trigger"]["min_visits"] = "two"
    path, errs = _errors(tmp_path, doc)
    assert len(errs) == 1
    assert errs[0].startswith(f"{path}: rule 'cinema-pay': trigger.min_visits: ")
    assert "valid integer" in errs[0]


def test_out_of_range_value_is_an_error(tmp_path):
    doc = default_rules_doc()
    _rule(doc, "cinema-pay")["trigger"]["min_visits"] = 0
    _, errs = _errors(tmp_path, doc)
    assert errs[0].startswith(f"{tmp_path / 'rules.yaml'}: rule 'cinema-pay': trigger.min_visits")


def test_unknown_trigger_kind(tmp_path):
    doc = default_rules_doc()
    _rule(doc, "music-pref")["trigger"]["kind"] = "moon_phase"
    path, errs = _errors(tmp_path, doc)
    assert len(errs) == 1
    assert errs[0].startswith(f"{path}: rule 'music-pref': trigger: ")
    assert "moon_phase" in errs[0]
    assert "location_frequency" in errs[0]  # the kinds it knows


@pytest.mark.parametrize(
    ("where", "prefix"),
    [
        ("trigger", "rule 'call-spike': trigger.colour: "),
        ("rule", "rule 'call-spike': colour: "),
        ("push", "rule 'call-spike': push.colour: "),
        ("guards", "guards.colour: "),
        ("top", "colour: "),
    ],
)
def test_unknown_field_is_forbidden(tmp_path, where, prefix):
    doc = default_rules_doc()
    target = {
        "trigger": _rule(doc, "call-spike")["trigger"],
        "rule": _rule(doc, "call-spike"),
        "push": _rule(doc, "call-spike")["push"],
        "guards": doc["guards"],
        "top": doc,
    }[where]
    target["colour"] = "red"
    path, errs = _errors(tmp_path, doc)
    assert errs == [f"{path}: {prefix}Extra inputs are not permitted"]


def test_duplicate_rule_id(tmp_path):
    doc = default_rules_doc()
    _rule(doc, "call-spike")["id"] = "cinema-pay"
    path, errs = _errors(tmp_path, doc)
    assert errs == [f"{path}: rule 'cinema-pay': id: duplicate rule id"]


def test_rule_without_id_is_named_by_position(tmp_path):
    doc = default_rules_doc()
    del doc["rules"][2]["id"]
    path, errs = _errors(tmp_path, doc)
    assert errs == [f"{path}: rule #3: id: Field required"]


@pytest.mark.parametrize(
    ("rid", "once_per", "allowed"),
    [
        ("cinema-pay", "session", "a duration"),
        ("help-sprite", "24h", "visit"),
        ("music-pref", "service", "a duration, session"),
        ("trial-ending", "visit", "a duration, service"),
        ("step-friction", "session", "a duration"),
        ("setup-first", "session", "a duration, session_service"),
    ],
)
def test_once_per_must_fit_the_trigger(tmp_path, rid, once_per, allowed):
    doc = default_rules_doc()
    _rule(doc, rid)["once_per"] = once_per
    path, errs = _errors(tmp_path, doc)
    assert len(errs) == 1
    assert errs[0].startswith(f"{path}: rule '{rid}': once_per: {once_per!r} does not fit")
    assert f"(allowed: {allowed})" in errs[0]


def test_once_per_bad_duration(tmp_path):
    doc = default_rules_doc()
    _rule(doc, "cinema-pay")["once_per"] = "fortnightly"
    path, errs = _errors(tmp_path, doc)
    assert errs[0].startswith(f"{path}: rule 'cinema-pay': ")
    assert "fortnightly" in errs[0]


def test_missing_push_and_alert(tmp_path):
    doc = default_rules_doc()
    del _rule(doc, "cinema-pay")["push"]
    path, errs = _errors(tmp_path, doc)
    assert errs == [f"{path}: rule 'cinema-pay': a rule needs a push, an alert or both"]


def test_push_on_step_friction(tmp_path):
    doc = default_rules_doc()
    _rule(doc, "step-friction")["push"] = {"kind": "help"}
    path, errs = _errors(tmp_path, doc)
    assert len(errs) == 1
    assert errs[0].startswith(f"{path}: rule 'step-friction': push: ")


@pytest.mark.parametrize("rid", ["cinema-pay", "call-spike", "music-pref", "setup-first",
                                 "trial-ending"])
def test_alert_only_from_dwell_and_friction(tmp_path, rid):
    # The engine alerts only for step_dwell and step_friction: an alert elsewhere would
    # be silently dropped (or, alone, stop the flow), so the file is refused.
    doc = default_rules_doc()
    _rule(doc, rid)["alert"] = {"type": "ops.x"}
    path, errs = _errors(tmp_path, doc)
    assert len(errs) == 1
    assert errs[0].startswith(f"{path}: rule '{rid}': alert: trigger ")
    assert "can only push" in errs[0]


def test_when_is_compiled_at_load(tmp_path):
    doc = default_rules_doc()
    doc["timezone"] = "Asia/Shanghai"
    _rule(doc, "music-pref")["when"] = 'profile.segment == "youth" && context.hour >= 9'
    rs = load_rules(_write(tmp_path, doc))
    assert rs.timezone == "Asia/Shanghai"
    cond = next(r for r in rs.rules if r.id == "music-pref").when
    assert cond is not None
    assert (cond.rule_id, cond.timezone, cond.profile_fields, cond.context_fields) == (
        "music-pref", "Asia/Shanghai", ("segment",), ("hour",))
    assert all(r.when is None for r in rs.rules if r.id != "music-pref")


def test_when_error_names_file_rule_and_field(tmp_path):
    doc = default_rules_doc()
    _rule(doc, "cinema-pay")["when"] = "event.module == 'x'"
    _rule(doc, "help-sprite")["when"] = "profile.segment == 1"
    path, errs = _errors(tmp_path, doc)
    assert errs == [
        f"{path}: rule 'cinema-pay': when: unknown field 'module' of event for trigger "
        "location_frequency; event has cell_id, customer_id, event_id, poi, poi_id, ts, "
        "type (at column 7)",
        f"{path}: rule 'help-sprite': when: '==' compares string with int, which is never "
        "equal (at column 17)",
    ]


def test_push_module_required_for_network_triggers(tmp_path):
    doc = default_rules_doc()
    del _rule(doc, "cinema-pay")["push"]["module"]
    path, errs = _errors(tmp_path, doc)
    assert errs == [f"{path}: rule 'cinema-pay': push.module: required for trigger "
                    "location_frequency"]


def test_call_spike_min_history_above_max(tmp_path):
    doc = default_rules_doc()
    _rule(doc, "call-spike")["trigger"].update(min_history=13, max_history=12)
    path, errs = _errors(tmp_path, doc)
    assert errs == [f"{path}: rule 'call-spike': trigger.min_history: must not exceed "
                    "max_history"]


def test_every_problem_is_reported(tmp_path):
    doc = default_rules_doc()
    _rule(doc, "cinema-pay")["trigger"]["window"] = "a week"
    _rule(doc, "help-sprite")["once_per"] = "session"
    doc["guards"]["cap_window"] = "soon"
    path, errs = _errors(tmp_path, doc)
    # file-level errors stop before the rules are looked at
    assert errs == [f"{path}: guards.cap_window: Value error, not a duration: 'soon' "
                    "(use e.g. '90s', '60m', '24h', '7d')"]
    doc["guards"]["cap_window"] = "24h"
    path, errs = _errors(tmp_path, doc)
    assert len(errs) == 2
    assert errs[0].startswith(f"{path}: rule 'cinema-pay': trigger.window: ")
    assert errs[1].startswith(f"{path}: rule 'help-sprite': once_per: ")


def test_missing_version_and_rules(tmp_path):
    path, errs = _errors(tmp_path, {"guards": {}})
    assert f"{path}: version: Field required" in errs
    assert f"{path}: rules: Field required" in errs


def test_invalid_yaml_names_the_line(tmp_path):
    text = "version: 1\nrules:\n  - id: a\n    trigger: {kind: step_dwell\n    push: x\n"
    path, errs = _errors(tmp_path, text)
    assert len(errs) == 1
    assert errs[0].startswith(f"{path}: line ")
    assert "not valid YAML" in errs[0]
    line = int(errs[0].split("line ", 1)[1].split(":", 1)[0])
    assert 4 <= line <= 6


def test_invalid_yaml_tab_indent_line(tmp_path):
    text = "version: 1\nrules:\n\t- id: a\n"
    path, errs = _errors(tmp_path, text)
    assert errs[0].startswith(f"{path}: line 3: not valid YAML")


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just text\n", "", "42\n"],
                         ids=["list", "scalar", "empty", "number"])
def test_file_must_be_a_mapping(tmp_path, text):
    path, errs = _errors(tmp_path, text)
    assert errs == [f"{path}: the file must be a mapping with 'version' and 'rules'"]


def test_yaml_tags_do_not_run(tmp_path):
    text = "version: !!python/object/apply:os.system ['echo hi']\nrules: []\n"
    path, errs = _errors(tmp_path, text)
    assert errs[0].startswith(f"{path}: line 1: not valid YAML")


def test_file_over_one_mib(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("version: 1\nrules: []\n# " + "x" * MAX_RULES_FILE_BYTES + "\n", "utf-8")
    with pytest.raises(RulesError) as ei:
        load_rules(p)
    assert ei.value.errors == [f"{p}: file is larger than {MAX_RULES_FILE_BYTES} bytes"]


def test_file_of_exactly_one_mib_is_read(tmp_path):
    head = "version: 1\nrules: []\n# "
    p = tmp_path / "edge.yaml"
    p.write_text(head + "x" * (MAX_RULES_FILE_BYTES - len(head) - 1) + "\n", "utf-8")
    assert p.stat().st_size == MAX_RULES_FILE_BYTES
    assert load_rules(p).rules == ()


def test_missing_file_and_not_utf8(tmp_path):
    with pytest.raises(RulesError) as ei:
        load_rules(tmp_path / "nope.yaml")
    assert ei.value.errors[0].startswith(f"{tmp_path / 'nope.yaml'}: cannot read")
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"version: 1\nrules: []\n# caf\xe9\n")
    with pytest.raises(RulesError) as ei:
        load_rules(p)
    assert ei.value.errors == [f"{p}: not UTF-8 text"]


def test_rules_error_message_joins_every_error():
    with pytest.raises(RulesError) as ei:
        parse_rules({"version": 0, "rules": "x"}, "mem.yaml")
    assert str(ei.value) == "\n".join(ei.value.errors)
    assert all(e.startswith("mem.yaml: ") for e in ei.value.errors)
    assert len(ei.value.errors) == 2


# --- durations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        ("90s", 90_000),
        ("60m", 3_600_000),
        ("24h", 86_400_000),
        ("7d", 604_800_000),
        ("250ms", 250),
        (90, 90_000),
        (1.5, 1_500),
        ("1.5s", 1_500),
        ("90", 90_000),
        (" 90 s ", 90_000),
        (0, 0),
        ("0ms", 0),
    ],
)
def test_durations(value, ms):
    assert parse_duration_ms(value) == ms


@pytest.mark.parametrize(
    "value",
    ["-5s", "5w", "", "s", "1e3", "ninety", "90 sec", "1h30m", -1, -0.5, True, False, None,
     [90], {"s": 90}],
)
def test_bad_durations(value):
    with pytest.raises(ValueError, match="duration"):
        parse_duration_ms(value)


def test_duration_in_a_rule_names_the_field(tmp_path):
    doc = default_rules_doc()
    _rule(doc, "help-sprite")["trigger"]["dwell"] = "90 sec"
    path, errs = _errors(tmp_path, doc)
    assert errs == [f"{path}: rule 'help-sprite': trigger.dwell: Value error, not a duration: "
                    "'90 sec' (use e.g. '90s', '60m', '24h', '7d')"]


def test_numeric_duration_in_a_rule_is_seconds(tmp_path):
    doc = default_rules_doc()
    _rule(doc, "help-sprite")["trigger"]["dwell"] = 45
    _rule(doc, "cinema-pay")["trigger"]["window"] = "250ms"
    rs = load_rules(_write(tmp_path, doc))
    by_id = {r.id: r for r in rs.rules}
    assert by_id["help-sprite"].trigger.dwell == 45_000
    assert by_id["cinema-pay"].trigger.window == 250


@pytest.mark.parametrize(
    "dwell",
    [".inf", "1.0e+400", "1" + "0" * 400 + "s",
     "99999999999999999999d", "3661d"],
    ids=["yaml_inf", "yaml_float_inf", "huge_string", "huge_days", "over_ten_years"],
)
def test_infinite_duration_is_a_rules_error(tmp_path, dwell):
    text = ("version: 1\nrules:\n  - id: stuck\n"
            f"    trigger: {{kind: step_dwell, dwell: {dwell}}}\n"
            "    alert: {type: a.b}\n")
    path, errs = _errors(tmp_path, text)
    assert errs[0].startswith(f"{path}: rule 'stuck': trigger.dwell: ")


def test_nan_duration_is_a_rules_error(tmp_path):
    text = ("version: 1\nrules:\n  - id: stuck\n"
            "    trigger: {kind: step_dwell, dwell: .nan}\n    alert: {type: a.b}\n")
    path, errs = _errors(tmp_path, text)
    assert errs[0].startswith(f"{path}: rule 'stuck': trigger.dwell: ")


# --- touchstream rules validate ----------------------------------------------------------


def test_cli_validate_ok(capsys):
    assert cli_main(["rules", "validate", str(DEFAULT_RULES_PATH)]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""
    assert "OK, version 1, 7 rules" in cap.out
    assert "cinema-pay(location_frequency)" in cap.out
    assert "step-friction(step_friction)" in cap.out


def test_cli_validate_errors_on_stderr(tmp_path, capsys):
    doc = default_rules_doc()
    _rule(doc, "cinema-pay")["trigger"]["min_visits"] = "two"
    _rule(doc, "music-pref")["trigger"]["kind"] = "moon_phase"
    p = _write(tmp_path, doc)
    assert cli_main(["rules", "validate", str(p)]) == 1
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.splitlines()
    assert lines[0].startswith(f"{p}: rule 'cinema-pay': trigger.min_visits: ")
    assert lines[1].startswith(f"{p}: rule 'music-pref': trigger: ")


def test_cli_validate_reports_a_bad_condition(tmp_path, capsys):
    doc = default_rules_doc()
    _rule(doc, "music-pref")["when"] = "profile.prefs.music.exists(g, g == 1)"
    p = _write(tmp_path, doc)
    assert cli_main(["rules", "validate", str(p)]) == 1
    cap = capsys.readouterr()
    assert cap.err == (f"{p}: rule 'music-pref': when: '==' compares string with int, "
                       "which is never equal (at column 33)\n")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("version: 1\nrules: [\n", ": line "),
        ("- a\n", "must be a mapping"),
        (None, "cannot read"),
    ],
    ids=["bad_yaml", "not_a_mapping", "missing"],
)
def test_cli_validate_file_errors(tmp_path, capsys, text, needle):
    p = tmp_path / "r.yaml"
    if text is not None:
        p.write_text(text, "utf-8")
    assert cli_main(["rules", "validate", str(p)]) == 1
    cap = capsys.readouterr()
    assert cap.err.startswith(f"{p}: ")
    assert needle in cap.err
