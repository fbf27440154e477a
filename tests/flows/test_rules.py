"""Every default rule at, just below and just above its thresholds (no Bytewax)."""

from __future__ import annotations

import pytest

from flows.engine import EngineConfig
from flows.rules import parse_rules
from tests.flows.helpers import (
    MIN,
    T0,
    D,
    H,
    Harness,
    S,
    calls,
    click,
    default_rules_doc,
    location,
    profile,
    rules_with,
)

C = "13900000001"


# --- cinema-pay: location_frequency poi=cinema, 2 visits in 7 d, visit gap 60 min ---------


def test_cinema_two_visits_exactly_one_gap_apart_fire():
    h = Harness()
    h.feed(location(C, T0))
    assert h.pushes == []
    h.feed(location(C, T0 + 60 * MIN))
    [p] = h.pushes
    assert p.rule_id == "cinema-pay"
    assert p.customer_id == C
    assert p.channel == f"customer:{C}"
    assert p.content == {"module": "mobile_pay", "kind": "offer"}
    assert p.event_ts == T0 + 60 * MIN
    assert p.reason["poi"] == "cinema"
    assert p.reason["visits"] == 2
    assert p.reason["min_visits"] == 2
    assert h.count("rule", "cinema-pay", "pushes") == 1


def test_cinema_gap_just_below_visit_gap_is_one_visit():
    h = Harness()
    h.feed(location(C, T0), location(C, T0 + 60 * MIN - 1))
    assert h.pushes == []


def test_cinema_events_within_a_visit_chain_into_one_visit():
    # gaps of 40 min each: one long visit although first and last are 80 min apart
    h = Harness()
    h.feed(location(C, T0), location(C, T0 + 40 * MIN), location(C, T0 + 80 * MIN))
    assert h.pushes == []
    h.feed(location(C, T0 + 140 * MIN))  # 60 min after the last event: second visit
    assert len(h.pushes) == 1


def test_cinema_first_visit_exactly_at_window_start_counts():
    h = Harness()
    h.feed(location(C, T0), location(C, T0 + 7 * D))
    assert len(h.pushes) == 1


def test_cinema_first_visit_just_outside_window_does_not_count():
    h = Harness()
    h.feed(location(C, T0), location(C, T0 + 7 * D + 1))
    assert h.pushes == []


def test_cinema_three_visits_needed_when_min_visits_is_three():
    h = Harness(rules=rules_with(**{"cinema-pay": {"min_visits": 3}}))
    h.feed(location(C, T0), location(C, T0 + 2 * H))
    assert h.pushes == []
    h.feed(location(C, T0 + 4 * H))
    assert len(h.pushes) == 1
    assert h.pushes[0].reason["visits"] == 3


@pytest.mark.parametrize("poi", ["mall", "stadium", None])
def test_cinema_other_places_do_nothing(poi):
    h = Harness()
    h.feed(location(C, T0, poi=poi), location(C, T0 + 2 * H, poi=poi),
           location(C, T0 + 4 * H, poi=poi))
    assert h.pushes == []
    assert h.count("events", "location") == 3


def test_cinema_other_places_do_not_count_as_cinema_visits():
    h = Harness()
    h.feed(location(C, T0, poi="mall"), location(C, T0 + 2 * H))
    assert h.pushes == []


def test_cinema_visits_are_per_customer():
    h = Harness()
    h.feed(location(C, T0), location("13900000002", T0 + 2 * H))
    assert h.pushes == []


def test_cinema_once_per_24h():
    h = Harness()
    h.feed(location(C, T0), location(C, T0 + 2 * H))
    assert len(h.pushes) == 1
    h.feed(location(C, T0 + 2 * H + 24 * H - 1))  # a third visit, 23h59m59.999s later
    assert len(h.pushes) == 1
    assert h.count("rule", "cinema-pay", "blocked:once_per") == 1
    h.feed(location(C, T0 + 2 * H + 24 * H))  # exactly 24 h after the push
    assert len(h.pushes) == 2


def test_cinema_once_per_24h_third_visit_23h59m_later():
    h = Harness()
    h.feed(location(C, T0), location(C, T0 + 2 * H))
    h.feed(location(C, T0 + 2 * H + 23 * H + 59 * MIN))
    assert len(h.pushes) == 1
    assert h.count("rule", "cinema-pay", "blocked:once_per") == 1


