"""Render a JSON Lines file to a JSON Lines file (or stdout), all or nothing."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from prefill_kit.errors import DataError, PrefillKitError
from prefill_kit.formats import detect_format
from prefill_kit.io import atomic_output, dump_json_line, iter_jsonl
from prefill_kit.pipeline import RenderOptions, add_prompt_ids, render_row

CHUNK = 1024


@dataclass
class RenderSummary:
    rows_out: int = 0
    sample: list[dict[str, Any]] = field(default_factory=list)


def render_jsonl(source: str | Path, output: str, options: RenderOptions, *, sample: int = 5) -> RenderSummary:
    """Render every row of `source`; the first bad row raises DataError with file, line and field,
    and no output file is left behind."""
    summary = RenderSummary()
    rows = iter_jsonl(source)
    fmt = options.format

    def chunks():
        nonlocal fmt
        while batch := list(islice(rows, CHUNK)):
            if fmt == "auto":
                fmt = detect_format(batch[0][1])
            out = []
            for line, row in batch:
                try:
                    out.append(render_row(row, options, fmt))
                except DataError as exc:
                    raise exc.located(source=str(source), line=line) from None
                except PrefillKitError as exc:
                    raise type(exc)(f"{source}:{line}: {exc}") from None
            if options.tokenizer is not None:
                add_prompt_ids(out, options.tokenizer)
            yield out

    def write(f) -> None:
        for out in chunks():
            f.writelines(dump_json_line(r) for r in out)
            summary.rows_out += len(out)
            summary.sample.extend(out[: sample - len(summary.sample)])

    if output == "-":
        write(sys.stdout)
    else:
        with atomic_output(output) as f:
            write(f)
    return summary
