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
    from prefill_kit import __version__

    parser = argparse.ArgumentParser(prog="prefill-kit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"prefill-kit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"prefill_kit.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"prefill_kit.cli.{name}":
                continue
            raise
        command = module.add_parser(sub)
        command.set_defaults(_parser=command)  # an unknown option is reported with this command's usage
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every way out is one line on stderr and an exit code, never a traceback.

    2: an error the library raised on purpose; 130: Ctrl-C (the work already unwound its temp files); 143
    (128 + SIGTERM): `timeout` or a job scheduler stopped it, unwound as Ctrl-C is;
    141 (128 + SIGPIPE, what a shell reports for a killed writer): the reader of stdout went away,
    as with `| head`.
    """
    from prefill_kit.interrupts import Terminated, sigterm_as_interrupt

    _quiet_core_install()
    command = "prefill-kit"
    try:
        with sigterm_as_interrupt():
            args, unknown = build_parser().parse_known_args(argv)
            if unknown:
                args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            command = f"prefill-kit {args.command}"
            with _warnings_above_progress_bars():
                return int(args.func(args) or 0)
    except PrefillKitError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141


def _quiet_core_install() -> None:
    """Without torch (the core install) transformers advises at import that models are unavailable; prefill-kit's
    core needs only its tokenizers, so the advice is noise on every `--tokenizer` run."""
    import importlib.util
    import os

    if importlib.util.find_spec("torch") is None:
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _warnings_above_progress_bars():
    """The library's warnings (run health, skipped rows) as lines on stderr printed with `tqdm.write`, so that
    they appear above a progress bar instead of inside it."""
    import logging

    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[logging.getLogger("prefill_kit")])


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not report the broken pipe again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
