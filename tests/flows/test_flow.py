"""The whole dataflow under Bytewax: replay determinism, lateness, bad input, stats."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from connectors.demo import demo_profiles, demo_script
from flows.cli import main as cli_main
from flows.runner import replay
from flows.settings import load_settings

T0 = 1_700_000_000_000


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with path.open("wb") as fh:
        for r in rows:
            fh.write(r if isinstance(r, bytes) else json.dumps(r).encode())
            fh.write(b"\n")
    return path


def demo_events(rounds: int = 2) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The demo's scripted rounds in event time, plus some background noise."""
    rows: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    for rnd in range(rounds):
        start = T0 + rnd * 600_000
        rows += [ev for _, ev in demo_script(rnd, start)]
        profiles += [p.to_dict() for p in demo_profiles(rnd, start)]
    rng = random.Random(3)
    for i in range(400):
        cid = f"139{rng.randrange(50):08d}"
        ts = T0 + i * 2_000
        if i % 2:
            rows.append({"type": "location", "customer_id": cid, "ts": ts, "cell_id": "c",
                         "poi": rng.choice(["mall", "cinema", None])})
        else:
            rows.append({"type": "calls", "customer_id": cid, "ts": ts, "interval_s": 300,
                         "calls_in": rng.randrange(5), "calls_out": rng.randrange(3),
                         "missed": 0})
    rows.sort(key=lambda r: r["ts"])
    return rows, profiles


def run_replay(tmp: Path, name: str, rows: list[Any], profiles: list[dict[str, Any]],
               workers: int = 1, **engine: Any) -> dict[str, bytes]:
    d = tmp / name
    d.mkdir()
    events = write_jsonl(d / "events.jsonl", rows)
    prof = write_jsonl(d / "profiles.jsonl", profiles)
    settings = load_settings(mode="replay", out_dir=d / "out", profiles_file=prof,
                             engine={"workers": workers, **engine})
    replay(settings, events)
    return {f: (d / "out" / f).read_bytes() if (d / "out" / f).exists() else b""
            for f in ("pushes.jsonl", "alerts.jsonl", "dead_letters.jsonl", "stats.json")}


def lines(b: bytes) -> list[dict[str, Any]]:
    return [json.loads(x) for x in b.splitlines() if x.strip()]


def test_demo_script_acts_out_every_default_rule(tmp_path: Path) -> None:
    rows, profiles = demo_events(rounds=1)
    out = run_replay(tmp_path, "demo", rows, profiles)
    rules = {p["rule_id"] for p in lines(out["pushes.jsonl"])}
    assert rules >= {"cinema-pay", "call-spike", "music-pref", "setup-first", "help-sprite",
                     "trial-ending"}
    types = {a["type"] for a in lines(out["alerts.jsonl"])}
    assert types == {"touchstream.dwell.customer", "touchstream.dwell.step"}
    stats = json.loads(out["stats.json"])
    assert stats["rules"]["music-pref"]["conversions"] == 1
    assert stats["rules"]["cinema-pay"]["blocked"]["opt_out"] == 1


def test_replay_is_byte_identical_across_runs_and_worker_counts(tmp_path: Path) -> None:
    rows, profiles = demo_events(rounds=3)
    a = run_replay(tmp_path, "a", rows, profiles, workers=1)
    b = run_replay(tmp_path, "b", rows, profiles, workers=1)
    c = run_replay(tmp_path, "c", rows, profiles, workers=2)
    assert a == b == c
    assert len(lines(a["pushes.jsonl"])) >= 18
    assert len(lines(a["alerts.jsonl"])) >= 3


def test_shuffled_input_within_lateness_gives_the_same_output(tmp_path: Path) -> None:
    rows, profiles = demo_events(rounds=2)
    rng = random.Random(11)
    # Shuffle in blocks whose event times span < 5 minutes: every event stays in time.
    shuffled: list[dict[str, Any]] = []
    block: list[dict[str, Any]] = []
    for r in rows:
        if block and r["ts"] - block[0]["ts"] > 240_000:
            rng.shuffle(block)
            shuffled += block
            block = []
        block.append(r)
    rng.shuffle(block)
    shuffled += block
    assert shuffled != rows
    a = run_replay(tmp_path, "sorted", rows, profiles)
    b = run_replay(tmp_path, "shuffled", shuffled, profiles, workers=2)
    for name in ("pushes.jsonl", "alerts.jsonl", "stats.json"):
        assert a[name] == b[name], name


