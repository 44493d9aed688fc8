"""Render a Hugging Face dataset (or a path to data) into a `datasets.Dataset`: the library's front end, as
`render_file` is the command line's. Rows go through the same `BatchRenderer` and the same in-process overlap of
rendering and tokenizing (`prefill_kit.prompts.stream.render_chunks`), written batch by batch with the `ArrowWriter`
that `Dataset.map` writes with; with `num_proc` the dataset is cut into contiguous shards, each rendered so in a
process of its own (this one renders the first).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

from prefill_kit.data.readers import (
    Chunk,
    Record,
    _load_from_disk,
    chunk_records,
    first_unreadable_line,
    resolve_inputs,
)
from prefill_kit.data.writers import to_columns
from prefill_kit.errors import DataError
from prefill_kit.prompts.batch import BatchRenderer, BatchResult
from prefill_kit.prompts.few_shot import FewShot
from prefill_kit.prompts.options import detect, output_columns, resolve_options
from prefill_kit.prompts.stream import decide_ids_route, map_here_and_forked, render_chunks

logger = logging.getLogger(__name__)
SOURCE = "dataset"  # how rows of a dataset are named in errors: "dataset row 3"


def _log_rejects(result: BatchResult) -> None:
    for reject in result.rejects:
        logger.warning("skipped dataset row %s: %s%s", reject["row"],
                       f"field {reject['field']!r}: " if reject["field"] else "", reject["reason"])


class _MapRenderer:
    """`IterableDataset.map` function: a column batch in, rendered columns out (fewer rows when skipping)."""

    def __init__(self, renderer: BatchRenderer, columns: list[str], out_columns: list[str]) -> None:
        self.renderer = renderer
        self.columns = columns
        self.out_columns = out_columns

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        values = [batch[c] for c in self.columns]
        records = [Record(SOURCE, "row", i + 1, dict(zip(self.columns, row, strict=True)), index=i)  # 1-based
                   for i, row in zip(indices, zip(*values, strict=True), strict=True)]
        result = self.renderer(records)
        _log_rejects(result)
        return to_columns(result.rows, self.out_columns)


def as_dataset(data):
    import datasets

    if isinstance(data, datasets.Dataset | datasets.IterableDataset):
        return data
    inputs = resolve_inputs(data)
    kinds = {kind for _, kind in inputs}
    if kinds == {"hf"} and len(inputs) == 1:
        return _load_from_disk(inputs[0][0])
    builder = {"jsonl": "json", "json": "json"}.get(next(iter(kinds)), next(iter(kinds)))
    if len(kinds) != 1 or builder == "hf":
        raise DataError(f"mixes input types {sorted(kinds)}; pass shards of one type", source=str(data))
    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p, _ in inputs], split="train")
    except Exception as exc:  # datasets wraps parser errors in many types; name the input
        if builder == "json" and kinds == {"jsonl"}:
            for path, _ in inputs:  # the located error (line, column in the line), not pyarrow's "row 1"
                if (located := first_unreadable_line(path)) is not None:
                    raise located from None
        raise DataError(f"cannot load as {builder}: {exc}", source=str(data)) from None


def render_dataset(data, template=None, tokenizer=None, prefix: str = "", *, continue_final: bool = False,
                   template_kwargs: dict[str, Any] | None = None, format: str = "auto",
                   columns: dict[str, str] | None = None, on_error: str = "fail",
                   max_prompt_tokens: int | None = None, num_proc: int | None = None,
                   batch_size: int = 1000, few_shot: FewShot | None = None):
    """Render a `datasets.Dataset` / `IterableDataset`, or a path to data (any type `prefill-kit render` reads).

    Returns a `Dataset` (an `IterableDataset` for an iterable input) with `prompt`, `prefix`, every
    non-conversation column, `solution` and, with a tokenizer, `prompt_ids` and `num_prompt_tokens`;
    for `GRPOTrainer(train_dataset=...)` pass `prefill_kit.exact_ids_tokenizer(tokenizer)` as its
    `processing_class`, or TRL adds a second BOS on BOS-adding tokenizers. Bad rows raise DataError naming the row,
    or with `on_error="skip"` are dropped and logged (logger `prefill_kit.prompts.dataset`).
    `few_shot` (`prefill_kit.prompts.few_shot.load_few_shot`) puts worked examples before each row and adds
    `few_shot_indices`.
    """
    import datasets

    data = as_dataset(data)
    options = resolve_options(template, tokenizer, prefix=prefix, continue_final=continue_final,
                              template_kwargs=dict(template_kwargs or {}), format=format, columns=dict(columns or {}),
                              on_error=on_error, max_prompt_tokens=max_prompt_tokens, few_shot=few_shot)
    in_columns = data.column_names or list(next(iter(data)).keys())
    fmt = detect(in_columns, options)
    renderer, out_columns = BatchRenderer(options, fmt), output_columns(in_columns, fmt, options)
    if not isinstance(data, datasets.Dataset):  # an IterableDataset renders lazily, a batch at a time as it is read
        return data.map(_MapRenderer(renderer, in_columns, out_columns), batched=True, batch_size=batch_size,
                        with_indices=True, remove_columns=in_columns)
    if len(data) == 0:  # what Dataset.map returns for no rows
        return data.remove_columns(in_columns)
    from datasets.arrow_dataset import transmit_format  # imported here: datasets loads only when data does

    forks = "fork" in multiprocessing.get_all_start_methods()
    shards = shard_bounds(len(data), num_proc or 1, batch_size) if forks else [(0, len(data))]
    job = _TableJob(data, renderer, out_columns, shards, batch_size)
    return transmit_format(_render_table)(data, job)  # the output keeps the input's format, as Dataset.map's does


def shard_bounds(rows: int, num_proc: int, batch_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges, one per process, none smaller than about one batch."""
    n = max(1, min(num_proc, -(-rows // batch_size)))
    return [(rows * i // n, rows * (i + 1) // n) for i in range(n)]


def _render_table(data, job: _TableJob):
    """The rendered dataset: in this process, or one process per shard (this one and forked workers), each
    writing its own Arrow file (in datasets' temporary cache directory, removed at exit), concatenated in input
    order.

    Why not `Dataset.map(num_proc=...)`: it pickles the function, tokenizer included, for every shard and hashes it
    for a fingerprint, which costs seconds per call; forked workers inherit the renderer and the data instead, so
    only file names cross the process boundary. The parent decides the ids route on the first rows before forking.
    """
    import datasets

    if len(job.shards) == 1:
        return job.in_this_process()
    if head := min(len(data), job.renderer.calibration_rows):
        decide_ids_route(job.renderer, chunk_records(next(_chunks(data, 0, head, head))))
    paths = map_here_and_forked(job, list(range(len(job.shards))))
    return datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in paths])


def _chunks(data, start: int, stop: int, batch_size: int) -> Iterator[Chunk]:
    """Rows [start, stop) of `data` as chunks of `batch_size`, formatted as `Dataset.map` formats its batches
    (the dataset's own format type, every column), each row located by its 1-based row in `data`."""
    formatted = data.with_format(data.format["type"], **data.format["format_kwargs"])
    columns = data.column_names
    for offset in range(start, stop, batch_size):
        batch = formatted[offset:min(offset + batch_size, stop)]
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*(batch[c] for c in columns), strict=True)]
        yield Chunk(SOURCE, "row", start=offset, rows=rows, index=offset)


class _TableJob:
    """Renders a shard of `data` and writes it as `Dataset.map` writes its output: with the `ArrowWriter` given the
    input's features (a passed-through column keeps its type), to a file or, for an input held in memory, to memory.
    As a worker's job, `job(index)` writes shard `index` to a file and returns its path."""

    def __init__(self, data, renderer: BatchRenderer, out_columns: list[str], shards: list[tuple[int, int]],
                 batch_size: int) -> None:
        from datasets.fingerprint import generate_random_fingerprint, get_temporary_cache_files_directory

        self.data, self.renderer, self.out_columns, self.shards = data, renderer, out_columns, shards
        self.batch_size = batch_size
        self.directory, self.fingerprint = get_temporary_cache_files_directory(), generate_random_fingerprint()

    def __call__(self, index: int) -> str:
        self._write(index, path=self._path(index))
        return self._path(index)

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, f"prefill-kit-{self.fingerprint}-{index:05d}.arrow")

    def in_this_process(self):
        """The one shard rendered here, as a `Dataset` (memory-mapped from a file when `data` is)."""
        import datasets
        import pyarrow as pa
        from datasets.table import InMemoryTable, MemoryMappedTable

        if self.data.cache_files:
            features = self._write(0, path=self._path(0))
            table = MemoryMappedTable.from_file(self._path(0))
        else:
            buffer = pa.BufferOutputStream()
            features = self._write(0, stream=buffer)
            table = InMemoryTable.from_buffer(buffer.getvalue())
        info = self.data.info.copy()
        info.features = features
        return datasets.Dataset(table, info=info, split=self.data.split, fingerprint=self.fingerprint)

    def _write(self, index: int, **sink: Any):
        """Shard `index` rendered into `sink` (`path=` or `stream=`); the features written."""
        from datasets.arrow_writer import ArrowWriter

        start, stop = self.shards[index]
        with ArrowWriter(features=self.data.features, update_features=True, fingerprint=self.fingerprint,
                         **sink) as writer:
            for columns in render_chunks(self.renderer, _chunks(self.data, start, stop, self.batch_size),
                                         self._columns):
                writer.write_batch(columns)
            writer.finalize()
            return writer._features

    def _columns(self, records: list[Record], result: BatchResult) -> dict[str, Any]:
        import pyarrow as pa

        _log_rejects(result)
        columns = to_columns(result.rows, self.out_columns)
        if "prompt_ids" in columns and "prompt_ids" not in self.data.features:
            # handed over as Arrow, of the type the writer infers from Python lists, which it checks id by id in
            # Python (an input's own prompt_ids column keeps its type: those go as lists, as Dataset.map gives them)
            columns["prompt_ids"] = pa.array(columns["prompt_ids"], type=pa.list_(pa.int64()))
        return columns
