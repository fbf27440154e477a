"""Wiring: build the sources, sinks and stores that settings ask for, then run the flow."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from bytewax.dataflow import Dataflow
from bytewax.testing import cluster_main, run_main

from connectors.files import (
    JsonDocSink,
    JsonlSource,
    SortedJsonlSink,
    alert_row,
    dead_letter_row,
    push_row,
)
from flows.experience import Outputs, build_flow
from flows.rules import RuleSet, load_default_rules, load_rules
from flows.settings import Settings
from state.profiles import InMemoryProfileStore, read_profiles_jsonl

__all__ = ["load_rule_set", "replay", "run_dataflow"]


def load_rule_set(settings: Settings) -> RuleSet:
    """The rules file from settings, or the shipped defaults."""
    return load_rules(settings.rules_file) if settings.rules_file else load_default_rules()


def run_dataflow(flow: Dataflow, workers: int, epoch_s: float) -> None:
    """Run a dataflow in this process with ``workers`` worker threads."""
    interval = timedelta(seconds=epoch_s)
    if workers <= 1:
        run_main(flow, epoch_interval=interval)  # type: ignore[no-untyped-call]
    else:
        cluster_main(flow, [], 0, epoch_interval=interval,  # type: ignore[no-untyped-call]
                     worker_count_per_proc=workers)


def replay(settings: Settings, events: Path) -> Path:
    """Replay a JSONL file in event time; write the four outputs to ``settings.out_dir``."""
    assert settings.out_dir is not None
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A sink partition that receives nothing is never built: start every file empty.
    for name in ("pushes.jsonl", "alerts.jsonl", "dead_letters.jsonl", "stats.json"):
        (out / name).write_bytes(b"")
    profiles = InMemoryProfileStore(
        read_profiles_jsonl(settings.profiles_file) if settings.profiles_file else ()
    )
    outputs = Outputs(
        pushes=[SortedJsonlSink(out / "pushes.jsonl", push_row)],
        alerts=[SortedJsonlSink(out / "alerts.jsonl", alert_row)],
        dead_letters=[SortedJsonlSink(out / "dead_letters.jsonl", dead_letter_row)],
        stats=[JsonDocSink(out / "stats.json")],
    )
    flow = build_flow(
        settings,
        source=JsonlSource(Path(events)),
        outputs=outputs,
        rules=load_rule_set(settings),
        profiles=profiles,
    )
    run_dataflow(flow, settings.engine.workers, settings.engine.epoch_interval_s)
    return out
