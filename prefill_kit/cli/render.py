"""`prefill-kit render INPUT`: chat data in, prefilled GRPO prompts out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefill_kit.cli.args import positive_int

DEFAULT_SHOTS = 4
FORMATS = ("auto", "messages", "sharegpt", "alpaca", "query", "prompt", "problem")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("render", help="render chat data into prefilled prompts", description=__doc__)
    p.add_argument("input", help=INPUT_HELP)
    p.add_argument("-o", "--output", help="output .jsonl, .parquet or directory (save_to_disk) "
                                          "(default: INPUT_STEM.prefilled.jsonl; '-' for stdout)")
    p.add_argument("--output-format", choices=("jsonl", "parquet", "hf"),
                   help="output format (default: from the output's extension)")
    add_render_options(p)
    p.add_argument("--continue-final", action="store_true",
                   help="continue a trailing assistant message instead of treating it as the reference answer")
    p.add_argument("--num-proc", type=int, default=1, metavar="N", help="render with N processes")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N rendered prompts, prefix highlighted")
    p.set_defaults(func=run)
    return p


INPUT_HELP = ".jsonl, .json, .parquet, .csv, .arrow, a save_to_disk directory, or a directory or glob of shards"


def add_render_options(p: argparse.ArgumentParser) -> None:
    """The options that decide how rows render, shared by `render` and `export`."""
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="input data format (default: detected from the columns)")
    p.add_argument("--columns", default="{}", metavar="JSON",
                   help='rename input columns before detection, e.g. \'{"instruction_text": "prompt"}\'')
    p.add_argument("--template", help="shipped name, .jinja file, model dir or tokenizer_config.json "
                                      "(default: the tokenizer's own, else chatml)")
    p.add_argument("--tokenizer", help="model/tokenizer directory: its template, and `prompt_ids` columns")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prefix", default="", help=r"response prefix; \n \t \r \\ \uXXXX are decoded")
    group.add_argument("--prefix-file", help="read the prefix verbatim from this file")
    p.add_argument("--template-kwargs", default="{}", help='JSON object passed to the template, '
                                                           'e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--on-error", default="fail", choices=("fail", "skip"),
                   help="fail: stop at the first bad row, write nothing (to a file; stdout already has the rows "
                        "before it); skip: write the bad rows to a rejects file")
    p.add_argument("--max-prompt-tokens", type=int, metavar="N",
                   help="reject prompts longer than N tokens (needs --tokenizer)")
    p.add_argument("--check-tokens", action="store_true",
                   help="count rows whose prefix tokenizes differently alone than in the prompt (needs --tokenizer)")
    p.add_argument("--pass-rendered", action="store_true",
                   help="copy rows whose `prompt` is already rendered unchanged (default: such a row is an error)")
    p.add_argument("--few-shot", metavar="FILE",
                   help="worked examples (question + answer in the target format, any input format) to put "
                        "before each row")
    p.add_argument("--shots", type=positive_int, default=None, metavar="K",
                   help="examples per row (needs --few-shot; default: 4)")
    p.add_argument("--few-shot-seed", type=int, default=None, metavar="S",
                   help="seed of the per-row choice of examples (default: 0)")
    p.add_argument("--few-shot-mode", choices=("turns", "system"), default=None,
                   help="turns: user/assistant turns before the row's (default); system: text in the system message")
    p.add_argument("--batch-size", type=int, default=1000, metavar="N", help="rows per streamed batch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _json_object(text: str, flag: str) -> dict:
    import json

    from prefill_kit.errors import ConfigError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag}: invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: expected a JSON object")
    return value


def render_options(args: argparse.Namespace):
    """RenderOptions from the options `add_render_options` added (and `--continue-final` where present)."""
    from prefill_kit.errors import ConfigError
    from prefill_kit.prompts.options import resolve_options
    from prefill_kit.prompts.render import decode_escapes

    template_kwargs = _json_object(args.template_kwargs, "--template-kwargs")
    columns = _json_object(args.columns, "--columns")
    if args.prefix_file:
        from prefill_kit.data.io import read_text_file

        prefix = read_text_file(args.prefix_file, "--prefix-file")
    else:
        prefix = decode_escapes(args.prefix)
    if args.tokenizer is None and (args.max_prompt_tokens is not None or args.check_tokens):
        raise ConfigError("--max-prompt-tokens and --check-tokens count tokens: they need --tokenizer")
    if getattr(args, "num_proc", 1) < 1 or args.batch_size < 1:
        raise ConfigError("--num-proc and --batch-size: expected positive integers")
    few_shot_file = args.few_shot
    if few_shot_file is None:
        given = [flag for flag, value in (("--shots", args.shots), ("--few-shot-seed", args.few_shot_seed),
                                          ("--few-shot-mode", args.few_shot_mode))
                 if value is not None]
        if given:
            raise ConfigError(f"{given[0]}: give the examples with --few-shot FILE")
    few_shot = None
    if few_shot_file is not None:
        from prefill_kit.prompts.few_shot import load_few_shot

        try:
            few_shot = load_few_shot(few_shot_file, shots=args.shots or DEFAULT_SHOTS, seed=args.few_shot_seed or 0,
                                     mode=args.few_shot_mode or "turns", prefix=prefix, on_error=args.on_error)
        except ConfigError as exc:  # the library names config keys; on the command line they are flags
            message = str(exc)
            for key, flag in (("few_shot.shots", "--shots"), ("few_shot.seed", "--few-shot-seed"),
                              ("few_shot.mode", "--few-shot-mode")):
                if message.startswith(key + ":"):
                    raise ConfigError(flag + message[len(key):]) from None
            raise
        for skipped in few_shot.skipped:
            print(f"warning: skipped {skipped}", file=sys.stderr)
    return resolve_options(args.template, args.tokenizer, prefix=prefix,
                           continue_final=getattr(args, "continue_final", False), template_kwargs=template_kwargs,
                           format=args.format, columns=columns, on_error=args.on_error,
                           max_prompt_tokens=args.max_prompt_tokens, check_tokens=args.check_tokens,
                           pass_rendered=args.pass_rendered, few_shot=few_shot)


def default_output(source: str, output_format: str | None) -> str:
    """INPUT_STEM.prefilled.jsonl beside the input (.parquet, or a directory, for those formats)."""
    import glob

    from prefill_kit.errors import ConfigError

    path = Path(source)
    if not path.exists() and glob.has_magic(source):
        raise ConfigError(f"input {source} is a glob: give the output with -o")
    stem = path.stem if path.is_file() else path.name
    suffix = {"parquet": ".parquet", "hf": ""}.get(output_format or "jsonl", ".jsonl")
    return str(path.with_name(f"{stem}.prefilled{suffix}"))


def show_prompt(prompt: str, prefix: str, stream) -> None:
    """Print a prompt with its prefix highlighted (reverse video on a terminal, brackets otherwise)."""
    head = prompt[: len(prompt) - len(prefix)] if prefix and prompt.endswith(prefix) else prompt
    tail = prompt[len(head):]
    mark = ("\x1b[7m", "\x1b[0m") if stream.isatty() else ("⟦", "⟧")
    stream.write(f"{head}{mark[0]}{tail}{mark[1]}\n" if tail else f"{head}\n")


def progress_bar(args: argparse.Namespace):
    """A tqdm bar (rows/s, ETA) on stderr when it is a terminal and not --quiet; else None."""
    if args.quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    from prefill_kit.data.readers import count_rows

    return tqdm(total=count_rows(args.input), unit=" rows", file=sys.stderr, dynamic_ncols=True)


def run(args: argparse.Namespace) -> int:
    from prefill_kit.errors import ConfigError, PrefillKitError
    from prefill_kit.prompts.render_file import render_file

    options = render_options(args)
    output = args.output or default_output(args.input, args.output_format)
    parent = Path(output).parent
    if output != "-" and not parent.is_dir():
        raise ConfigError(f"-o {output}: directory {parent} does not exist (create it first)")
    bar = progress_bar(args)
    try:
        summary = render_file(args.input, output, options, output_format_name=args.output_format,
                              num_proc=args.num_proc, batch_size=args.batch_size, sample=max(args.show, 1),
                              progress=bar.update if bar else None)
    except PrefillKitError as exc:
        if output != "-":
            raise
        # A file appears only when complete; stdout streams, so say that what is there is a part.
        raise PrefillKitError(f"{exc} (stdout already holds the rows before it: only a file output is atomic)") \
            from None
    finally:
        if bar is not None:
            bar.close()
    for row in summary.sample[: args.show]:
        print("-" * 60, file=sys.stderr)
        show_prompt(row["prompt"], row["prefix"], sys.stderr)
    print(f"rendered {summary.rows_out} rows  template: {options.template.name}  "
          f"prefix: {options.prefix!r}  output: {output}", file=sys.stderr)
    print(f"rows in: {summary.rows_in}  out: {summary.rows_out}  rejected: {summary.rejected}  "
          f"format: {summary.format}", file=sys.stderr)
    if summary.ids_route is not None:
        print(f"prompt ids: {summary.ids_route}", file=sys.stderr)
    if summary.rejected:
        first = summary.first_reject
        where = f"line {first['line']}" if "line" in first else f"row {first['row']}"
        print(f"rejects: {summary.rejects_path} (first: {first['source']} {where}: {first['reason']})",
              file=sys.stderr)
    if options.few_shot is not None:
        _print_few_shot(options.few_shot, summary, options.max_prompt_tokens)
    if options.check_tokens:
        _print_audit(summary)
    if summary.rows_in and not summary.rows_out:
        raise PrefillKitError(f"all {summary.rows_in} rows were rejected (see {summary.rejects_path})")
    return 0


def _print_few_shot(few_shot, summary, max_prompt_tokens: int | None) -> None:
    trimmed = (f"; {summary.shots_trimmed} rows got fewer to fit --max-prompt-tokens" if max_prompt_tokens is not None
               else "")
    print(f"few-shot: {few_shot.shots} of {len(few_shot.examples)} examples from {few_shot.source} per row "
          f"(mode {few_shot.mode}, seed {few_shot.seed}){trimmed}", file=sys.stderr)
    if summary.shots_short:
        print(f"few-shot: {summary.shots_short} rows got fewer because the file has too few examples with "
              "another question than the row's own", file=sys.stderr)


def _print_audit(summary) -> None:
    print(f"token audit: {summary.boundary_merges} of {summary.rows_out} rows have a boundary merge "
          "(prompt without prefix + prefix tokenize differently from the whole prompt)", file=sys.stderr)
    example = summary.merge_example
    if example is not None:
        print(f"  e.g. {example.where}: whole {example.whole} vs split {example.split}", file=sys.stderr)
