"""Trying rules on the past: run rule sets over the same recorded traffic and compare.

:func:`run_backtest` replays one events file once per rule set with the flow code of
``touchstream replay`` (:func:`flows.runner.replay` for a rules file; the same wiring
around :func:`flows.experience.build_flow` for a :class:`RuleSet` in memory), in event
time, so each run is deterministic. Per rule it reports pushes, distinct customers
reached, pushes blocked by each guard (from the run's ``stats.json``), quota
exhaustion time, and orders that followed within the attribution window
(:mod:`flows.attribution`), and per rule the difference between the new rule set and
the baseline. It writes ``backtest.json``, ``backtest.html`` (a bar chart in inline
SVG, no external resources) and, when matplotlib is installed, ``backtest.png``.
"""

from __future__ import annotations

import bisect
import html
import importlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows.attribution import (
    AttributionReport,
    HoldoutRecord,
    OrderRecord,
    PushRecord,
    attribute,
)
from flows.model import ClickEvent, Envelope, RawRecord, decode_record
from flows.rules import RuleSet, load_rules
from flows.runner import replay
from flows.settings import Settings

__all__ = ["BacktestReport", "RuleRun", "read_clicks", "read_holdouts", "render_html",
           "render_table", "run_backtest"]

log = logging.getLogger(__name__)

DEFAULT_WINDOW_MS = 24 * 3_600_000
NUMERIC = ("pushes", "customers", "orders", "blocked_total")


