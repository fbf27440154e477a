"""The ``touchstream`` command line (:func:`main`); ``touchstream --help`` lists it."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from connectors.console import ConsoleView
from connectors.kafka import create_topics
from connectors.rules_sources import (
    publish_kafka,
    publish_redis,
    read_kafka_rules,
)
from flows.backtest import render_table, run_backtest
from flows.codec import json_loads
from flows.control import ActiveRules, RulesChange, dumps_doc, parse_change, ruleset_doc
from flows.rules import RulesError, load_rules, parse_duration_ms
from flows.runner import (
    RecoveryDirError,
    all_topics,
    load_rule_set,
    load_rules_doc,
    recovery_dir,
    replay,
    run_live,
)
from flows.settings import Settings, load_settings
from flows.shutdown import StopRequest, handle_stop_signals
from gateway.cli import add_commands as add_gateway_commands
from state.profiles import read_profiles_jsonl
from state.redis_store import RedisProfileStore, make_client

__all__ = ["main"]

log = logging.getLogger("touchstream")


def _engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    engine: dict[str, Any] = {}
    for name in ("workers", "shards", "process_id", "addresses"):
        v = getattr(args, name, None)
        if v is not None:
            engine[name] = v
    return engine


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    engine = _engine_overrides(args)
    if engine:
        overrides["engine"] = engine
    return load_settings(getattr(args, "config", None), **overrides)


class FlagError(ValueError):
    """A command-line flag that must not be used as given."""


def _check_redis_flag(url: str) -> None:
    """Refuse a ``--redis`` URL with a password: argv is visible to every local user."""
    try:
        has_password = urlsplit(url).password is not None
    except ValueError:
        has_password = False  # not a URL at all: the settings check reports it
    if has_password:
        raise FlagError(
            "--redis: the URL holds a password, and command-line arguments are visible to "
            "every local user (ps, /proc); give the URL without it and the password in "
            "TOUCHSTREAM_REDIS__PASSWORD_FILE (a file), TOUCHSTREAM_REDIS__PASSWORD or the "
            "[redis] section of the --config file, or the whole URL in TOUCHSTREAM_REDIS__URL"
        )


def _wire_overrides(args: argparse.Namespace) -> dict[str, Any]:
    over: dict[str, Any] = {}
    if getattr(args, "kafka", None):
        over["kafka"] = {"brokers": args.kafka}
    if getattr(args, "redis", None):
        _check_redis_flag(args.redis)
        over["redis"] = {"url": args.redis}
    if getattr(args, "webhook", None):
        over["webhook_url"] = args.webhook
    return over


def _recovery_overrides(args: argparse.Namespace) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    if getattr(args, "no_recovery", False):
        rec["enabled"] = False
    if getattr(args, "recovery_dir", None) is not None:
        rec["dir"] = args.recovery_dir
    if getattr(args, "snapshot_interval", None) is not None:
        rec["snapshot_interval_s"] = args.snapshot_interval
    return {"recovery": rec} if rec else {}


def _merge(settings: Settings, over: dict[str, Any]) -> Settings:
    """Flags win: re-validate with the flag values laid over the loaded sections."""
    if not over:
        return settings
    data = settings.model_dump()
    for key, val in over.items():
        if isinstance(val, dict):
            data[key] = {**data.get(key, {}), **val}
        else:
            data[key] = val
    # model_dump keeps SecretStr values as SecretStr, which validate again unchanged.
    return Settings.model_validate(data)


def cmd_run(args: argparse.Namespace) -> int:
    """Live: demo traffic or Kafka in; console, Redis push streams, Kafka, webhooks out."""
    settings = _merge(
        _settings(args, mode="live", rules_file=args.rules, profiles_file=args.profiles,
                  demo_seed=args.seed, demo_rate=args.rate),
        _wire_overrides(args) | _recovery_overrides(args),
    )
    es = settings.engine
    if es.addresses and not settings.kafka.brokers:
        print("touchstream: a multi-process cluster (-a/--addresses) needs Kafka input "
              "(--kafka): demo traffic is one generator in one process, and the demo profiles "
              "it loads live in that process's memory, so customers whose shards run on "
              "another process would get empty profiles", file=sys.stderr)
        return 2
    rules = load_rule_set(settings)
    view = ConsoleView()
    where = [f"Kafka {settings.kafka.brokers}" if settings.kafka.brokers else
             "built-in demo traffic",
             "Redis state and push streams" if settings.redis.url else "in-memory state"]
    if settings.webhook_targets():
        where.append(f"{len(settings.webhook_targets())} webhook target(s)")
    if es.addresses:
        where.append(f"process {es.process_id} of {len(es.addresses)} "
                     f"({es.addresses[es.process_id or 0]})")
    if settings.recovery_on():
        where.append(f"recovery in {recovery_dir(settings)} every "
                     f"{settings.recovery.snapshot_interval_s:g} s")
    print(f"touchstream: live on {', '.join(where)}; rules {rules.source} "
          f"v{rules.version} ({len(rules.rules)} rules); "
          + (f"stopping after {args.duration:g} s" if args.duration else
             "Ctrl-C or SIGTERM to stop"),
          flush=True)
    stop = StopRequest()
    # From here on SIGTERM / Ctrl-C stop cleanly, also while the flow is being set up.
    with handle_stop_signals(stop):
        run_live(settings, duration_s=args.duration, console=view, stop=stop,
                 handle_signals=False)
    how = f"stopped by {stop.reason}" if stop.is_set() else "done"
    print(f"touchstream: {how}: {view.counts['push']} pushes, {view.counts['alert']} alerts, "
          f"{view.counts['dead_letter']} dead letters", flush=True)
    return 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    """Create every topic with the partition counts from settings (idempotent)."""
    settings = _merge(_settings(args), _wire_overrides(args))
    if not settings.kafka.brokers:
        print("touchstream: --kafka (or TOUCHSTREAM_KAFKA__BROKERS) is required",
              file=sys.stderr)
        return 2
    topics = all_topics(settings)
    created = create_topics(settings.kafka.brokers, topics,
                            settings.kafka.replication_factor, dict(settings.kafka.config))
    for name, parts in topics.items():
        state = "created" if name in created else "exists"
        print(f"{name}: {parts} partitions ({state})")
    return 0


def cmd_profiles_load(args: argparse.Namespace) -> int:
    """Load a profiles JSONL file into Redis (one hash per customer)."""
    settings = _merge(_settings(args), _wire_overrides(args))
    if settings.redis.url is None:
        print("touchstream: --redis (or TOUCHSTREAM_REDIS__URL) is required", file=sys.stderr)
        return 2
    client = make_client(settings.redis)
    try:
        n = RedisProfileStore(client).put_many(read_profiles_jsonl(args.file))
    finally:
        client.close()
    print(f"touchstream: loaded {n} profiles into Redis")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay a JSONL file in event time and write the four output files."""

    settings = _settings(args, mode="replay", rules_file=args.rules,
                         profiles_file=args.profiles, out_dir=args.out)
    out = replay(settings, args.events)
    print(f"touchstream: replay of {args.events} written to {out}/", flush=True)
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    """Run rule sets over recorded traffic; print the table, write JSON and charts."""
    try:
        window_ms = parse_duration_ms(args.window)
    except (ValueError, TypeError) as exc:
        print(f"touchstream: --window: {exc}", file=sys.stderr)
        return 2
    settings = _settings(args, mode="replay", profiles_file=args.profiles)
    report = run_backtest(args.events, args.rules, args.baseline, args.profiles, settings,
                          args.out, window_ms=window_ms)
    print(render_table(report))
    print(f"touchstream: backtest of {args.events} written to {args.out}/ "
          "(backtest.json, backtest.html"
          + (", backtest.png" if (args.out / "backtest.png").exists() else "") + ")",
          flush=True)
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


