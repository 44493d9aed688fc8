"""prefill-kit: render prefilled GRPO prompts, score completions, and train with GRPO.

The only place that prints for the user or exits.

Each subcommand lives in its own module of this package and exposes
`add_parser(subparsers) -> argparse.ArgumentParser`, whose parser sets `func=run`;
`run(args) -> int` returns the exit code. Modules import only the standard library
at the top, so `prefill-kit --help` stays fast; heavy imports go inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from prefill_kit.errors import PrefillKitError

# Subcommand modules, in the order `--help` lists them. A module that is not there yet is skipped.
SUBCOMMANDS = ("render", "templates", "reward", "export", "integrations", "train", "plot", "preflight", "inspect",
               "make_tiny_model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefill-kit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"prefill_kit.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"prefill_kit.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PrefillKitError as exc:
        print(f"prefill-kit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prefill-kit {args.command}: interrupted", file=sys.stderr)
        return 130
