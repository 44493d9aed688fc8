"""`prefill-kit plot RUN_DIR [RUN_DIR ...] [-o curves.png]`: training curves of one run or several."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", help="plot reward, loss, KL and completion length of runs", description=__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    p.add_argument("-o", "--output", default=None, help="image file (default: curves.png in the first RUN_DIR)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from prefill_kit.extras import require_train
    from prefill_kit.runs.plots import plot_runs

    require_train("prefill-kit plot", ("matplotlib",))

    out = plot_runs(args.run_dirs, args.output)
    from prefill_kit.wording import count

    print(f"wrote {out} ({count(len(args.run_dirs), 'run')})", file=sys.stderr)
    return 0
