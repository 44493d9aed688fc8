"""`prefill-kit export verl INPUT -o DIR`: chat data as a verl RL dataset, chat template and config overrides."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefill_kit.cli.render import INPUT_HELP, add_render_options


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export rendered data for another RL framework (verl)", description=__doc__)
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    verl = targets.add_parser("verl", help="a verl dataset (train.parquet), chat template and config overrides",
                              description=__doc__)
    verl.add_argument("input", help=INPUT_HELP)
    verl.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory (replaced whole)")
    add_render_options(verl)
    verl.add_argument("--data-source", help="verl's data_source of every row without its own "
                                            "(default: the input's name)")
    verl.add_argument("--ability", default="math", help="verl's ability of every row without its own (default: math)")
    verl.add_argument("--rewards", default="format,accuracy",
                      help="reward spec for prefill_kit.integrations.verl.compute_score (default: format,accuracy)")
    verl.set_defaults(func=run_verl)
    return p


def run_verl(args: argparse.Namespace) -> int:
    from prefill_kit.cli.render import progress_bar, render_options
    from prefill_kit.integrations.verl_export import export_verl, launch_command
    from prefill_kit.rewards import parse_reward_spec

    parse_reward_spec(args.rewards)  # a bad spec fails here, not on verl's first reward call
    options = render_options(args)
    # verl loads the model (and tokenizes) from this path, from wherever it is launched.
    model_path = str(Path(args.tokenizer).resolve()) if args.tokenizer and Path(args.tokenizer).exists() \
        else args.tokenizer
    bar = progress_bar(args)
    try:
        summary = export_verl(args.input, args.output, options, data_source=args.data_source, ability=args.ability,
                              rewards=args.rewards, model_path=model_path, batch_size=args.batch_size,
                              progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    print(f"exported {summary.rows} rows to {summary.directory}: {', '.join(summary.files)}", file=sys.stderr)
    print(f"response prefix: {summary.response_prefix!r}  written by the chat template after its generation "
          f"prompt: {summary.generation_suffix!r}  template: {options.template.name}", file=sys.stderr)
    if summary.rejected:
        print(f"rejected: {summary.rejected} rows (see {summary.directory / 'rejects.jsonl'})", file=sys.stderr)
    if summary.without_ground_truth:
        print(f"warning: {summary.without_ground_truth} rows have no reference answer (ground_truth null): "
              "accuracy cannot judge them", file=sys.stderr)
    if options.check_tokens:
        print(f"token audit: {summary.boundary_merges} of {summary.rows} rows have a boundary merge", file=sys.stderr)
    print(launch_command(summary.directory, model_path))
    return 0
