"""`prefill-kit inspect RUN_DIR`: the completions a run logged, with the prefix highlighted and every score.

Examples:
  prefill-kit inspect runs/tiny --worst 5                 # the five lowest total rewards of the run
  prefill-kit inspect runs/tiny --step 10 --best 3 --reward accuracy
  prefill-kit inspect runs/tiny --step 10 --html step10.html   # one self-contained page to share
"""

from __future__ import annotations

import argparse
import sys

from prefill_kit.cli.args import positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="show logged completions next to their rewards", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its completions.jsonl)")
    p.add_argument("--step", type=int, help="only this step's completions (default: every logged step)")
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--worst", type=positive_int, metavar="K", help="the K lowest-scoring completions")
    rank.add_argument("--best", type=positive_int, metavar="K", help="the K highest-scoring completions")
    p.add_argument("--reward", metavar="NAME",
                   help="rank or sort by this reward's score instead of the total reward")
    p.add_argument("--html", metavar="FILE", help="also write the table as one self-contained HTML page")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="highlight the prefix with terminal colours (auto: when stdout is a terminal); "
                        "without colour it is shown between « and »")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from prefill_kit.runs.inspect import load_completions, reward_names, rows_as_text, select, write_html

    rows = load_completions(args.run_dir)
    names = reward_names(rows)
    shown = select(rows, step=args.step, worst=args.worst, best=args.best, reward=args.reward)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    if shown:
        print(rows_as_text(shown, names, color=color))
    from prefill_kit.wording import count

    print(f"{len(shown)} of {count(len(rows), 'logged completion')}", file=sys.stderr)
    if args.html:
        what = " ".join(f"--{k} {v}" for k, v in vars(args).items()
                        if k in ("step", "worst", "best", "reward") and v is not None)
        out = write_html(args.html, shown, title=f"{args.run_dir} {what}".strip())
        print(f"wrote {out}", file=sys.stderr)
    return 0
