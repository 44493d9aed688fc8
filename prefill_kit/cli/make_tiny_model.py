"""`prefill-kit make-tiny-model DIR`: a tiny random model and tokenizer for trying things offline."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("make-tiny-model", help="write a tiny random Qwen2-style model + tokenizer to DIR",
                       description=__doc__)
    p.add_argument("dir", help="output directory")
    p.add_argument("--template", default="chatml", help="chat template spec for the tokenizer (default: chatml)")
    p.add_argument("--add-bos", action="store_true", help="tokenizer prepends <s> like Llama's")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from prefill_kit.extras import require_train
    from prefill_kit.templates import load_template

    require_train("prefill-kit make-tiny-model", ("torch",))
    from prefill_kit.cli.quiet import library_chatter_off
    from prefill_kit.tiny_model import make_tiny_model

    with library_chatter_off():
        out = make_tiny_model(args.dir, chat_template=load_template(args.template).source, add_bos=args.add_bos,
                              num_layers=args.layers, hidden_size=args.hidden_size, seed=args.seed)
    print(f"tiny model written to {out}", file=sys.stderr)
    return 0