@dataclass(frozen=True, slots=True)
class RuleRun:
    """What one rule did in one run."""

    pushes: int
    customers: int
    blocked: Mapping[str, int]
    orders: int
    quota_exhausted_ms: int | None

    @property
    def blocked_total(self) -> int:
        """Pushes blocked by any guard."""
        return sum(self.blocked.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``quota_exhausted_ms`` is ``"n/a"`` when unknown)."""
        return {
            "pushes": self.pushes,
            "customers": self.customers,
            "blocked": dict(sorted(self.blocked.items())),
            "blocked_total": self.blocked_total,
            "orders": self.orders,
            "quota_exhausted_ms": ("n/a" if self.quota_exhausted_ms is None
                                   else self.quota_exhausted_ms),
        }


@dataclass(frozen=True, slots=True)
class RunResult:
    """One rule set's run: per rule, totals, attribution and where its outputs are."""

    label: str
    source: str
    version: int
    out_dir: Path
    rules: Mapping[str, RuleRun]
    attribution: AttributionReport
    pushes: int
    customers: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "label": self.label,
            "rules_source": self.source,
            "rules_version": self.version,
            "out_dir": str(self.out_dir),
            "pushes": self.pushes,
            "customers": self.customers,
            "orders": sum(r.orders for r in self.rules.values()),
            "rules": {k: v.to_dict() for k, v in sorted(self.rules.items())},
            "attribution": self.attribution.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class BacktestReport:
    """The new rule set's run, the baseline's (if any), and per-rule differences."""

    events: Path
    window_ms: int
    new: RunResult
    baseline: RunResult | None
    diff: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``backtest.json`` document."""
        return {
            "events": str(self.events),
            "attribution_window_s": self.window_ms // 1000,
            "new": self.new.to_dict(),
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "diff": {k: dict(v) for k, v in sorted(self.diff.items())},
        }


# --- reading the recorded traffic ---------------------------------------------------


def read_clicks(events: Path) -> Iterator[ClickEvent]:
    """Every decodable click of a JSONL events file (other lines are skipped here: the
    replay itself dead-letters them)."""
    with Path(events).open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line:
                continue
            env = decode_record(RawRecord(events.name, n, line))
            if type(env) is Envelope and type(env.event) is ClickEvent:
                yield env.event


class _HallIndex:
    """Where a customer was: the hall of their last click at or before a time."""

    def __init__(self, clicks: Iterable[ClickEvent], session_idle_ms: int) -> None:
        self._gap = session_idle_ms
        self._by: dict[str, list[tuple[int, str]]] = {}
        for c in clicks:
            self._by.setdefault(c.customer_id, []).append((c.ts, c.hall_id))
        for v in self._by.values():
            v.sort()

    def hall_at(self, customer_id: str, ts: int) -> str:
        """The hall, or ``-`` if the customer clicked nowhere within the session idle time
        (``engine.session_idle_s``, as the engine ends a session)."""
        seq = self._by.get(customer_id)
        if not seq:
            return "-"
        j = bisect.bisect_right(seq, (ts, "\uffff")) - 1
        if j < 0 or ts - seq[j][0] > self._gap:
            return "-"
        return seq[j][1]


# --- running one rule set -------------------------------------------------------------


def _replay_rules(settings: Settings, events: Path, rules: Path | RuleSet, out: Path) -> None:
    """One replay of ``events`` with ``rules`` into ``out``: :func:`flows.runner.replay`,
    the code of ``touchstream replay``."""
    rs = settings.model_copy(update={"mode": "replay", "out_dir": out})
    if isinstance(rules, Path):
        replay(rs.model_copy(update={"rules_file": rules}), events)
    else:
        replay(rs, events, rules)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


def _quota_exhausted(rule_id: str, stats_rule: Mapping[str, Any],
                     pushes: list[dict[str, Any]]) -> int | None:
    """When the rule's quota ran out: the stats' own figure if the engine reports one
    (``quota_exhausted_ms``), else the event time of the rule's last push when the
    stats show quota blocks (pushes stop once the quota is spent); None otherwise."""
    own = stats_rule.get("quota_exhausted_ms")
    if isinstance(own, int):
        return own
    blocked = stats_rule.get("blocked", {})
    if not any(k.startswith("quota") and n for k, n in blocked.items()):
        return None
    times = [int(p["event_ts"]) for p in pushes if p.get("rule_id") == rule_id]
    return max(times) if times else None


HOLDOUTS_FILE = "holdouts.jsonl"
"""A run's control-group records, if the replay writes them (one JSON object a line:
``rule_id``, ``customer_id``, ``ts`` or ``event_ts``, ``hall``, ``module``)."""


def read_holdouts(path: Path) -> list[HoldoutRecord]:
    """Control-group records from a JSONL file (none if it does not exist)."""
    if not path.exists():
        return []
    recs: list[HoldoutRecord] = []
    for d in _read_jsonl(path):
        ts = d.get("ts", d.get("event_ts"))
        module = d.get("module") or (d.get("content") or {}).get("module")
        if not isinstance(ts, int) or not isinstance(module, str):
            log.warning("%s: a control-group record without ts or module is skipped", path)
            continue
        recs.append(HoldoutRecord(str(d["rule_id"]), str(d["customer_id"]), ts,
                                  str(d.get("hall") or "-"), module))
    return recs


def _collect(label: str, source: str, version: int, rule_ids: Iterable[str], out: Path,
             orders: list[OrderRecord], halls: _HallIndex, window_ms: int,
             holdouts: Iterable[HoldoutRecord], campaigns: Mapping[str, str]) -> RunResult:
    pushes = _read_jsonl(out / "pushes.jsonl")
    text = (out / "stats.json").read_text(encoding="utf-8").strip()
    stats: dict[str, Any] = json.loads(text) if text else {}
    records = [PushRecord(p["push_id"], p["rule_id"], p["customer_id"], int(p["event_ts"]),
                          str(p["content"].get("module", "-")),
                          halls.hall_at(p["customer_id"], int(p["event_ts"])))
               for p in pushes]
    att = attribute(records, orders, window_ms,
                    [*holdouts, *read_holdouts(out / HOLDOUTS_FILE)], campaigns)
    stat_rules: dict[str, Any] = stats.get("rules", {})
    by_rule: dict[str, RuleRun] = {}
    for rid in sorted(set(rule_ids) | set(stat_rules) | {r.rule_id for r in records}):
        mine = [r for r in records if r.rule_id == rid]
        sr = stat_rules.get(rid, {})
        g = att.groups["rule"].get(rid)
        by_rule[rid] = RuleRun(
            pushes=len(mine),
            customers=len({r.customer_id for r in mine}),
            blocked={k: int(v) for k, v in sr.get("blocked", {}).items()},
            orders=g.converted if g is not None else 0,
            quota_exhausted_ms=_quota_exhausted(rid, sr, pushes),
        )
    return RunResult(label, source, version, out, by_rule, att, len(records),
                     len({r.customer_id for r in records}))


def _as_rules(rules: Path | RuleSet) -> RuleSet:
    return rules if isinstance(rules, RuleSet) else load_rules(rules)


def run_backtest(events: Path, rules: Path | RuleSet, baseline: Path | RuleSet | None,
                 profiles: Path | None, settings: Settings, out: Path, *,
                 window_ms: int = DEFAULT_WINDOW_MS,
                 holdouts: Iterable[HoldoutRecord] = (),
                 campaigns: Mapping[str, str] | None = None) -> BacktestReport:
    """Run ``rules`` (and ``baseline``) over ``events``; write the report to ``out``.

    Each run's replay outputs go to ``out/new/`` and ``out/baseline/``; the report to
    ``out/backtest.json``, ``out/backtest.html`` and (with matplotlib) ``backtest.png``.
    ``holdouts`` are control-group records for the attribution's uplift; ``campaigns``
    maps rule ids to campaign ids.

    :raises flows.rules.RulesError: a rules file is invalid.
    """
    events = Path(events)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if window_ms < 0:
        raise ValueError("the attribution window must be >= 0")
    base = settings.model_copy(update={"mode": "replay", "profiles_file": profiles})
    clicks = list(read_clicks(events))
    orders = [OrderRecord(c.customer_id, c.ts, c.module, c.hall_id)
              for c in clicks if c.action == "order" and c.module is not None]
    halls = _HallIndex(clicks, int(settings.engine.session_idle_s * 1000))
    hold = list(holdouts)
    camp = dict(campaigns or {})
    runs: list[RunResult] = []
    for label, rs_in in (("new", rules), ("baseline", baseline)):
        if rs_in is None:
            continue
        rs = _as_rules(rs_in)  # validate before running (and for the rule ids)
        d = out / label
        # a control-group file left by an earlier backtest into the same directory
        # must not be read as this run's
        (d / HOLDOUTS_FILE).unlink(missing_ok=True)
        _replay_rules(base, events, rs_in, d)
        runs.append(_collect(label, rs.source, rs.version, (r.id for r in rs.rules), d,
                             orders, halls, window_ms, hold, camp))
    new = runs[0]
    old = runs[1] if len(runs) > 1 else None
    diff: dict[str, dict[str, int]] = {}
    if old is not None:
        empty = RuleRun(0, 0, {}, 0, None)
        for rid in sorted(set(new.rules) | set(old.rules)):
            a = new.rules.get(rid, empty)
            b = old.rules.get(rid, empty)
            d2 = {k: int(getattr(a, k)) - int(getattr(b, k)) for k in NUMERIC}
            for g in sorted(set(a.blocked) | set(b.blocked)):
                d2[f"blocked:{g}"] = a.blocked.get(g, 0) - b.blocked.get(g, 0)
            diff[rid] = d2
    report = BacktestReport(events, window_ms, new, old, diff)
    (out / "backtest.json").write_text(
        json.dumps(report.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    (out / "backtest.html").write_text(render_html(report), encoding="utf-8")
    _maybe_png(report, out / "backtest.png")
    return report


# --- rendering ------------------------------------------------------------------------


def _fmt_ms(ms: int | None) -> str:
    if ms is None:
        return "n/a"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _rows(report: BacktestReport) -> list[list[str]]:
    new, old = report.new, report.baseline
    rows: list[list[str]] = []
    ids = sorted(set(new.rules) | (set(old.rules) if old else set()))
    empty = RuleRun(0, 0, {}, 0, None)
    for rid in ids:
        a = new.rules.get(rid, empty)
        blocked = ", ".join(f"{k}={v}" for k, v in sorted(a.blocked.items())) or "-"
        row = [rid, str(a.pushes), str(a.customers), blocked, str(a.orders),
               _fmt_ms(a.quota_exhausted_ms)]
        if old is not None:
            b = old.rules.get(rid, empty)
            d = report.diff.get(rid, {})
            row += [str(b.pushes), f"{d.get('pushes', 0):+d}", str(b.orders),
                    f"{d.get('orders', 0):+d}"]
        rows.append(row)
    return rows


def _header(report: BacktestReport) -> list[str]:
    h = ["rule", "pushes", "customers", "blocked", "orders", "quota exhausted"]
    if report.baseline is not None:
        h += ["base pushes", "Δ pushes", "base orders", "Δ orders"]
    return h


def render_table(report: BacktestReport) -> str:
    """The console table: one row per rule, then totals."""
    header = _header(report)
    rows = _rows(report)
    tot = ["TOTAL", str(report.new.pushes), str(report.new.customers), "",
           str(sum(r.orders for r in report.new.rules.values())), ""]
    if report.baseline is not None:
        bo = sum(r.orders for r in report.baseline.rules.values())
        no = sum(r.orders for r in report.new.rules.values())
        tot += [str(report.baseline.pushes), f"{report.new.pushes - report.baseline.pushes:+d}",
                str(bo), f"{no - bo:+d}"]
    rows.append(tot)
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, ["-" * w for w in widths], *rows]]
    return "\n".join(lines)


def _svg(report: BacktestReport) -> str:
    """Grouped bars per rule: pushes and orders, new (dark) vs baseline (light)."""
    ids = sorted(set(report.new.rules) | (set(report.baseline.rules) if report.baseline
                                          else set()))
    series: list[tuple[str, str, Mapping[str, RuleRun]]] = [
        ("new pushes", "#1f4e79", report.new.rules),
        ("new orders", "#2e7d32", report.new.rules)]
    if report.baseline is not None:
        series += [("baseline pushes", "#9ecae1", report.baseline.rules),
                   ("baseline orders", "#a5d6a7", report.baseline.rules)]

    def val(name: str, rules: Mapping[str, RuleRun], rid: str) -> int:
        r = rules.get(rid)
        if r is None:
            return 0
        return r.orders if name.endswith("orders") else r.pushes

    top = max([1] + [val(n, rs, rid) for n, _c, rs in series for rid in ids])
    bar, gap, h, left, base_y = 14, 24, 240, 40, 260
    group_w = bar * len(series) + gap
    width = left + group_w * max(1, len(ids)) + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{base_y + 110}" '
             'font-family="sans-serif" font-size="11">',
             f'<line x1="{left}" y1="{base_y}" x2="{width - 10}" y2="{base_y}" stroke="#333"/>',
             f'<text x="4" y="{base_y - h}">{top}</text>']
    for i, rid in enumerate(ids):
        x0 = left + i * group_w
        for j, (name, color, rules) in enumerate(series):
            v = val(name, rules, rid)
            bh = round(h * v / top)
            x = x0 + j * bar
            parts.append(f'<rect x="{x}" y="{base_y - bh}" width="{bar - 2}" height="{bh}" '
                         f'fill="{color}"><title>{html.escape(rid)}: {name} {v}</title></rect>')
            parts.append(f'<text x="{x + bar / 2 - 1}" y="{base_y - bh - 3}" '
                         f'text-anchor="middle" font-size="9">{v}</text>')
        parts.append(f'<text x="{x0}" y="{base_y + 14}" transform="rotate(30 {x0} '
                     f'{base_y + 14})">{html.escape(rid)}</text>')
    for j, (name, color, _rs) in enumerate(series):
        y = base_y + 80 + (j // 2) * 14
        x = left + (j % 2) * 160
        parts.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{x + 14}" y="{y}">{name}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: BacktestReport) -> str:
    """A self-contained HTML page: the chart (inline SVG) and the table."""
    header = _header(report)
    rows = _rows(report)
    table = ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in rows) + "</table>")
    title = f"touchstream backtest: {html.escape(report.new.source)}"
    if report.baseline is not None:
        title += f" vs {html.escape(report.baseline.source)}"
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>" + title
            + "</title><style>body{font-family:sans-serif}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
            "td:first-child{text-align:left}</style></head><body><h1>" + title + "</h1>"
            f"<p>Events: {html.escape(str(report.events))}; attribution window "
            f"{report.window_ms // 1000} s.</p>" + _svg(report) + table + "</body></html>\n")


def _maybe_png(report: BacktestReport, path: Path) -> bool:
    """A PNG bar chart when matplotlib is installed (the ``bench`` extra); else nothing."""
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return False
    ids = sorted(set(report.new.rules) | (set(report.baseline.rules) if report.baseline
                                          else set()))
    runs = [("new", report.new)] + ([("baseline", report.baseline)] if report.baseline
                                    else [])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(ids)), 4))
    w = 0.8 / (2 * len(runs))
    for j, (label, run) in enumerate(runs):
        for k, what in enumerate(("pushes", "orders")):
            xs = [i + (2 * j + k) * w for i in range(len(ids))]
            ys = [getattr(run.rules[r], what) if r in run.rules else 0 for r in ids]
            ax.bar(xs, ys, width=w, label=f"{label} {what}")
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(ids))], ids, rotation=30, ha="right")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
