"""`prefill-kit reward INPUT --rewards format,accuracy`: score completions offline with the training rewards."""

from __future__ import annotations

import argparse
import sys
from typing import Any

_LOWEST_SHOWN = 3


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("reward", help="score a JSONL of completions with the reward functions",
                       description=__doc__)
    p.add_argument("input", help="JSONL rows with `completion` (+ `solution`, `prefix`, `prompt` where needed)")
    p.add_argument("--rewards", required=True,
                   help="reward spec, e.g. 'format,accuracy:2.0' or 'pkg.module:function:0.5'")
    p.add_argument("--prefix", default=None,
                   help=r"response prefix for rows without a `prefix` column; \n \t \r \\ \uXXXX are decoded")
    p.add_argument("--completions-include-prefix", action="store_true",
                   help="the completions already start with the prefix (e.g. ms-swift's): score them as they are")
    p.add_argument("-o", "--output", default=None, help="write rows + one column per reward + `reward` (JSONL)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw the reward histograms")
    p.set_defaults(func=run)
    return p


def read_rows(path: str) -> tuple[list[int], list[dict[str, Any]]]:
    """The 1-based line of each row of INPUT, and the rows; a row without a usable `completion` is an error
    naming its line. Lines, not row counts, name rows here as in `render`, so blank lines do not shift them."""
    from prefill_kit.data.io import iter_jsonl
    from prefill_kit.errors import DataError

    lines, rows = [], []
    for line, row in iter_jsonl(path):
        completion = row.get("completion")
        if not isinstance(completion, str | list):
            got = "missing" if completion is None else f"a {type(completion).__name__}"
            raise DataError(f"expected a string or a list of messages, got {got}", source=path, line=line,
                            field="completion")
        lines.append(line)
        rows.append(row)
    if not rows:
        raise DataError("no rows", source=path)
    return lines, rows


def score_rows(rows: list[dict[str, Any]], rewards, prefix: str | None, *,
               completions_include_prefix: bool = False) -> dict[str, list[float | None]]:
    """One score list per reward name, plus the weighted total `reward` (None rewards left out, as TRL's nansum).

    Rewards score `prefix + completion`; with `completions_include_prefix` they get no prefix at all.
    """
    completions = [row["completion"] for row in rows]
    columns = {key: [row.get(key) for row in rows] for row in rows for key in row if key != "completion"}
    if completions_include_prefix:
        columns.pop("prefix", None)
    else:
        columns["prefix"] = [row.get("prefix", prefix) for row in rows]
    scores = {w.name: list(w.fn(completions, **columns)) for w in rewards}
    totals: list[float | None] = []
    for i in range(len(rows)):
        parts = [w.weight * scores[w.name][i] for w in rewards if scores[w.name][i] is not None]
        totals.append(sum(parts) if parts else None)
    scores["reward"] = totals
    return scores


def rows_starting_with_prefix(rows: list[dict[str, Any]], prefix: str | None) -> tuple[int, int]:
    """How many completions already start with the prefix they are scored after, of those that have a prefix."""
    from prefill_kit.rewards.response import completion_text

    with_prefix = [(completion_text(row["completion"]), p) for row in rows if (p := row.get("prefix", prefix))]
    return sum(text.startswith(p) for text, p in with_prefix), len(with_prefix)


def _summary(name: str, values: list[float | None], timeouts: int | None) -> str:
    import statistics

    present = [v for v in values if v is not None]
    mean = statistics.fmean(present) if present else float("nan")
    std = statistics.pstdev(present) if present else float("nan")
    none_share = 1 - len(present) / len(values)
    return f"{name:<28} {mean:>8.4f} {std:>8.4f} {none_share:>7.1%} {'-' if timeouts is None else timeouts:>9}"


def histogram_title(label: str, values: list[float | None]) -> str:
    """A histogram's title: what it shows and how many rows it leaves out because their score is None."""
    missing = sum(v is None for v in values)
    return f"{label}\n{missing} of {len(values)} None (not drawn)" if missing else f"{label}\nall {len(values)} scored"


def _plot(scores: dict[str, list[float | None]], labels: dict[str, str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefill_kit.data.io import atomic_output

    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3.2), squeeze=False, constrained_layout=True)
    for ax, (name, values) in zip(axes[0], scores.items(), strict=True):
        present = [v for v in values if v is not None]
        if present:
            ax.hist(present, bins=20)
        else:
            ax.text(0.5, 0.5, "no scores: every row is None", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(histogram_title(labels[name], values), fontsize=9)
        ax.set_xlabel("score")
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # row counts
    axes[0][0].set_ylabel("rows")
    with atomic_output(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import json

    from prefill_kit.data.io import atomic_output
    from prefill_kit.errors import ConfigError
    from prefill_kit.prompts.render import decode_escapes
    from prefill_kit.rewards import parse_reward_spec
    from prefill_kit.rewards.response import completion_text

    if args.completions_include_prefix and args.prefix is not None:
        raise ConfigError("--prefix and --completions-include-prefix: give one (the second says there is none to add)")
    if args.plot:
        from prefill_kit.extras import require_train

        require_train("prefill-kit reward --plot", ("matplotlib",))
    rewards = parse_reward_spec(args.rewards)
    lines, rows = read_rows(args.input)
    prefix = decode_escapes(args.prefix) if args.prefix is not None else None
    scores = score_rows(rows, rewards, prefix, completions_include_prefix=args.completions_include_prefix)
    if not args.completions_include_prefix:
        doubled, total = rows_starting_with_prefix(rows, prefix)
        if doubled * 2 > total:
            print(f"warning: {doubled} of {total} completions already start with their prefix, so the rewards see "
                  "it twice (prefix + completion) and a format reward fails on them; if your completions include "
                  "the prefix (ms-swift's do), pass --completions-include-prefix", file=sys.stderr)

    print(f"{len(rows)} rows from {args.input}")
    print(f"{'reward':<28} {'mean':>8} {'std':>8} {'None':>7} {'timeouts':>9}")
    for w in rewards:
        stats = getattr(w.fn, "stats", None) or getattr(getattr(w.fn, "accuracy", None), "stats", None)
        print(_summary(f"{w.name} (x{w.weight:g})", scores[w.name], stats.timeouts if stats else None))
    print(_summary("reward (weighted)", scores["reward"], None))

    ranked = sorted((i for i, v in enumerate(scores["reward"]) if v is not None), key=lambda i: scores["reward"][i])
    if ranked:
        print(f"\nlowest-scoring rows (of {len(ranked)} scored):")
    for i in ranked[:_LOWEST_SHOWN]:
        text = completion_text(rows[i]["completion"]).replace("\n", " ")
        shown = text if len(text) <= 160 else text[:60] + " ... " + text[-95:]
        per = ", ".join(f"{w.name}={scores[w.name][i]}" for w in rewards)
        print(f"  {args.input}:{lines[i]}: reward={scores['reward'][i]:.4f} ({per})\n    {shown}")

    if args.output:
        names = [w.name for w in rewards] + ["reward"]
        with atomic_output(args.output) as f:
            for i, row in enumerate(rows):
                out = dict(row)
                out.update({name: scores[name][i] for name in names})
                f.write(json.dumps(out, ensure_ascii=False) + "\n")
        print(f"\nwrote {len(rows)} rows to {args.output}", file=sys.stderr)
    if args.plot:
        labels = {w.name: f"{w.name} (x{w.weight:g})" for w in rewards} | {"reward": "reward (weighted total)"}
        _plot(scores, labels, args.plot)
        print(f"wrote histograms to {args.plot}", file=sys.stderr)
    return 0
