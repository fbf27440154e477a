"""``python -m gateway [token TERMINAL_ID | serve] ...``: the same as ``touchstream gateway``."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from gateway.cli import add_commands


def main(argv: list[str] | None = None) -> int:
    """Parse ``gateway`` subcommands and run one."""
    parser = argparse.ArgumentParser(prog="python -m gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(["gateway", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except ValidationError as exc:
        print(f"touchstream gateway: bad settings:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
