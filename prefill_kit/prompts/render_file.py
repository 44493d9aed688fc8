"""Render an input file (any type `prefill_kit.data.readers` reads) to an output file, streaming.

Memory stays bounded whatever the input size: the input is read in chunks of `batch_size` rows,
at most `2 * num_proc` chunks are in flight (`prefill_kit.prompts.stream`), and each chunk is written as
soon as it and all chunks before it are done (output order = input order). Bad rows either stop the run (nothing is
written) or go to a rejects file; rows in = rows out + rows rejected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefill_kit.data.readers import DEFAULT_BATCH_SIZE, Chunk, Record, iter_chunks
from prefill_kit.data.writers import ENCODERS, open_sink, output_format, rejects_file, rejects_path
from prefill_kit.errors import DataError
from prefill_kit.prompts.batch import BatchResult
from prefill_kit.prompts.options import RenderOptions, check_template, output_columns
from prefill_kit.prompts.stream import open_stream, render_stream
from prefill_kit.prompts.tokens import BoundaryMerge


@dataclass
class RenderSummary:
    """What a run did: the counts (rows_in == rows_out + rejected), where things went, the token audit."""

    rows_in: int = 0
    rows_out: int = 0
    rejected: int = 0
    format: str | None = None
    output: str = ""
    output_format: str = "jsonl"
    rejects_path: str | None = None
    first_reject: dict[str, Any] | None = None
    boundary_merges: int = 0
    merge_example: BoundaryMerge | None = None
    sample: list[dict[str, Any]] = field(default_factory=list)
    shots_trimmed: int = 0  # rows given fewer few-shot examples to fit max_prompt_tokens
    shots_short: int = 0  # rows with fewer examples than asked because too few ask another question
    ids_route: str | None = None  # how prompt_ids were computed (`PromptTokenizer.route`)


@dataclass
class _ChunkResult:
    rows_in: int
    rows_out: int
    payload: Any
    rejects: list[dict[str, Any]]
    merges: int
    merge_example: BoundaryMerge | None
    sample: list[dict[str, Any]]
    shots_trimmed: int
    shots_short: int
    ids_route: str | None


@dataclass(frozen=True)
class _Finish:
    """Runs where the chunk rendered: its rows encoded for the writer, and what the summary needs."""

    encode: Callable
    columns: list[str]
    sample: int

    def __call__(self, records: list[Record], result: BatchResult) -> _ChunkResult:
        return _ChunkResult(len(records), len(result.rows), self.encode(result.rows, self.columns), result.rejects,
                            result.merges, result.merge_example, result.rows[: self.sample], result.shots_trimmed,
                            result.shots_short, result.ids_route)


def render_file(source: str | Path, output: str, options: RenderOptions, *, output_format_name: str | None = None,
                num_proc: int = 1, batch_size: int = DEFAULT_BATCH_SIZE, sample: int = 5,
                progress: Callable[[int], None] | None = None, chunks: Iterable[Chunk] | None = None) -> RenderSummary:
    """Render every row of `source` into `output` ('-' for stdout).

    With `options.on_error == "fail"` the first bad row raises DataError (file, line or row, field,
    reason) and no output is left behind; with "skip" bad rows go to OUTPUT_STEM.rejects.jsonl.
    `progress(n)` is called after each chunk with its number of input rows. `chunks` replaces
    reading `source` (tests use it to watch how far reading runs ahead of writing).
    """
    fmt_out = output_format(output, output_format_name)
    if options.on_error == "skip":
        check_template(options)
    stream = open_stream(chunks if chunks is not None else iter_chunks(source, batch_size), options)
    if stream.empty:
        raise DataError("no rows: the input is empty", source=str(source))
    summary = RenderSummary(output=output, output_format=fmt_out, format=stream.fmt)
    columns = output_columns(stream.columns, stream.fmt, options) if stream.fmt is not None else ["prompt", "prefix"]
    finish = _Finish(ENCODERS[fmt_out], columns, sample)

    with ExitStack() as stack:
        sink = stack.enter_context(open_sink(output, fmt_out, columns))
        rejects = stack.enter_context(rejects_file(rejects_path(output, str(source))))
        # Closed first on the way out (Ctrl-C, a broken pipe, a bad row): the workers stop before the temp files go.
        results = stack.enter_context(closing(render_stream(stream, options, finish, num_proc=num_proc)))
        for result in results:
            sink.write(result.payload)
            rejects.write(result.rejects)
            _tally(summary, result, sample)
            if progress is not None:
                progress(result.rows_in)
    if rejects.count:
        summary.rejects_path, summary.first_reject = str(rejects.path), rejects.first
    return summary


def _tally(summary: RenderSummary, result: _ChunkResult, sample: int) -> None:
    summary.rows_in += result.rows_in
    summary.rows_out += result.rows_out
    summary.rejected += len(result.rejects)
    summary.boundary_merges += result.merges
    summary.shots_trimmed += result.shots_trimmed
    summary.shots_short += result.shots_short
    summary.merge_example = summary.merge_example or result.merge_example
    summary.ids_route = summary.ids_route or result.ids_route
    summary.sample.extend(result.sample[: sample - len(summary.sample)])
    if summary.rows_in != summary.rows_out + summary.rejected:  # a bookkeeping bug, never bad data
        raise AssertionError(f"rows in {summary.rows_in} != out {summary.rows_out} + rejected {summary.rejected}")


