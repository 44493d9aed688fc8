"""`prefill-kit render INPUT`: chat data in, prefilled GRPO prompts out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("render", help="render chat data into prefilled prompts", description=__doc__)
    p.add_argument("input", help="JSON Lines file: `messages`, or a prompt/query/question/problem string")
    p.add_argument("-o", "--output", help="output file (default: INPUT_STEM.prefilled.jsonl; '-' for stdout)")
    p.add_argument("--template", help="shipped name, .jinja file, model dir or tokenizer_config.json "
                                      "(default: the tokenizer's own, else chatml)")
    p.add_argument("--tokenizer", help="model/tokenizer directory: its template, and `prompt_ids` columns")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prefix", default="", help=r"response prefix; \n \t \r \\ \uXXXX are decoded")
    group.add_argument("--prefix-file", help="read the prefix verbatim from this file")
    p.add_argument("--continue-final", action="store_true",
                   help="continue a trailing assistant message instead of treating it as the reference answer")
    p.add_argument("--template-kwargs", default="{}", help='JSON object passed to the template, '
                                                           'e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N rendered prompts, prefix highlighted")
    p.set_defaults(func=run)
    return p


def _options(args: argparse.Namespace):
    import json

    from prefill_kit.errors import ConfigError
    from prefill_kit.pipeline import RenderOptions, load_tokenizer, resolve_template
    from prefill_kit.render import decode_escapes

    try:
        template_kwargs = json.loads(args.template_kwargs)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--template-kwargs: invalid JSON: {exc}") from None
    if not isinstance(template_kwargs, dict):
        raise ConfigError("--template-kwargs: expected a JSON object")
    if args.prefix_file:
        prefix = Path(args.prefix_file).read_text(encoding="utf-8")
    else:
        prefix = decode_escapes(args.prefix)
    tokenizer = load_tokenizer(args.tokenizer)
    return RenderOptions(resolve_template(args.template, tokenizer), prefix, args.continue_final,
                         template_kwargs, "auto", tokenizer)


def show_prompt(prompt: str, prefix: str, stream) -> None:
    """Print a prompt with its prefix highlighted (reverse video on a terminal, brackets otherwise)."""
    head = prompt[: len(prompt) - len(prefix)] if prefix and prompt.endswith(prefix) else prompt
    tail = prompt[len(head):]
    mark = ("\x1b[7m", "\x1b[0m") if stream.isatty() else ("⟦", "⟧")
    stream.write(f"{head}{mark[0]}{tail}{mark[1]}\n" if tail else f"{head}\n")


def run(args: argparse.Namespace) -> int:
    from prefill_kit.render_file import render_jsonl

    options = _options(args)
    source = Path(args.input)
    output = args.output or str(source.with_name(f"{source.stem}.prefilled.jsonl"))
    summary = render_jsonl(source, output, options)
    for row in summary.sample[: args.show]:
        print("-" * 60, file=sys.stderr)
        show_prompt(row["prompt"], row["prefix"], sys.stderr)
    print(f"rendered {summary.rows_out} rows  template: {options.template.name}  "
          f"prefix: {options.prefix!r}  output: {output}", file=sys.stderr)
    return 0