def test_cinema_channel_is_the_terminal_during_an_open_session():
    h = Harness()
    h.feed(click(C, T0, "session_start", terminal="T7", hall="H3"))
    h.feed(location(C, T0 + 1 * MIN), location(C, T0 + 29 * MIN + 61 * MIN))
    # the session's last click was 90 min earlier: closed, so the customer channel
    assert [p.channel for p in h.pushes] == [f"customer:{C}"]

    h2 = Harness()
    h2.feed(location(C, T0 - 2 * H))
    h2.feed(click(C, T0, "session_start", terminal="T7", hall="H3"))
    h2.feed(location(C, T0 + 30 * MIN))  # exactly 30 min after the last click: still open
    [p] = h2.pushes
    assert p.channel == "terminal:T7"
    assert h2.count("hall", "H3", "pushes") == 1


def test_cinema_channel_after_session_end_or_idle_is_the_customer():
    h = Harness()
    h.feed(location(C, T0 - 2 * H))
    h.feed(click(C, T0, "session_start"), click(C, T0 + MIN, "session_end"))
    h.feed(location(C, T0 + 2 * MIN))
    assert [p.channel for p in h.pushes] == [f"customer:{C}"]

    h2 = Harness()
    h2.feed(location(C, T0 - 2 * H))
    h2.feed(click(C, T0, "session_start"))
    h2.feed(location(C, T0 + 30 * MIN + 1))  # 30 min + 1 ms after the last click
    assert [p.channel for p in h2.pushes] == [f"customer:{C}"]


def test_cinema_channel_follows_the_last_click_not_the_session_start():
    h = Harness()
    h.feed(location(C, T0 - 2 * H))
    h.feed(click(C, T0, "session_start", terminal="T2"),
           click(C, T0 + 25 * MIN, "module_enter", module="news", terminal="T2"))
    h.feed(location(C, T0 + 50 * MIN))  # 50 min after start, 25 after the last click
    assert [p.channel for p in h.pushes] == ["terminal:T2"]


# --- call-spike: min_total 10, factor 3.0, min_history 3, max_history 12 ---------------


def _history(cid, totals, start=T0, step=15 * MIN):
    return [calls(cid, start + i * step, t, 0) for i, t in enumerate(totals)]


def test_call_spike_fires_at_three_times_the_mean():
    h = Harness()
    h.feed(*_history(C, [3, 3, 3]))
    h.feed(calls(C, T0 + 3 * 15 * MIN, 6, 4, missed=2))
    [p] = h.pushes
    assert p.rule_id == "call-spike"
    assert p.content == {"module": "call_reminder", "kind": "offer", "missed": 2}
    assert p.reason["total"] == 10
    assert p.reason["baseline_mean"] == 3.0
    assert p.reason["intervals"] == 3
    assert p.channel == f"customer:{C}"


def test_call_spike_just_below_factor_does_not_fire():
    h = Harness()
    h.feed(*_history(C, [4, 4, 4]))
    h.feed(calls(C, T0 + 3 * 15 * MIN, 11, 0))  # 11 < 3 x 4
    assert h.pushes == []


def test_call_spike_at_factor_fires():
    h = Harness()
    h.feed(*_history(C, [4, 4, 4]))
    h.feed(calls(C, T0 + 3 * 15 * MIN, 5, 7))  # 12 == 3 x 4
    assert len(h.pushes) == 1


def test_call_spike_calls_in_and_out_add_up():
    h = Harness()
    h.feed(*[calls(C, T0 + i * 15 * MIN, 1, 3) for i in range(3)])  # 4 each
    h.feed(calls(C, T0 + 3 * 15 * MIN, 11, 0))
    assert h.pushes == []
    h.feed(calls(C, T0 + 4 * 15 * MIN, 0, 20))
    assert len(h.pushes) == 1


def test_call_spike_needs_min_history():
    h = Harness()
    h.feed(*_history(C, [1, 1]))
    h.feed(calls(C, T0 + 2 * 15 * MIN, 50, 50))
    assert h.pushes == []


def test_call_spike_below_min_total_with_zero_history_does_not_fire():
    h = Harness()
    h.feed(*_history(C, [0, 0, 0]))
    h.feed(calls(C, T0 + 3 * 15 * MIN, 5, 4))  # 9 < min_total 10, though >= 3 x 0
    assert h.pushes == []