def _rules_change(args: argparse.Namespace) -> RulesChange:
    """The change ``rules publish`` was asked to send (checked locally)."""
    if args.delete:
        if args.version is None or args.file is not None or args.rule:
            raise FlagError("--delete ID needs --version N (and no FILE or --rule)")
        return RulesChange("delete", args.version, "cli", rule_id=args.delete,
                           base_version=args.base_version)
    if args.file is None:
        raise FlagError("give a rules FILE (or --delete ID --version N)")
    doc = ruleset_doc(args.file.read_bytes(), str(args.file))
    if args.rule:
        rule = next((r for r in doc["rules"] if r.get("id") == args.rule), None)
        if rule is None:
            raise FlagError(f"{args.file} has no rule {args.rule!r}")
        return RulesChange("upsert", int(doc["version"]), str(args.file), rule=rule,
                           base_version=args.base_version)
    ch = RulesChange.replace(doc, str(args.file))
    return RulesChange("replace", ch.version, ch.origin, ruleset=doc,
                       base_version=args.base_version)


def cmd_rules_publish(args: argparse.Namespace) -> int:
    """Publish a rule change to ``ops.rules`` (Kafka) or the rules key (Redis)."""
    if bool(args.kafka) == bool(args.redis):
        raise FlagError("give exactly one of --kafka or --redis")
    settings = _merge(_settings(args), _wire_overrides(args))
    ch = _rules_change(args)
    if settings.kafka.brokers and args.kafka:
        publish_kafka(settings.kafka.brokers, ch, settings.kafka.rules_topic,
                      settings.kafka.for_producers())
        where = f"Kafka {settings.kafka.rules_topic}"
    else:
        if ch.op != "replace":
            raise FlagError("the Redis key holds whole rule sets: --rule and --delete need "
                            "--kafka")
        client = make_client(settings.redis)
        try:
            publish_redis(client, ch, settings.redis.rules_key, settings.redis.rules_channel)
        finally:
            client.close()
        where = f"Redis {settings.redis.rules_key}"
    what = {"replace": "rule set", "upsert": f"rule {ch.rule and ch.rule['id']!r}",
            "delete": f"deletion of rule {ch.rule_id!r}"}[ch.op]
    print(f"touchstream: {what} version {ch.version} published to {where}; the engine's "
          f"decision goes to {settings.kafka.rules_status_topic} and its log")
    return 0


