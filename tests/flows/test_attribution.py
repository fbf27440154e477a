"""Push → order attribution: window, last touch, groups and the control group's uplift."""

from __future__ import annotations

import pytest

from flows.attribution import HoldoutRecord, OrderRecord, PushRecord, attribute

T0 = 1_700_000_000_000
MIN = 60_000
WINDOW = 30 * MIN


def push(pid: str, cid: str, ts: int, module: str = "music", rule: str = "music-pref",
         hall: str = "H1") -> PushRecord:
    return PushRecord(pid, rule, cid, ts, module, hall)


def order(cid: str, ts: int, module: str = "music", hall: str = "H1") -> OrderRecord:
    return OrderRecord(cid, ts, module, hall)


def test_an_order_of_the_pushed_module_within_the_window_converts() -> None:
    pushes = [push("p1", "a", T0), push("p2", "b", T0), push("p3", "c", T0),
              push("p4", "d", T0)]
    orders = [
        order("a", T0 + WINDOW),            # at the edge: counts
        order("b", T0 + WINDOW + 1),        # one ms too late
        order("c", T0 + 5 * MIN, "mobile_pay"),  # another module
        order("d", T0 - 1),                 # before the push
        order("zz", T0 + MIN),              # a customer never pushed
    ]
    rep = attribute(pushes, orders, WINDOW)
    assert rep.converted == {"p1"}
    g = rep.to_dict()["rule"]["music-pref"]
    assert (g["pushes"], g["customers"], g["orders"], g["order_rate"]) == (4, 4, 1, 0.25)
    assert g["control_order_rate"] is None and g["uplift"] is None


def test_one_order_credits_only_the_latest_push_and_a_push_converts_once() -> None:
    pushes = [push("early", "a", T0, rule="r1"), push("late", "a", T0 + 10 * MIN, rule="r2")]
    rep = attribute(pushes, [order("a", T0 + 12 * MIN)], WINDOW)
    assert rep.converted == {"late"}
    # two orders: the second goes to the earlier push, still in its window
    rep2 = attribute(pushes, [order("a", T0 + 12 * MIN), order("a", T0 + 13 * MIN)], WINDOW)
    assert rep2.converted == {"early", "late"}
    # one push, three orders: it converts once
    rep3 = attribute([push("p", "a", T0)], [order("a", T0 + i * MIN) for i in (1, 2, 3)],
                     WINDOW)
    assert rep3.to_dict()["rule"]["music-pref"]["orders"] == 1


def test_groups_per_rule_campaign_hall_module() -> None:
    pushes = [push("p1", "a", T0, "music", "music-pref", "H1"),
              push("p2", "b", T0, "mobile_pay", "cinema-pay", "H2"),
              push("p3", "c", T0, "mobile_pay", "cinema-pay", "H1")]
    orders = [order("a", T0 + MIN, "music"), order("c", T0 + MIN, "mobile_pay")]
    rep = attribute(pushes, orders, WINDOW, campaigns={"cinema-pay": "spring"}).to_dict()
    assert rep["campaign"]["spring"]["pushes"] == 2 and rep["campaign"]["spring"]["orders"] == 1
    assert rep["campaign"]["music-pref"]["orders"] == 1  # no campaign: the rule id
    assert rep["hall"]["H1"] == {**rep["hall"]["H1"], "pushes": 2, "orders": 2}
    assert rep["hall"]["H2"]["orders"] == 0
    assert rep["module"]["mobile_pay"]["order_rate"] == 0.5
    assert rep["window_s"] == WINDOW // 1000


def test_control_group_rate_and_uplift() -> None:
    pushes = [push(f"p{i}", f"t{i}", T0) for i in range(4)]
    orders = [order("t0", T0 + MIN), order("t1", T0 + 2 * MIN), order("t2", T0 + 3 * MIN)]
    holdouts = [HoldoutRecord("music-pref", f"h{i}", T0, "H1", "music") for i in range(4)]
    orders.append(order("h0", T0 + MIN))
    orders.append(order("h1", T0 + WINDOW + MIN))  # outside the window
    g = attribute(pushes, orders, WINDOW, holdouts).to_dict()["rule"]["music-pref"]
    assert g["order_rate"] == 0.75
    assert (g["control"], g["control_orders"], g["control_order_rate"]) == (4, 1, 0.25)
    assert g["uplift"] == 0.5


def test_a_control_group_alone_has_no_uplift_and_a_negative_window_is_refused() -> None:
    holdouts = [HoldoutRecord("r", "h", T0, "H1", "music")]
    g = attribute([], [order("h", T0)], WINDOW, holdouts).to_dict()["rule"]["r"]
    assert g["pushes"] == 0 and g["control_order_rate"] == 1.0 and g["uplift"] is None
    with pytest.raises(ValueError):
        attribute([], [], -1)