def test_call_spike_min_total_with_zero_history_fires():
    h = Harness()
    h.feed(*_history(C, [0, 0, 0]))
    h.feed(calls(C, T0 + 3 * 15 * MIN, 5, 5))
    assert len(h.pushes) == 1
    assert h.pushes[0].reason["baseline_mean"] == 0.0


def test_call_spike_only_the_last_twelve_intervals_count():
    h = Harness()
    h.feed(*_history(C, [100] * 13 + [4] * 12))
    assert h.pushes == []
    h.feed(calls(C, T0 + 25 * 15 * MIN, 12, 0))
    [p] = h.pushes
    assert p.reason["intervals"] == 12
    assert p.reason["baseline_mean"] == 4.0


def test_call_spike_twelfth_last_interval_still_counts():
    # 11 intervals of 4 and, before them, one of 40: mean 7.33 -> 12 does not fire
    h = Harness()
    h.feed(*_history(C, [100] + [40] + [4] * 11))
    h.feed(calls(C, T0 + 13 * 15 * MIN, 12, 0))
    assert h.pushes == []


def test_call_spike_only_earlier_intervals_are_history():
    h = Harness()
    # an interval later in event time than the spike is not part of its baseline
    h.feed(*_history(C, [3, 3, 3]))
    h.engine.buffer_event(calls(C, T0 + 10 * 15 * MIN, 100, 0))
    h.engine.buffer_event(calls(C, T0 + 4 * 15 * MIN, 10, 0))
    h.advance(T0 + 10 * 15 * MIN)
    assert [p.reason["total"] for p in h.pushes] == [10]


def test_call_spike_once_per_24h():
    h = Harness()
    h.feed(*_history(C, [1, 1, 1]))
    h.feed(calls(C, T0 + 3 * 15 * MIN, 10, 0))
    assert len(h.pushes) == 1
    h.feed(calls(C, T0 + 3 * 15 * MIN + 24 * H - 1, 60, 0))
    assert len(h.pushes) == 1
    assert h.count("rule", "call-spike", "blocked:once_per") == 1
    h.feed(calls(C, T0 + 3 * 15 * MIN + 24 * H, 60, 0))
    assert len(h.pushes) == 2


def test_call_spike_duplicate_interval_replaces_not_adds():
    h = Harness()
    h.feed(calls(C, T0, 3, 0), calls(C, T0, 3, 0), calls(C, T0 + 15 * MIN, 3, 0))
    h.feed(calls(C, T0 + 30 * MIN, 50, 0))
    assert h.pushes == []  # only two distinct earlier intervals


# --- music-pref: module_enter music with music prefs, once per session ----------------


def _music_fan(cid=C, genres=("jazz", "rock")):
    return profile(cid, prefs={"music": list(genres)})


def test_music_pref_pushes_genres_to_the_terminal():
    h = Harness(profiles=[_music_fan()])
    h.feed(click(C, T0, "session_start", terminal="T4"),
           click(C, T0 + S, "module_enter", module="music", terminal="T4"))
    [p] = h.pushes
    assert p.rule_id == "music-pref"
    assert p.channel == "terminal:T4"
    assert p.content == {"module": "music", "kind": "content", "genres": ["jazz", "rock"]}
    assert p.reason["pref"] == "music"


def test_music_pref_once_per_session_and_again_in_a_new_session():
    h = Harness(profiles=[_music_fan()])
    h.feed(click(C, T0, "session_start"), click(C, T0 + S, "module_enter", module="music"))
    h.feed(click(C, T0 + 2 * S, "module_enter", module="music"))
    assert len(h.pushes) == 1
    assert h.count("rule", "music-pref", "blocked:once_per") == 1
    h.feed(click(C, T0 + 3 * S, "session_end"), click(C, T0 + 4 * S, "session_start"),
           click(C, T0 + 5 * S, "module_enter", module="music"))
    assert len(h.pushes) == 2
    assert h.pushes[0].push_id != h.pushes[1].push_id