def cmd_rules_show(args: argparse.Namespace) -> int:
    """Print the active rule set's version and rules (with --json the whole set)."""
    settings = _merge(_settings(args, rules_file=args.rules), _wire_overrides(args))
    active = load_rules_doc(settings)
    where = active.origin
    if args.redis:
        client = make_client(settings.redis)
        try:
            raw = client.get(settings.redis.rules_key)
            running = client.get("ops:rules")  # what the engine accepted (the /ops console)
        finally:
            client.close()
        if running is not None and not args.json:
            eng = json_loads(running)
            print(f"engine: version {eng.get('version')} in force (ops:rules)")
        if raw is None:
            print(f"touchstream: Redis {settings.redis.rules_key} holds no rule set",
                  file=sys.stderr)
            return 1
        ch = parse_change(raw, f"redis:{settings.redis.rules_key}")
        if ch.ruleset is None:
            raise RulesError([f"redis:{settings.redis.rules_key}: does not hold a whole rule set"])
        active = ActiveRules.of(ruleset_doc(ch.ruleset, ch.origin), ch.origin)
        where = f"Redis {settings.redis.rules_key}"
    elif args.kafka and settings.kafka.brokers:
        active, statuses = read_kafka_rules(settings.kafka.brokers, active,
                                            settings.kafka.rules_topic,
                                            settings.kafka.for_consumers())
        where = f"Kafka {settings.kafka.rules_topic} ({len(statuses)} change(s) read)"
    if args.json:
        print(dumps_doc(active.doc))
        return 0
    ids = [r.get("id") for r in active.doc.get("rules", []) if isinstance(r, dict)]
    print(f"version {active.version} ({active.digest}) from {where}; last change from "
          f"{active.origin}; {len(ids)} rules: {', '.join(str(i) for i in ids)}")
    return 0