def test_events_later_than_five_minutes_are_dead_letters(tmp_path: Path) -> None:
    rows = [
        {"type": "location", "customer_id": "c1", "ts": T0 + 600_000, "cell_id": "x"},
        {"type": "location", "customer_id": "c2", "ts": T0 + 300_000, "cell_id": "x"},  # 300 s
        {"type": "location", "customer_id": "c3", "ts": T0 + 299_999, "cell_id": "x"},  # late
    ]
    out = run_replay(tmp_path, "late", rows, [])
    dl = lines(out["dead_letters.jsonl"])
    assert [(d["reason"], d["pos"]) for d in dl] == [("late", 3)]
    assert json.loads(dl[0]["raw"])["customer_id"] == "c3"
    assert json.loads(out["stats.json"])["events"] == {"location": 2}


BAD_LINES: list[tuple[bytes, str]] = [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe\x00garbage", "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'{"type": "teleport", "customer_id": "c", "ts": 1700000000000}', "unknown_type"),
    (b'{"customer_id": "c", "ts": 1700000000000}', "missing_field"),
    (b'{"type": "location", "ts": 1700000000000, "cell_id": "x"}', "missing_field"),
    (b'{"type": "location", "customer_id": 42, "ts": 1700000000000, "cell_id": "x"}',
     "wrong_type"),
    (b'{"type": "location", "customer_id": "", "ts": 1700000000000, "cell_id": "x"}',
     "invalid_value"),
    (b'{"type": "location", "customer_id": "' + b"x" * 65 + b'", "ts": 1700000000000,'
     b' "cell_id": "x"}', "too_large"),
    (b'{"type": "location", "customer_id": "c", "ts": "yesterday", "cell_id": "x"}',
     "wrong_type"),
    (b'{"type": "location", "customer_id": "c", "ts": 1.7e12, "cell_id": "x"}', "wrong_type"),
    (b'{"type": "location", "customer_id": "c", "ts": 17, "cell_id": "x"}', "ts_out_of_range"),
    (b'{"type": "location", "customer_id": "c", "ts": 99999999999999, "cell_id": "x"}',
     "ts_out_of_range"),
    (b'{"type": "click", "customer_id": "c", "ts": 1700000000000, "terminal_id": "t",'
     b' "hall_id": "h", "action": "dance", "module": "m"}', "invalid_value"),
    (b'{"type": "click", "customer_id": "c", "ts": 1700000000000, "terminal_id": "t",'
     b' "hall_id": "h", "action": "step_enter", "module": "m"}', "missing_field"),
    (b'{"type": "click", "customer_id": "c", "ts": 1700000000000, "terminal_id": "t",'
     b' "hall_id": "h", "action": "help", "module": "m", "attrs": [1]}', "wrong_type"),
    (b'{"type": "calls", "customer_id": "c", "ts": 1700000000000, "interval_s": 300,'
     b' "calls_in": -1, "calls_out": 0, "missed": 0}', "invalid_value"),
    (b'{"type": "calls", "customer_id": "c", "ts": 1700000000000, "interval_s": 0,'
     b' "calls_in": 1, "calls_out": 0, "missed": 0}', "invalid_value"),
    (b'{"type": "calls", "customer_id": "c", "ts": 1700000000000, "interval_s": 300,'
     b' "calls_in": true, "calls_out": 0, "missed": 0}', "wrong_type"),
    (b'{"type": "location", "customer_id": "c", "ts": 1700000000000, "cell_id": "x",'
     b' "poi": NaN}', "invalid_json"),
    (b"[" * 10_000 + b"]" * 10_000, "invalid_json"),
    (b'{"type": "location", "customer_id": "c", "ts": 1700000000000, "cell_id": "'
     + b"y" * 70_000 + b'"}', "too_large"),
]