def test_music_pref_without_prefs_does_nothing():
    h = Harness(profiles=[profile(C, prefs={"music": []}), profile("c2", prefs={"news": ["x"]})])
    h.feed(click(C, T0, "module_enter", module="music"),
           click("c2", T0, "module_enter", module="music"),
           click("c3", T0, "module_enter", module="music"))
    assert h.pushes == []


def test_music_pref_other_module_does_nothing():
    h = Harness(profiles=[_music_fan()])
    h.feed(click(C, T0, "module_enter", module="video"))
    assert h.pushes == []


def test_music_pref_implicit_session_goes_to_the_terminal():
    h = Harness(profiles=[_music_fan()])
    h.feed(click(C, T0, "module_enter", module="music", terminal="T9"))
    assert [p.channel for p in h.pushes] == ["terminal:T9"]


def test_music_pref_with_a_condition_on_the_segment():
    doc = default_rules_doc()
    music = next(r for r in doc["rules"] if r["id"] == "music-pref")
    music["when"] = 'profile.segment == "youth" && "jazz" in profile.prefs.music'
    h = Harness(parse_rules(doc, "r.yaml"), profiles=[
        profile(C, segment="youth", prefs={"music": ["jazz", "rock"]}),
        profile("c2", segment="adult", prefs={"music": ["jazz"]}),
        profile("c3", segment="youth", prefs={"music": ["rock"]}),
        profile("c4", segment="youth"),  # no music list: the trigger itself does not fire
    ])
    for i, cid in enumerate([C, "c2", "c3", "c4"]):
        h.feed(click(cid, T0 + i * S, "module_enter", module="music", terminal=f"T{i}"))
    [p] = h.pushes
    assert (p.customer_id, p.content["genres"]) == (C, ["jazz", "rock"])
    assert h.count("rule", "music-pref", "blocked:when") == 2
    assert h.count("rule", "music-pref", "blocked:when_error") == 0


# --- setup-first: session_start, subscribed and not configured -------------------------


def test_setup_first_one_guide_per_unconfigured_service():
    h = Harness(profiles=[profile(C, subscriptions=["care_link", "remote_cam", "music"])])
    h.feed(click(C, T0, "session_start", terminal="T5"))
    got = sorted((p.content["module"], p.content["kind"], p.channel) for p in h.pushes)
    assert got == [("care_link", "setup_guide", "terminal:T5"),
                   ("remote_cam", "setup_guide", "terminal:T5")]
    assert all(p.rule_id == "setup-first" for p in h.pushes)
    assert len({p.push_id for p in h.pushes}) == 2


def test_setup_first_configured_service_gets_no_guide():
    h = Harness(profiles=[profile(C, subscriptions=["care_link", "remote_cam"],
                                  configured=["care_link"])])
    h.feed(click(C, T0, "session_start"))
    assert [p.content["module"] for p in h.pushes] == ["remote_cam"]


def test_setup_first_all_configured_or_not_subscribed_gets_nothing():
    h = Harness(profiles=[
        profile(C, subscriptions=["care_link", "remote_cam"],
                configured=["care_link", "remote_cam"]),
        profile("c2", configured=["care_link"]),
    ])
    h.feed(click(C, T0, "session_start"), click("c2", T0, "session_start"),
           click("c3", T0, "session_start"))
    assert h.pushes == []


def test_setup_first_only_on_session_start():
    h = Harness(profiles=[profile(C, subscriptions=["care_link"])])
    h.feed(click(C, T0, "module_enter", module="care_link"))
    assert h.pushes == []


def test_setup_first_once_per_session_per_service():
    h = Harness(profiles=[profile(C, subscriptions=["care_link"])])
    h.feed(click(C, T0, "session_start"))
    assert len(h.pushes) == 1
    # a second session_start replaces the session: a new session, so the guide again
    h.feed(click(C, T0 + 10 * MIN, "session_start"))
    assert len(h.pushes) == 2
    h.feed(click(C, T0 + 20 * MIN, "session_end"), click(C, T0 + 21 * MIN, "session_start"))
    assert len(h.pushes) == 3


# --- help-sprite: step_dwell 90 s -------------------------------------------------------


def _on_step(h, t=T0, cid=C, module="remote_cam", step="door_sensor", terminal="T1",
             hall="H1"):
    h.feed(click(cid, t - 10 * S, "session_start", terminal=terminal, hall=hall),
           click(cid, t - 5 * S, "module_enter", module=module, terminal=terminal, hall=hall),
           click(cid, t, "step_enter", module=module, step=step, terminal=terminal, hall=hall))


