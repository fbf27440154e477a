"""The ``touchstream`` command: ``run`` (live), ``replay`` (event time), ``rules validate``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from connectors.console import ConsoleView
from connectors.demo import DemoSource, demo_profiles
from flows.experience import Outputs, build_flow, system_now_ms
from flows.rules import RulesError, load_rules
from flows.runner import load_rule_set, replay, run_dataflow
from flows.settings import Settings, load_settings
from state.profiles import InMemoryProfileStore, read_profiles_jsonl

__all__ = ["main"]

log = logging.getLogger("touchstream")


def _engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    engine: dict[str, Any] = {}
    for name in ("workers", "shards"):
        v = getattr(args, name, None)
        if v is not None:
            engine[name] = v
    return engine


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    engine = _engine_overrides(args)
    if engine:
        overrides["engine"] = engine
    return load_settings(getattr(args, "config", None), **overrides)


def cmd_run(args: argparse.Namespace) -> int:
    """Live mode on the embedded default: demo traffic, in-memory state, console view."""

    settings = _settings(args, mode="live", rules_file=args.rules, profiles_file=args.profiles,
                         demo_seed=args.seed, demo_rate=args.rate)
    rules = load_rule_set(settings)
    profiles = InMemoryProfileStore(
        read_profiles_jsonl(settings.profiles_file) if settings.profiles_file else ()
    )

    def on_round(rnd: int, start_ms: int) -> None:
        profiles.put_many(demo_profiles(rnd, start_ms))

    view = ConsoleView()
    sinks = view.sinks()
    source = DemoSource(seed=settings.demo_seed, rate=settings.demo_rate,
                        duration_s=args.duration, on_round=on_round, now_ms=system_now_ms)
    flow = build_flow(
        settings,
        source=source,
        outputs=Outputs(pushes=[sinks["pushes"]], alerts=[sinks["alerts"]],
                        dead_letters=[sinks["dead_letters"]], stats=[sinks["stats"]]),
        rules=rules,
        profiles=profiles,
    )
    print(f"touchstream: live on built-in demo traffic; rules {rules.source} "
          f"v{rules.version} ({len(rules.rules)} rules); in-memory state; "
          + (f"stopping after {args.duration:g} s" if args.duration else "Ctrl-C to stop"),
          flush=True)
    run_dataflow(flow, settings.engine.workers, settings.engine.epoch_interval_s)
    print(f"touchstream: done: {view.counts['push']} pushes, {view.counts['alert']} alerts, "
          f"{view.counts['dead_letter']} dead letters", flush=True)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay a JSONL file in event time and write the four output files."""

    settings = _settings(args, mode="replay", rules_file=args.rules,
                         profiles_file=args.profiles, out_dir=args.out)
    out = replay(settings, args.events)
    print(f"touchstream: replay of {args.events} written to {out}/", flush=True)
    return 0


def cmd_rules_validate(args: argparse.Namespace) -> int:
    """Validate a rules file; print every problem; exit 1 if any."""
    try:
        rs = load_rules(args.file)
    except RulesError as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        return 1
    print(f"{args.file}: OK, version {rs.version}, {len(rs.rules)} rules: "
          + ", ".join(f"{r.id}({r.kind})" for r in rs.rules))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="touchstream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--rules", type=Path, help="rules YAML (default: the shipped rules)")
        sp.add_argument("--profiles", type=Path, help="profiles JSONL")
        sp.add_argument("--config", type=Path, help="TOML settings file")
        sp.add_argument("--workers", type=int, help="worker threads (default 1)")
        sp.add_argument("--shards", type=int, help="customer state shards (default 64)")

    run = sub.add_parser("run", help="live engine on built-in demo traffic")
    common(run)
    run.add_argument("--duration", type=float, help="stop after this many seconds")
    run.add_argument("--seed", type=int, default=7, help="demo traffic seed")
    run.add_argument("--rate", type=float, default=20.0, help="demo background events/s")
    run.set_defaults(func=cmd_run)

    rp = sub.add_parser("replay", help="replay a JSONL file in event time")
    rp.add_argument("events", type=Path)
    common(rp)
    rp.add_argument("--out", type=Path, required=True, help="output directory")
    rp.set_defaults(func=cmd_replay)

    rules = sub.add_parser("rules", help="rules files")
    rsub = rules.add_subparsers(dest="rules_command", required=True)
    val = rsub.add_parser("validate", help="check a rules file")
    val.add_argument("file", type=Path)
    val.set_defaults(func=cmd_rules_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``touchstream`` console script."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RulesError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"touchstream: bad settings:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
