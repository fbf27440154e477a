"""Built-in demo traffic: halls, terminals and customers acting out every default rule.

Each round (every ``round_s`` seconds) a fresh cast of customers plays the seed
moments on a timetable — a cinema-goer, a call spike, a music lover, a subscriber who
never set up care-link, a trial about to end, one customer stuck on the remote
camera's door-sensor step and five more who linger there — while background
customers browse, phone and move around, with an occasional malformed message.
Event times are the wall clock; a few network records arrive deliberately late.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from flows.codec import json_dumps
from flows.model import Profile, RawRecord

__all__ = ["DemoSource", "demo_profiles", "demo_script"]

HALLS = ("H01", "H02", "H03")
MODULES = ("music", "mobile_pay", "mobile_paper", "call_reminder", "care_link", "remote_cam")
POIS = ("mall", "stadium", "office", None)
BAD = (b"{not json", b'{"type":"click"}', b'{"type":"teleport","customer_id":"x","ts":1}',
       b"\xff\xfe\x00", b'{"type":"calls","customer_id":"c","ts":1700000000000,'
       b'"interval_s":300,"calls_in":"many","calls_out":1,"missed":0}')
DOOR = ("remote_cam", "door_sensor_setup")


def _cid(rnd: int, k: int) -> str:
    return f"1380000{rnd % 100:02d}{k:02d}"


def demo_profiles(rnd: int, now_ms: int) -> list[Profile]:
    """The profiles of round ``rnd``'s scripted customers."""
    return [
        Profile(_cid(rnd, 3), subscriptions=frozenset({"music"}), prefs={"music": ("jazz",)},
                segment="youth", handset="Mate 60"),
        Profile(_cid(rnd, 4), subscriptions=frozenset({"care_link"}), segment="family"),
        Profile(_cid(rnd, 5), trials={"mobile_paper": now_ms + 30 * 3_600_000}),
        Profile(_cid(rnd, 6), subscriptions=frozenset({"remote_cam"})),
        Profile(_cid(rnd, 8), subscriptions=frozenset({"remote_cam"}),
                configured=frozenset({"remote_cam"})),
        Profile(_cid(rnd, 10), subscriptions=frozenset({"remote_cam"}),
                configured=frozenset({"remote_cam"})),
        Profile(_cid(rnd, 12), opt_out=True),
    ]