def test_help_sprite_fires_at_the_dwell():
    h = Harness(profiles=[profile(C, subscriptions=["remote_cam"])])
    _on_step(h, terminal="T3", hall="H2")
    assert h.advance(T0 + 90 * S - 1) == []
    h.advance(T0 + 90 * S)
    [p] = h.pushes_of("help-sprite")
    assert p.channel == "terminal:T3"
    assert p.content == {"module": "remote_cam", "kind": "help", "step": "door_sensor"}
    assert p.event_ts == T0 + 90 * S
    assert p.reason["dwell_s"] == 90
    [a] = h.alerts
    assert a.type == "touchstream.dwell.customer"
    assert a.subject == C
    assert a.time_ms == T0 + 90 * S
    assert a.source == "/touchstream/rules/help-sprite"
    d = a.data
    assert (d["customer_id"], d["module"], d["step"], d["dwell_s"]) == (
        C, "remote_cam", "door_sensor", 90)
    assert (d["terminal_id"], d["hall_id"], d["subscribed"]) == ("T3", "H2", True)
    assert d["threshold_s"] == 90
    assert d["entered_at_ms"] == T0
    assert h.count("rule", "help-sprite", "alerts") == 1
    assert h.count("alerts", "touchstream.dwell.customer") == 1


def test_help_sprite_alert_says_not_subscribed():
    h = Harness()
    _on_step(h)
    h.advance(T0 + 90 * S)
    assert h.alerts[0].data["subscribed"] is False


def test_help_sprite_nothing_before_the_dwell():
    h = Harness()
    _on_step(h)
    h.advance(T0 + 90 * S - 1)
    assert h.pushes == [] and h.alerts == []
    assert h.engine.next_deadline() == T0 + 90 * S


@pytest.mark.parametrize(
    "leave",
    [
        lambda t: click(C, t, "step_exit", module="remote_cam", step="door_sensor"),
        lambda t: click(C, t, "help", module="remote_cam", step="door_sensor"),
        lambda t: click(C, t, "step_enter", module="remote_cam", step="bind_mms"),
        lambda t: click(C, t, "session_end"),
        lambda t: click(C, t, "session_start"),
    ],
    ids=["step_exit", "help", "next_step", "session_end", "session_start"],
)
def test_help_sprite_leaving_before_the_dwell_cancels(leave):
    h = Harness()
    _on_step(h)
    h.feed(leave(T0 + 90 * S - 1))
    h.advance(T0 + 90 * S)
    assert h.pushes == [] and h.alerts == []


def test_help_sprite_exit_of_another_step_does_not_cancel():
    h = Harness()
    _on_step(h)
    h.feed(click(C, T0 + 10 * S, "step_exit", module="remote_cam", step="other"))
    h.advance(T0 + 90 * S)
    assert len(h.alerts) == 1
    assert h.count("clicks", "unmatched_step_exit") == 1


def test_help_sprite_exit_exactly_at_the_deadline_fires_first():
    h = Harness()
    _on_step(h)
    h.feed(click(C, T0 + 90 * S, "step_exit", module="remote_cam", step="door_sensor"))
    assert len(h.alerts) == 1 and len(h.pushes) == 1
    assert h.visits[-1].dwell_ms == 90 * S


def test_help_sprite_other_clicks_do_not_cancel():
    h = Harness()
    _on_step(h)
    h.feed(click(C, T0 + 30 * S, "demo_play", module="remote_cam"),
           click(C, T0 + 40 * S, "rate", module="remote_cam"))
    h.advance(T0 + 90 * S)
    assert len(h.alerts) == 1


def test_help_sprite_once_per_visit_and_again_on_a_new_visit():
    h = Harness()
    _on_step(h)
    h.advance(T0 + 10 * 60 * S)
    assert len(h.alerts) == 1 and len(h.pushes) == 1
    # the same step entered again: a new visit, which can fire again
    h.feed(click(C, T0 + 11 * MIN, "step_enter", module="remote_cam", step="door_sensor"))
    h.advance(T0 + 11 * MIN + 90 * S)
    assert len(h.alerts) == 2 and len(h.pushes) == 2
    assert h.alerts[0].id != h.alerts[1].id
    assert h.pushes[0].push_id != h.pushes[1].push_id