def test_every_kind_of_bad_input_is_a_dead_letter_and_changes_nothing_else(
    tmp_path: Path,
) -> None:
    rows, profiles = demo_events(rounds=1)
    clean = run_replay(tmp_path, "clean", rows, profiles)
    mixed: list[Any] = []
    for i, r in enumerate(rows):
        mixed.append(r)
        if i % 7 == 0 and i // 7 < len(BAD_LINES):
            mixed.append(BAD_LINES[i // 7][0])
    assert sum(isinstance(x, bytes) for x in mixed) == len(BAD_LINES)
    dirty = run_replay(tmp_path, "dirty", mixed, profiles, workers=2)
    assert dirty["pushes.jsonl"] == clean["pushes.jsonl"]
    assert dirty["alerts.jsonl"] == clean["alerts.jsonl"]
    dl = lines(dirty["dead_letters.jsonl"])
    assert [d["reason"] for d in dl] == [reason for _, reason in BAD_LINES]
    for d, (raw, _) in zip(dl, BAD_LINES, strict=True):
        assert d["source"] == "events.jsonl"
        assert d["detail"]
        if d["raw_encoding"] == "utf-8":
            assert d["raw"].encode() == raw
    stats = json.loads(dirty["stats.json"])
    assert stats["dead_letters_total"] == len(BAD_LINES)


@pytest.mark.parametrize(("last_offset", "fires"), [(90_000, True), (89_999, False)])
def test_timers_due_by_the_last_event_time_fire_at_end_of_input(
    tmp_path: Path, last_offset: int, fires: bool
) -> None:
    rows = [
        {"type": "click", "customer_id": "c1", "ts": T0, "terminal_id": "T1", "hall_id": "H",
         "action": "step_enter", "module": "remote_cam", "step": "door"},
        {"type": "location", "customer_id": "other", "ts": T0 + last_offset, "cell_id": "x"},
    ]
    out = run_replay(tmp_path, f"eof{last_offset}", rows, [])
    pushes = lines(out["pushes.jsonl"])
    assert [p["rule_id"] for p in pushes] == (["help-sprite"] if fires else [])
    if fires:
        assert pushes[0]["event_ts"] == T0 + 90_000
        alert = lines(out["alerts.jsonl"])[0]
        assert alert["time"] == "2023-11-14T22:14:50.000Z"


def test_help_sprite_fires_in_event_time_mid_stream_for_a_silent_customer(
    tmp_path: Path,
) -> None:
    # c1 goes silent; other customers' traffic moves the watermark past the deadline.
    rows: list[dict[str, Any]] = [
        {"type": "click", "customer_id": "c1", "ts": T0, "terminal_id": "T1", "hall_id": "H",
         "action": "step_enter", "module": "remote_cam", "step": "door"},
    ]
    rows += [{"type": "location", "customer_id": f"n{i}", "ts": T0 + i * 10_000,
              "cell_id": "x"} for i in range(1, 100)]
    out = run_replay(tmp_path, "silent", rows, [], workers=2, tick_interval_s=5)
    pushes = lines(out["pushes.jsonl"])
    assert [(p["rule_id"], p["event_ts"], p["channel"]) for p in pushes] == [
        ("help-sprite", T0 + 90_000, "terminal:T1")
    ]


@pytest.mark.parametrize(("sweep_interval_s", "evicted"), [(60.0, 1), (600.0, 0)])
def test_sweep_interval_setting_decides_when_an_idle_customer_goes(
    tmp_path: Path, sweep_interval_s: float, evicted: int
) -> None:
    # c1 is idle for more than the hour-long TTL when c2 arrives 62 min later; a sweep
    # every minute has run since (one at 61 min), one every 10 min has not (60 min: idle
    # exactly the TTL, kept; the next is due at 70 min).
    rows = [{"type": "location", "customer_id": cid, "ts": ts, "cell_id": "x"}
            for cid, ts in (("c1", T0), ("c2", T0 + 62 * 60_000))]
    out = run_replay(tmp_path, "sweep", rows, [], workers=2, idle_ttl_s=3600.0,
                     sweep_interval_s=sweep_interval_s)
    stats = json.loads(out["stats.json"])
    assert stats["engine"].get("evicted", 0) == evicted


def test_cli_replay_writes_the_four_files(tmp_path: Path) -> None:
    rows, profiles = demo_events(rounds=1)
    events = write_jsonl(tmp_path / "e.jsonl", rows)
    prof = write_jsonl(tmp_path / "p.jsonl", profiles)
    code = cli_main(["replay", str(events), "--profiles", str(prof), "--out",
                     str(tmp_path / "o"), "--workers", "2"])
    assert code == 0
    for f in ("pushes.jsonl", "alerts.jsonl", "dead_letters.jsonl", "stats.json"):
        assert (tmp_path / "o" / f).exists(), f
    push = lines((tmp_path / "o" / "pushes.jsonl").read_bytes())[0]
    assert set(push) == {"push_id", "customer_id", "channel", "rule_id", "rule_version",
                         "content", "event_ts", "reason"}
    alert = lines((tmp_path / "o" / "alerts.jsonl").read_bytes())[0]
    assert alert["specversion"] == "1.0"
    assert set(alert) >= {"id", "source", "type", "time", "subject", "data"}


def test_stats_keep_at_most_stats_max_names_of_each_kind(tmp_path: Path) -> None:
    rows, profiles = demo_events(rounds=2)
    whole = json.loads(run_replay(tmp_path, "all", rows, profiles)["stats.json"])
    assert len(whole["modules"]) > 2 and "stats_names_folded" not in whole["engine"]
    stats = json.loads(run_replay(tmp_path, "two", rows, profiles,
                                  stats_max_names=2)["stats.json"])
    for kind in ("halls", "modules"):
        assert len(stats[kind]) <= 3 and "(other)" in stats[kind], kind
    assert stats["engine"]["stats_names_folded"] > 0
    tries = sum(h.get("tries", 0) for h in stats["modules"].values())
    assert tries == sum(h.get("tries", 0) for h in whole["modules"].values())  # none lost


@pytest.mark.parametrize(("session_idle_s", "unmatched"), [(1800.0, 1), (3600.0, 0)])
def test_session_idle_setting_decides_whether_a_long_step_still_belongs_to_its_session(
    tmp_path: Path, session_idle_s: float, unmatched: int
) -> None:
    # A step left 40 min after it was entered: past the default 30 min idle the session
    # has lapsed and the exit matches nothing; with an hour it is a finished visit.
    click = {"type": "click", "customer_id": "c1", "terminal_id": "T1", "hall_id": "H",
             "module": "remote_cam", "step": "door"}
    rows = [{**click, "ts": T0, "action": "step_enter"},
            {**click, "ts": T0 + 40 * 60_000, "action": "step_exit"}]
    out = run_replay(tmp_path, "idle", rows, [], session_idle_s=session_idle_s)
    stats = json.loads(out["stats.json"])
    assert stats["clicks"].get("unmatched_step_exit", 0) == unmatched


@pytest.mark.parametrize(("conversion_window_s", "conversions"), [(1800.0, 0), (3600.0, 1)])
def test_conversion_window_setting_decides_whether_a_late_order_converts(
    tmp_path: Path, conversion_window_s: float, conversions: int
) -> None:
    # help-sprite pushes remote_cam at T0 + 90 s; the customer orders it 40 min later.
    click = {"type": "click", "customer_id": "c1", "terminal_id": "T1", "hall_id": "H",
             "module": "remote_cam"}
    rows = [{**click, "ts": T0, "action": "step_enter", "step": "door"},
            {**click, "ts": T0 + 90_000 + 40 * 60_000, "action": "order"}]
    out = run_replay(tmp_path, "conv", rows, [], workers=2,
                     conversion_window_s=conversion_window_s)
    stats = json.loads(out["stats.json"])
    assert stats["rules"]["help-sprite"]["pushes"] == 1
    assert stats["rules"]["help-sprite"].get("conversions", 0) == conversions
    assert stats["conversion_window_s"] == conversion_window_s