def demo_script(rnd: int, start_ms: int) -> list[tuple[int, dict[str, Any]]]:
    """Round ``rnd``'s scripted events as ``(due ms, event)``; event ts may be earlier."""
    s = start_ms
    out: list[tuple[int, dict[str, Any]]] = []

    def at(sec: float, ev: dict[str, Any], ts: int | None = None) -> None:
        due = s + int(sec * 1000)
        ev["ts"] = due if ts is None else ts
        out.append((due, ev))

    def click(k: int, action: str, module: str | None = None, step: str | None = None,
              hall: str = "H01") -> dict[str, Any]:
        ev: dict[str, Any] = {"type": "click", "customer_id": _cid(rnd, k),
                              "terminal_id": f"{hall}-T{k:02d}", "hall_id": hall,
                              "action": action}
        if module:
            ev["module"] = module
        if step:
            ev["step"] = step
        return ev

    def loc(k: int, poi: str) -> dict[str, Any]:
        return {"type": "location", "customer_id": _cid(rnd, k), "cell_id": f"cell-{poi}-1",
                "poi": poi, "poi_id": f"{poi}-wanda"}

    def calls(k: int, total: int) -> dict[str, Any]:
        return {"type": "calls", "customer_id": _cid(rnd, k), "interval_s": 300,
                "calls_in": total - total // 3, "calls_out": total // 3, "missed": total // 4}

    hour = 3_600_000
    # cinema-pay: a visit three hours ago arrives late from the network, then one now.
    at(1, loc(1, "cinema"), ts=s - 3 * hour)
    at(15, loc(1, "cinema"))
    # call-spike: four ordinary intervals (late records), then a burst.
    for i, total in enumerate((2, 3, 2, 3)):
        at(2 + i * 0.5, calls(2, total), ts=s - (30 - 5 * i) * 60_000)
    at(20, calls(2, 16))
    # music-pref, then an order of the pushed module (a conversion).
    at(5, click(3, "session_start"))
    at(8, click(3, "module_enter", "music"))
    at(30, click(3, "order", "music"))
    at(35, click(3, "session_end"))
    # setup-first: subscribed to care_link, never set it up.
    at(10, click(4, "session_start", hall="H02"))
    # trial-ending: mobile_paper trial ends in 30 h.
    at(12, click(5, "session_start", hall="H02"))
    at(13, click(5, "module_enter", "mobile_paper", hall="H02"))
    # help-sprite: stuck on the door-sensor step.
    at(3, click(6, "session_start"))
    at(4, click(6, "module_enter", DOOR[0]))
    at(6, click(6, "step_enter", *DOOR))
    # step-friction: five more linger ~104 s on the same step, then move on.
    for i, k in enumerate(range(7, 12)):
        hall = HALLS[i % 3]
        at(7 + i, click(k, "session_start", hall=hall))
        at(8 + i, click(k, "step_enter", *DOOR, hall=hall))
        at(112 + i, click(k, "step_exit", *DOOR, hall=hall))
        at(114 + i, click(k, "session_end", hall=hall))
    # opt-out: would get cinema-pay, is not pushed (the stats show it blocked).
    at(1.5, loc(12, "cinema"), ts=s - 5 * hour)
    at(16, loc(12, "cinema"))
    out.sort(key=lambda x: x[0])
    return out


@dataclass
class _Noise:
    rng: random.Random
    pool: int = 400

    def event(self, now: int) -> dict[str, Any] | bytes:
        r = self.rng
        if r.random() < 0.02:
            return r.choice(BAD)
        cid = f"139{r.randrange(self.pool):08d}"
        roll = r.random()
        if roll < 0.45:
            return {"type": "location", "customer_id": cid, "ts": now,
                    "cell_id": f"cell-{r.randrange(50)}", "poi": r.choice(POIS)}
        if roll < 0.75:
            n = r.randrange(0, 5)
            return {"type": "calls", "customer_id": cid, "ts": now, "interval_s": 300,
                    "calls_in": n, "calls_out": r.randrange(0, 3), "missed": r.randrange(0, 2)}
        hall = r.choice(HALLS)
        action = r.choice(("session_start", "module_enter", "demo_play", "help", "rate",
                           "order", "session_end"))
        ev: dict[str, Any] = {"type": "click", "customer_id": cid, "ts": now,
                              "terminal_id": f"{hall}-T{r.randrange(20, 40)}", "hall_id": hall,
                              "action": action}
        if action not in ("session_start", "session_end"):
            ev["module"] = r.choice(MODULES)
        return ev


class _DemoPartition(StatefulSourcePartition[RawRecord, None]):
    def __init__(self, seed: int, rate: float, round_s: float, duration_s: float | None,
                 now_ms: Callable[[], int], on_round: Callable[[int, int], None]) -> None:
        self._now = now_ms
        self._noise = _Noise(random.Random(seed))
        self._gap_ms = 1000.0 / rate
        self._round_ms = int(round_s * 1000)
        self._start = now_ms()
        self._end = None if duration_s is None else self._start + int(duration_s * 1000)
        self._on_round = on_round
        self._round = -1
        self._script: list[tuple[int, dict[str, Any]]] = []
        self._next_noise = float(self._start)
        self._pos = 0

    def next_batch(self) -> list[RawRecord]:
        now = self._now()
        if self._end is not None and now >= self._end:
            raise StopIteration
        rnd = (now - self._start) // self._round_ms
        if rnd != self._round:
            self._round = rnd
            round_start = self._start + rnd * self._round_ms
            self._on_round(rnd, round_start)
            self._script.extend(demo_script(rnd, round_start))
            self._script.sort(key=lambda x: x[0])
        out: list[RawRecord] = []
        while self._script and self._script[0][0] <= now:
            out.append(self._record(self._script.pop(0)[1]))
        while self._next_noise <= now:
            out.append(self._record(self._noise.event(int(self._next_noise))))
            self._next_noise += self._gap_ms
        return out

    def _record(self, ev: dict[str, Any] | bytes) -> RawRecord:
        self._pos += 1
        value = ev if isinstance(ev, bytes) else json_dumps(ev)
        return RawRecord("demo", self._pos, value)

    def next_awake(self) -> datetime | None:
        due = self._next_noise
        if self._script:
            due = min(due, self._script[0][0])
        return datetime.fromtimestamp(due / 1000, tz=UTC) + timedelta(milliseconds=1)

    def snapshot(self) -> None:
        return None


class DemoSource(FixedPartitionedSource[RawRecord, None]):
    """Demo traffic in real time (one partition, so one worker generates it).

    ``on_round(round, start_ms)`` is called as each round starts, so the caller can
    load that round's profiles (:func:`demo_profiles`) before its events arrive.
    """

    def __init__(self, *, seed: int = 7, rate: float = 20.0, round_s: float = 180.0,
                 duration_s: float | None = None, now_ms: Callable[[], int] | None = None,
                 on_round: Callable[[int, int], None] | None = None) -> None:
        self.seed = seed
        self.rate = rate
        self.round_s = round_s
        self.duration_s = duration_s
        self.now_ms = now_ms or (lambda: time.time_ns() // 1_000_000)
        self.on_round = on_round or (lambda _r, _s: None)

    def list_parts(self) -> list[str]:
        """One partition."""
        return ["demo"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _DemoPartition:
        """Start generating from now."""
        return _DemoPartition(self.seed, self.rate, self.round_s, self.duration_s,
                              self.now_ms, self.on_round)