def test_help_sprite_alert_but_no_push_for_an_opt_out_customer():
    h = Harness(profiles=[profile(C, opt_out=True)])
    _on_step(h)
    h.advance(T0 + 90 * S)
    assert h.pushes == []
    assert len(h.alerts) == 1
    assert h.count("rule", "help-sprite", "blocked:opt_out") == 1


def test_help_sprite_dwell_is_a_parameter():
    h = Harness(rules=rules_with(**{"help-sprite": {"dwell": "30s"}}))
    _on_step(h)
    h.advance(T0 + 30 * S - 1)
    assert h.alerts == []
    h.advance(T0 + 30 * S)
    assert h.alerts[0].data["dwell_s"] == 30


def test_help_sprite_timer_fires_without_any_later_event():
    # the watermark alone (a tick) fires it; the customer sends nothing more
    h = Harness()
    _on_step(h)
    other = [click("c2", T0 + i * 30 * S, "module_enter", module="news") for i in range(5)]
    h.feed(*other)
    assert len(h.alerts) == 1


# --- step-friction: 5 customers, mean dwell >= 100 s in 60 min -------------------------


def _visit(h, cid, enter, dwell, module="remote_cam", step="door_sensor", leave="step_exit"):
    """One customer's visit of ``dwell`` ms to a step, ending at ``enter + dwell``."""
    envs = [click(cid, enter, "step_enter", module=module, step=step, terminal=f"T-{cid}")]
    end = enter + dwell
    if leave == "step_exit":
        envs.append(click(cid, end, "step_exit", module=module, step=step, terminal=f"T-{cid}"))
    elif leave == "help":
        envs.append(click(cid, end, "help", module=module, step=step, terminal=f"T-{cid}"))
    elif leave == "next":
        envs.append(click(cid, end, "step_enter", module=module, step="next",
                          terminal=f"T-{cid}"))
    elif leave == "session_end":
        envs.append(click(cid, end, "session_end", terminal=f"T-{cid}"))
    h.feed(*envs)


def _friction(h):
    return h.alerts_of("touchstream.dwell.step")


def test_step_friction_five_customers_at_mean_fires_with_evidence():
    subs = [profile("c1", subscriptions=["remote_cam"]),
            profile("c3", subscriptions=["remote_cam", "music"])]
    h = Harness(profiles=subs)
    dwells = [120 * S, 80 * S, 100 * S, 110 * S, 90 * S]  # mean 100 s exactly
    for i, d in enumerate(dwells):
        _visit(h, f"c{i + 1}", T0 + i * MIN, d)
    [a] = _friction(h)
    assert a.subject == "remote_cam/door_sensor"
    assert a.source == "/touchstream/rules/step-friction"
    assert a.time_ms == T0 + 4 * MIN + 90 * S
    d = a.data
    assert d["n"] == 5
    assert d["visits"] == 5
    assert d["mean_s"] == 100.0
    assert d["p90_s"] == 120.0
    assert d["share_subscribed"] == 0.4
    assert d["module"] == "remote_cam" and d["step"] == "door_sensor"
    assert [(s["customer_id"], s["dwell_s"], s["subscribed"]) for s in d["samples"]] == [
        ("c1", 120.0, True), ("c4", 110.0, False), ("c3", 100.0, True),
        ("c5", 90.0, False), ("c2", 80.0, False)]
    assert h.count("rule", "step-friction", "alerts") == 1
    assert h.count("alerts", "touchstream.dwell.step") == 1


def test_step_friction_samples_are_capped_and_ties_break_by_customer_id():
    h = Harness()
    for cid in ["c7", "c3", "c5", "c1", "c6", "c2", "c4"]:
        _visit(h, cid, T0, 100 * S)
    [a] = _friction(h)  # fires at the 5th customer
    assert [s["customer_id"] for s in a.data["samples"]] == ["c1", "c3", "c5", "c6", "c7"]


def test_step_friction_four_customers_do_not_fire():
    h = Harness()
    for i in range(4):
        _visit(h, f"c{i}", T0 + i * MIN, 500 * S)
    assert _friction(h) == []