def _positive_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="touchstream",
        description="Real-time experience engine: joins terminal clicks with network "
        "signals per customer, pushes demos to terminals and phones, alerts operations. "
        "With no options, `touchstream run` plays built-in demo traffic on in-memory state.",
        epilog="`touchstream <command> --help` for a command's options; README.md for the "
        "rules, settings and deployment.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--rules", type=Path, help="rules YAML (default: the shipped rules)")
        sp.add_argument("--profiles", type=Path, help="profiles JSONL")
        sp.add_argument("--config", type=Path, help="TOML settings file")
        sp.add_argument("--workers", type=int, help="worker threads (default 1)")
        sp.add_argument("--shards", type=int, help="customer state shards (default 64)")

    def wires(sp: argparse.ArgumentParser, *which: str) -> None:
        if "kafka" in which:
            sp.add_argument("--kafka", metavar="HOST:PORT", help="Kafka bootstrap servers")
        if "redis" in which:
            sp.add_argument("--redis", metavar="URL", help="redis://HOST:PORT/DB")
        if "webhook" in which:
            sp.add_argument("--webhook", metavar="URL",
                            help="alert webhook (secret: TOUCHSTREAM_WEBHOOK_SECRET_FILE or "
                            "TOUCHSTREAM_WEBHOOK_SECRET; a URL that is itself a credential, "
                            "like Slack's, belongs in TOUCHSTREAM_WEBHOOK_URL: flags show in ps)")

    run = sub.add_parser("run", help="live engine (demo traffic unless --kafka)")
    common(run)
    wires(run, "kafka", "redis", "webhook")
    run.add_argument("--duration", type=float, help="stop after this many seconds")
    run.add_argument("--seed", type=int, default=7, help="demo traffic seed")
    run.add_argument("--rate", type=float, default=20.0, help="demo background events/s")
    rec = run.add_argument_group(
        "recovery", "snapshots of state and input offsets, to resume after a crash or stop "
        "(on by default with --kafka)")
    rec.add_argument("--recovery-dir", type=Path, metavar="DIR",
                     help="recovery directory (default ./touchstream-recovery; made on first "
                     "start)")
    rec.add_argument("--no-recovery", action="store_true",
                     help="no snapshots: a restart starts from scratch (kafka.start)")
    rec.add_argument("--snapshot-interval", type=_positive_seconds, metavar="SECONDS",
                     help="snapshot (and epoch) interval: the most a crash makes the "
                     "engine read again (default 10)")
    run.add_argument("-i", "--process-id", type=int, metavar="N",
                     help="multi-process cluster: this process's index in --addresses "
                     "(needs --kafka)")
    run.add_argument("-a", "--addresses", metavar="HOST:PORT;HOST:PORT...",
                     help="multi-process cluster: every process's host:port, the same list "
                     "in the same order on each process")
    run.set_defaults(func=cmd_run)

    rp = sub.add_parser("replay", help="replay a JSONL file in event time")
    rp.add_argument("events", type=Path)
    common(rp)
    rp.add_argument("--out", type=Path, required=True, help="output directory")
    rp.set_defaults(func=cmd_replay)

    bt = sub.add_parser("backtest", help="run rule sets over recorded traffic and compare")
    bt.add_argument("events", type=Path, help="recorded events (JSONL)")
    bt.add_argument("--rules", type=Path, required=True, help="the rules to try (YAML)")
    bt.add_argument("--baseline", type=Path, help="the rules to compare with (YAML)")
    bt.add_argument("--profiles", type=Path, help="profiles JSONL")
    bt.add_argument("--config", type=Path, help="TOML settings file")
    bt.add_argument("--workers", type=int, help="worker threads (default 1)")
    bt.add_argument("--shards", type=int, help="customer state shards (default 64)")
    bt.add_argument("--out", type=Path, required=True, help="output directory")
    bt.add_argument("--window", default="24h",
                    help="attribution window: push -> order of the pushed module (default 24h)")
    bt.set_defaults(func=cmd_backtest)

    topics = sub.add_parser("topics", help="Kafka topics")
    tsub = topics.add_subparsers(dest="topics_command", required=True)
    tc = tsub.add_parser("create", help="create every topic (idempotent)")
    tc.add_argument("--config", type=Path, help="TOML settings file")
    wires(tc, "kafka")
    tc.set_defaults(func=cmd_topics_create)

    prof = sub.add_parser("profiles", help="customer profiles")
    psub = prof.add_subparsers(dest="profiles_command", required=True)
    pl = psub.add_parser("load", help="load a profiles JSONL file into Redis")
    pl.add_argument("file", type=Path)
    pl.add_argument("--config", type=Path, help="TOML settings file")
    wires(pl, "redis")
    pl.set_defaults(func=cmd_profiles_load)

    rules = sub.add_parser("rules", help="rules files")
    rsub = rules.add_subparsers(dest="rules_command", required=True)
    val = rsub.add_parser("validate", help="check a rules file")
    val.add_argument("file", type=Path)
    val.set_defaults(func=cmd_rules_validate)
    pub = rsub.add_parser("publish", help="send a rule change to the running engine "
                          "(validated here first; the engine validates it again)")
    pub.add_argument("file", type=Path, nargs="?", help="rules YAML (the whole set)")
    pub.add_argument("--rule", metavar="ID", help="publish only this rule of FILE (an "
                     "upsert; the change's version is FILE's version)")
    pub.add_argument("--delete", metavar="ID", help="delete this rule (needs --version)")
    pub.add_argument("--version", type=int, help="the rule set version a --delete makes")
    pub.add_argument("--base-version", type=int, metavar="N",
                     help="apply only if the active version is N")
    pub.add_argument("--config", type=Path, help="TOML settings file")
    wires(pub, "kafka", "redis")
    pub.set_defaults(func=cmd_rules_publish)
    show = rsub.add_parser("show", help="the active rule set and its version (from "
                           "--redis, from --kafka ops.rules, or the rules file)")
    show.add_argument("--rules", type=Path, help="the start rules (default: the shipped "
                      "rules)")
    show.add_argument("--json", action="store_true", help="print the whole set as JSON")
    show.add_argument("--config", type=Path, help="TOML settings file")
    wires(show, "kafka", "redis")
    show.set_defaults(func=cmd_rules_show)

    add_gateway_commands(sub)  # touchstream gateway token|serve (gateway/cli.py)
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
    except (FlagError, RecoveryDirError) as exc:
        print(f"touchstream: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
