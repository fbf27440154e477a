"""Backtests: rule sets over a recorded demo stream, compared with a plain replay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from connectors.demo import DemoSource, demo_profiles
from flows.backtest import _HallIndex, read_holdouts, render_table, run_backtest
from flows.cli import main as cli_main
from flows.codec import json_dumps
from flows.model import ClickEvent
from flows.rules import parse_rules
from flows.runner import replay
from flows.settings import load_settings
from tests.flows.helpers import DEFAULT_RULES_PATH, default_rules_doc

T0 = 1_700_000_000_000
ROUNDS = 2
ROUND_S = 180.0
# The demo sends some network records hours late on purpose: accept them in replay.
ENGINE = {"allowed_lateness_s": 6 * 3600.0}


def settings(**kw: Any) -> Any:
    return load_settings(engine=ENGINE, **kw)


def record_demo(d: Path, rounds: int = ROUNDS) -> tuple[Path, Path]:
    """Record the built-in demo stream (scripted rounds, noise, malformed lines) to
    JSONL on a stepped clock, with the profiles its rounds load."""
    clock = [T0]
    profiles: list[dict[str, Any]] = []

    def on_round(rnd: int, start: int) -> None:
        profiles.extend(p.to_dict() for p in demo_profiles(rnd, start))

    src = DemoSource(seed=7, rate=2.0, round_s=ROUND_S, duration_s=rounds * ROUND_S,
                     now_ms=lambda: clock[0], on_round=on_round)
    part = src.build_part("rec", "demo", None)
    events = d / "events.jsonl"
    with events.open("wb") as fh:
        while True:
            try:
                batch = part.next_batch()
            except StopIteration:
                break
            for rec in batch:
                fh.write(rec.value.replace(b"\n", b" ") + b"\n")
            clock[0] += 250
    prof = d / "profiles.jsonl"
    prof.write_bytes(b"".join(json_dumps(p) + b"\n" for p in profiles))
    return events, prof


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return record_demo(tmp_path_factory.mktemp("demo"))


def lines(p: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in p.read_bytes().splitlines() if x.strip()]


def changed_rules(path: Path) -> Path:
    """Defaults with music-pref off and opt-outs not respected."""
    doc = default_rules_doc()
    doc["guards"]["respect_opt_out"] = False
    for r in doc["rules"]:
        if r["id"] == "music-pref":
            r["enabled"] = False
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_backtest_of_default_rules_gives_the_pushes_of_a_replay(
        recorded: tuple[Path, Path], tmp_path: Path) -> None:
    events, prof = recorded
    cfg = settings(mode="replay", profiles_file=prof, out_dir=tmp_path / "replay")
    replay(cfg, events)
    report = run_backtest(events, DEFAULT_RULES_PATH, None, prof, settings(),
                          tmp_path / "bt")
    want = (tmp_path / "replay" / "pushes.jsonl").read_bytes()
    got = (tmp_path / "bt" / "new" / "pushes.jsonl").read_bytes()
    assert want and got == want  # same push ids and bodies, same order
    pushes = lines(tmp_path / "replay" / "pushes.jsonl")
    assert report.new.pushes == len(pushes)
    for rid, run in report.new.rules.items():
        mine = [p for p in pushes if p["rule_id"] == rid]
        assert run.pushes == len(mine)
        assert run.customers == len({p["customer_id"] for p in mine})
    stats = json.loads((tmp_path / "replay" / "stats.json").read_text())
    assert report.new.rules["cinema-pay"].blocked == stats["rules"]["cinema-pay"]["blocked"]
    # every round's music lover orders the music module 22 s after the push
    assert report.new.rules["music-pref"].orders == ROUNDS
    assert report.baseline is None and not report.diff
    doc = json.loads((tmp_path / "bt" / "backtest.json").read_text())
    assert doc["new"]["pushes"] == len(pushes)
    assert doc["new"]["rules"]["cinema-pay"]["quota_exhausted_ms"] == "n/a"


def test_backtest_of_a_changed_rule_set_shows_the_difference(
        recorded: tuple[Path, Path], tmp_path: Path) -> None:
    events, prof = recorded
    new = changed_rules(tmp_path / "new.yaml")
    report = run_backtest(events, new, DEFAULT_RULES_PATH, prof, settings(),
                          tmp_path / "bt", window_ms=3_600_000)
    assert report.baseline is not None
    base, cur = report.baseline.rules, report.new.rules
    # music-pref is off: its pushes and their orders are gone
    assert base["music-pref"].pushes >= ROUNDS and base["music-pref"].orders == ROUNDS
    assert "music-pref" not in cur or cur["music-pref"].pushes == 0
    assert report.diff["music-pref"]["pushes"] == -base["music-pref"].pushes
    assert report.diff["music-pref"]["orders"] == -ROUNDS
    # opt-outs no longer respected: the blocked cinema-goers are pushed instead
    opted_out = base["cinema-pay"].blocked["opt_out"]
    assert opted_out == ROUNDS
    assert cur["cinema-pay"].blocked.get("opt_out", 0) == 0
    assert report.diff["cinema-pay"]["pushes"] == opted_out
    assert report.diff["cinema-pay"]["blocked:opt_out"] == -opted_out
    # untouched rules, no cap reached: unchanged
    assert report.diff["call-spike"]["pushes"] == 0
    out = tmp_path / "bt"
    doc = json.loads((out / "backtest.json").read_text())
    assert doc["diff"]["music-pref"]["pushes"] == -base["music-pref"].pushes
    assert doc["baseline"]["rules_source"] == str(DEFAULT_RULES_PATH)
    page = (out / "backtest.html").read_text()
    assert "<svg" in page and "music-pref" in page and "http" not in page.split("<svg")[0]
    assert (out / "backtest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = render_table(report)
    assert "Δ pushes" in table and f"-{base['music-pref'].pushes}" in table


def test_backtest_takes_a_rule_set_in_memory(recorded: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    events, prof = recorded
    rs = parse_rules(yaml.safe_load(DEFAULT_RULES_PATH.read_text()), "mem")
    a = run_backtest(events, rs, None, prof, settings(), tmp_path / "a")
    b = run_backtest(events, DEFAULT_RULES_PATH, None, prof, settings(), tmp_path / "b")
    assert ((tmp_path / "a" / "new" / "pushes.jsonl").read_bytes()
            == (tmp_path / "b" / "new" / "pushes.jsonl").read_bytes())
    assert a.new.rules == b.new.rules


def test_cli_backtest(recorded: tuple[Path, Path], tmp_path: Path,
                      capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    events, prof = recorded
    monkeypatch.setenv("TOUCHSTREAM_ENGINE__ALLOWED_LATENESS_S", str(6 * 3600))
    new = changed_rules(tmp_path / "new.yaml")
    rc = cli_main(["backtest", str(events), "--rules", str(new), "--baseline",
                   str(DEFAULT_RULES_PATH), "--profiles", str(prof), "--out",
                   str(tmp_path / "o"), "--window", "2h"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "music-pref" in printed and "TOTAL" in printed
    doc = json.loads((tmp_path / "o" / "backtest.json").read_text())
    assert doc["attribution_window_s"] == 7200
    assert cli_main(["backtest", str(events), "--rules", str(new), "--out",
                     str(tmp_path / "p"), "--window", "soon"]) == 2


def test_control_group_records_of_a_run_give_the_uplift(tmp_path: Path) -> None:
    # One customer pushed by music-pref orders; of two held back, one orders too.
    d = tmp_path / "in"
    d.mkdir()
    rows = [
        {"type": "click", "customer_id": "13800000003", "ts": T0, "terminal_id": "H01-T03",
         "hall_id": "H01", "action": "module_enter", "module": "music"},
        {"type": "click", "customer_id": "13800000003", "ts": T0 + 20_000,
         "terminal_id": "H01-T03", "hall_id": "H01", "action": "order", "module": "music"},
        {"type": "click", "customer_id": "h1", "ts": T0 + 30_000, "terminal_id": "H01-T04",
         "hall_id": "H01", "action": "order", "module": "music"},
    ]
    events = d / "events.jsonl"
    events.write_bytes(b"".join(json_dumps(r) + b"\n" for r in rows))
    prof = d / "profiles.jsonl"
    prof.write_bytes(json_dumps({"customer_id": "13800000003", "prefs": {"music": ["jazz"]}})
                     + b"\n")
    hold = tmp_path / "holdouts.jsonl"
    hold.write_bytes(b"".join(
        json_dumps({"rule_id": "music-pref", "customer_id": c, "ts": T0, "hall": "H01",
                    "module": "music"}) + b"\n" for c in ("h1", "h2")))
    report = run_backtest(events, DEFAULT_RULES_PATH, None, prof, settings(), tmp_path / "bt",
                          holdouts=read_holdouts(hold))
    g = report.new.attribution.to_dict()["rule"]["music-pref"]
    assert (g["pushes"], g["orders"], g["control"], g["control_orders"]) == (1, 1, 2, 1)
    assert g["uplift"] == 0.5
    assert report.new.attribution.to_dict()["hall"]["H01"]["pushes"] == 1


def test_control_group_of_a_rule_is_held_out_by_the_flow_and_measured(
        recorded: tuple[Path, Path], tmp_path: Path) -> None:
    """A rule with a control group: the replay itself writes the held-out customers
    (``holdouts.jsonl``), never pushes to them, and the backtest puts their order rate
    beside the pushed customers' (uplift)."""
    events, prof = recorded
    doc = default_rules_doc()
    for r in doc["rules"]:
        if r["id"] == "cinema-pay":
            r["control_group"] = 0.5
    rules = tmp_path / "holdout.yaml"
    rules.write_text(yaml.safe_dump(doc), encoding="utf-8")
    report = run_backtest(events, rules, DEFAULT_RULES_PATH, prof, settings(), tmp_path / "bt")
    held = lines(tmp_path / "bt" / "new" / "holdouts.jsonl")
    pushed = {p["customer_id"] for p in lines(tmp_path / "bt" / "new" / "pushes.jsonl")
              if p["rule_id"] == "cinema-pay"}
    base = {p["customer_id"] for p in lines(tmp_path / "bt" / "baseline" / "pushes.jsonl")
            if p["rule_id"] == "cinema-pay"}
    assert held and all(h["rule_id"] == "cinema-pay" for h in held)
    held_ids = {h["customer_id"] for h in held}
    assert not held_ids & pushed  # a held-out customer gets no push
    assert held_ids | pushed == base  # everyone the baseline pushed is pushed or held out
    g = report.new.attribution.to_dict()["rule"]["cinema-pay"]
    assert g["control"] == len(held)
    # the baseline has no control group: nothing is held out there
    assert lines(tmp_path / "bt" / "baseline" / "holdouts.jsonl") == []


def test_a_push_is_credited_to_a_hall_clicked_within_the_session_idle_time() -> None:
    # As the engine ends a session: a gap of exactly the idle time still belongs to it.
    clicks = [ClickEvent("c1", T0, None, "H01-T01", "H01", "module_enter", "music", None)]
    half_hour, hour = _HallIndex(clicks, 30 * 60_000), _HallIndex(clicks, 60 * 60_000)
    assert half_hour.hall_at("c1", T0 + 30 * 60_000) == "H01"
    assert half_hour.hall_at("c1", T0 + 40 * 60_000) == "-"
    assert hour.hall_at("c1", T0 + 40 * 60_000) == "H01"
    assert hour.hall_at("c2", T0) == "-" and hour.hall_at("c1", T0 - 1) == "-"