def test_step_friction_one_customer_many_visits_counts_once():
    h = Harness()
    for i in range(6):
        _visit(h, "c1", T0 + i * 5 * MIN, 200 * S)
    for i in range(3):
        _visit(h, f"d{i}", T0 + 40 * MIN, 200 * S)
    assert _friction(h) == []  # 4 distinct customers
    _visit(h, "d9", T0 + 41 * MIN, 200 * S)
    [a] = _friction(h)
    assert a.data["n"] == 5 and a.data["visits"] == 10


def test_step_friction_mean_just_below_does_not_fire():
    h = Harness()
    for i, d in enumerate([100 * S] * 4 + [100 * S - 5]):  # mean 99.999 s
        _visit(h, f"c{i}", T0 + i * MIN, d)
    assert _friction(h) == []


def test_step_friction_visits_ending_in_every_way_count():
    h = Harness()
    for i, how in enumerate(["step_exit", "help", "next", "session_end", "step_exit"]):
        _visit(h, f"c{i}", T0 + i * MIN, 150 * S, leave=how)
    assert len(h.visits) == 5
    [a] = _friction(h)
    assert a.data["n"] == 5


def test_step_friction_per_module_and_step():
    h = Harness()
    for i in range(3):
        _visit(h, f"c{i}", T0, 200 * S)
    for i in range(3, 5):
        _visit(h, f"c{i}", T0, 200 * S, step="other")
    for i in range(5, 7):
        _visit(h, f"c{i}", T0, 200 * S, module="care_link")
    assert _friction(h) == []


def test_step_friction_visit_older_than_window_no_longer_counts():
    h = Harness()
    _visit(h, "c0", T0 - 200 * S, 200 * S)  # leaves at T0
    for i in range(1, 4):
        _visit(h, f"c{i}", T0 + 10 * MIN, 200 * S)
    _visit(h, "c4", T0 + 60 * MIN - 200 * S + 1, 200 * S)  # leaves at T0 + 60 min + 1 ms
    assert _friction(h) == []


def test_step_friction_visit_exactly_window_old_still_counts():
    h = Harness()
    _visit(h, "c0", T0 - 200 * S, 200 * S)  # leaves at T0
    for i in range(1, 4):
        _visit(h, f"c{i}", T0 + 10 * MIN, 200 * S)
    _visit(h, "c4", T0 + 60 * MIN - 200 * S, 200 * S)  # leaves at T0 + 60 min
    assert len(_friction(h)) == 1


def test_step_friction_at_most_once_per_step_per_60_min():
    h = Harness()
    for i in range(5):
        _visit(h, f"c{i}", T0, 200 * S)  # all leave at T0 + 200 s
    assert len(_friction(h)) == 1
    _visit(h, "c5", T0 + 1 * S, 200 * S)
    assert len(_friction(h)) == 1
    _visit(h, "c6", T0 + 60 * MIN - 1, 200 * S)  # leaves 60 min - 1 ms after the alert
    assert len(_friction(h)) == 1
    _visit(h, "c7", T0 + 60 * MIN, 200 * S)  # leaves 60 min after the alert
    alerts = _friction(h)
    assert len(alerts) == 2
    assert alerts[0].id != alerts[1].id
    # the condition still holds at T0 + 60 min + 200 s: every visit leaving since T0 + 200 s
    assert alerts[1].data["n"] == 8


def test_step_friction_other_step_is_not_suppressed_by_an_alert():
    h = Harness()
    for i in range(5):
        _visit(h, f"c{i}", T0, 200 * S)
    for i in range(5):
        _visit(h, f"c{i}", T0 + 5 * MIN, 200 * S, step="bind_mms")
    assert sorted(a.subject for a in _friction(h)) == [
        "remote_cam/bind_mms", "remote_cam/door_sensor"]


def test_step_friction_visit_records_subscription_at_leave_time():
    h = Harness(profiles=[profile("c1", subscriptions=["remote_cam"])])
    _visit(h, "c1", T0, 10 * S)
    _visit(h, "c2", T0, 10 * S)
    assert [(v.customer_id, v.subscribed, v.dwell_ms) for v in h.visits] == [
        ("c1", True, 10 * S), ("c2", False, 10 * S)]


def test_step_friction_no_visits_without_a_friction_rule():
    h = Harness(rules=rules_with(**{"step-friction": None}))
    _visit(h, "c1", T0, 10 * S)
    assert h.visits == []


