"""Render an input file (any type `prefill_kit.data.readers` reads) to an output file, streaming.

Memory stays bounded whatever the input size: the input is read in chunks of `batch_size` rows,
at most `2 * num_proc` chunks are in flight, and each chunk is written as soon as it and all
chunks before it are done (output order = input order). Bad rows either stop the run (nothing is
written) or go to a rejects file; rows in = rows out + rows rejected.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from prefill_kit.data.io import atomic_output
from prefill_kit.data.readers import DEFAULT_BATCH_SIZE, Chunk, chunk_columns, chunk_records, iter_chunks
from prefill_kit.data.writers import ENCODERS, open_sink, output_format, rejects_path
from prefill_kit.errors import DataError, TemplateError
from prefill_kit.interrupts import ignore_interrupts, interrupts_ignored_by_new_processes, leave_signals_to_parent
from prefill_kit.prompts.pipeline import BatchRenderer, RenderOptions, detect, output_columns
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
class _Job:
    """What a worker needs to turn a chunk into an encoded, ready-to-write result."""

    renderer: BatchRenderer
    encode: Callable
    columns: list[str]
    sample: int

    def __call__(self, chunk: Chunk) -> _ChunkResult:
        records = chunk_records(chunk)
        result = self.renderer(records)
        return _ChunkResult(len(records), len(result.rows), self.encode(result.rows, self.columns), result.rejects,
                            result.merges, result.merge_example, result.rows[: self.sample], result.shots_trimmed,
                            result.shots_short, result.ids_route)


_worker_job: _Job | None = None


def _init_worker(job: _Job, parent: int) -> None:
    global _worker_job
    ignore_interrupts()  # also for a worker the pool starts later to replace one that died
    leave_signals_to_parent(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no thread oversubscription
    _worker_job = job


def _run_in_worker(chunk: Chunk) -> _ChunkResult:
    return _worker_job(chunk)


def _results(job: _Job, chunks: Iterable[Chunk], num_proc: int) -> Iterator[_ChunkResult]:
    """Results in input order; with several processes, at most 2 * num_proc chunks are in flight."""
    if num_proc <= 1:
        yield from map(job, chunks)
        return
    context = multiprocessing.get_context("fork")  # workers inherit the loaded tokenizer and template
    with interrupts_ignored_by_new_processes():
        pool = context.Pool(num_proc, initializer=_init_worker, initargs=(job, os.getpid()))
    with pool:  # leaving it, also by Ctrl-C or a broken pipe, terminates the workers
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_run_in_worker, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _check_template(options: RenderOptions) -> None:
    """With on_error=skip, fail once when the template does not compile, instead of rejecting every row.

    (With on_error=fail the first row raises it anyway, naming that row.)
    """
    import jinja2

    from prefill_kit.templates.sandbox import compile_template

    try:
        compile_template(options.template.source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template {options.template.name}: syntax error at line {exc.lineno}: "
                            f"{exc.message}") from None


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
        _check_template(options)
    chunks = iter(chunks if chunks is not None else iter_chunks(source, batch_size))
    summary = RenderSummary(output=output, output_format=fmt_out)
    # Detect the format from the first readable row; chunks read for that are kept and rendered first.
    seen: list[Chunk] = []
    in_columns = None
    for chunk in chunks:
        seen.append(chunk)
        if (in_columns := chunk_columns(chunk)) is not None:
            break
    if not seen:
        raise DataError("no rows: the input is empty", source=str(source))
    summary.format = detect(in_columns, options) if in_columns is not None else None
    columns = output_columns(in_columns, summary.format, options) if in_columns is not None else ["prompt", "prefix"]
    chunks = chain(seen, chunks)
    job = _Job(BatchRenderer(options, summary.format or "messages"), ENCODERS[fmt_out], columns, sample)
    reject_file = rejects_path(output, str(source))

    with ExitStack() as stack:
        sink = stack.enter_context(open_sink(output, fmt_out, columns))
        rejects = None
        # Closed first on the way out (Ctrl-C, a broken pipe, a bad row): the workers stop before the temp files go.
        results = stack.enter_context(closing(_results(job, chunks, num_proc)))
        for result in results:
            sink.write(result.payload)
            if result.rejects:
                if rejects is None:
                    rejects = stack.enter_context(atomic_output(reject_file))
                    summary.rejects_path = str(reject_file)
                    summary.first_reject = result.rejects[0]
                rejects.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in result.rejects)
            _tally(summary, result, sample)
            if progress is not None:
                progress(result.rows_in)
    if rejects is None:  # this run rejected nothing: a rejects file from an earlier run would mislead
        Path(reject_file).unlink(missing_ok=True)
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