# --- trial-ending: trial ends within 48 h of session_start or module_enter ------------


def test_trial_ending_on_session_start():
    end = T0 + 20 * H
    h = Harness(profiles=[profile(C, trials={"remote_cam": end})])
    h.feed(click(C, T0, "session_start", terminal="T8"))
    [p] = h.pushes
    assert p.rule_id == "trial-ending"
    assert p.channel == "terminal:T8"
    assert p.content == {"module": "remote_cam", "kind": "trial_ending", "trial_end": end}
    assert p.reason["trial_end"] == end
    assert p.reason["hours_left"] == 20.0


def test_trial_ending_on_module_enter():
    h = Harness(profiles=[profile(C, trials={"remote_cam": T0 + H})])
    h.feed(click(C, T0, "module_enter", module="news"))
    assert [p.content["module"] for p in h.pushes] == ["remote_cam"]


def test_trial_ending_not_on_other_clicks():
    h = Harness(profiles=[profile(C, trials={"remote_cam": T0 + H})])
    h.feed(click(C, T0, "demo_play", module="news"),
           click(C, T0 + 1, "step_enter", module="news", step="a"),
           click(C, T0 + 2, "order", module="news"),
           location(C, T0 + 3), calls(C, T0 + 4, 1, 1))
    assert h.pushes == []


@pytest.mark.parametrize(
    ("end", "fires"),
    [
        (T0 + 48 * H, True),
        (T0 + 48 * H + 1, False),
        (T0, True),
        (T0 - 1, False),
        (T0 - 10 * D, False),
    ],
    ids=["exactly_48h", "48h_plus_1ms", "ends_now", "ended_1ms_ago", "ended_long_ago"],
)
def test_trial_ending_window(end, fires):
    h = Harness(profiles=[profile(C, trials={"remote_cam": end})])
    h.feed(click(C, T0, "session_start"))
    assert len(h.pushes) == (1 if fires else 0)


def test_trial_ending_one_push_per_service_ending():
    h = Harness(profiles=[profile(C, trials={"a": T0 + H, "b": T0 + 2 * H, "c": T0 + 3 * D})])
    h.feed(click(C, T0, "session_start"))
    assert sorted(p.content["module"] for p in h.pushes) == ["a", "b"]


def test_trial_ending_once_per_service_ever():
    h = Harness(profiles=[profile(C, trials={"a": T0 + 47 * H})])
    h.feed(click(C, T0, "session_start"), click(C, T0 + S, "module_enter", module="x"))
    h.feed(click(C, T0 + 2 * H, "session_end"), click(C, T0 + 30 * H, "session_start"))
    assert len(h.pushes) == 1
    assert h.count("rule", "trial-ending", "blocked:once_per") == 2
    # another service's trial is not blocked by the first
    h.put_profiles(profile(C, trials={"a": T0 + 47 * H, "b": T0 + 50 * H}))
    h.feed(click(C, T0 + 31 * H, "session_start"))
    assert [p.content["module"] for p in h.pushes] == ["a", "b"]


def test_trial_ending_actions_are_a_parameter():
    h = Harness(rules=rules_with(**{"trial-ending": {"actions": ["session_start"]}}),
                profiles=[profile(C, trials={"a": T0 + H})])
    h.feed(click(C, T0, "module_enter", module="x"))
    assert h.pushes == []


def test_harness_runs_one_shard():
    assert Harness().config == EngineConfig(shards=1)


def test_step_friction_ignores_a_step_abandoned_with_its_session():
    h = Harness()
    h.feed(click("c0", T0, "session_start"),
           click("c0", T0 + S, "step_enter", module="remote_cam", step="door_sensor"))
    h.advance(T0 + 2 * H)  # walked away without step_exit or session_end
    for i in range(1, 5):
        _visit(h, f"c{i}", T0 + 2 * H, 10 * S)  # four quick visits
    h.feed(click("c0", T0 + 2 * H + 20 * S, "session_start"),
           click("c0", T0 + 2 * H + 30 * S, "step_enter", module="remote_cam",
                 step="door_sensor"))
    assert all(v.dwell_ms <= 30 * MIN for v in h.visits), [v.dwell_ms for v in h.visits]
    assert _friction(h) == []
