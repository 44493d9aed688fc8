"""Render a Hugging Face dataset (or a path to data) into a `datasets.Dataset`: the library's front end, as
`render_file` is the command line's. Rows go through the same `BatchRenderer`; with `num_proc` the dataset is
cut into contiguous shards rendered by `prefill_kit.prompts.stream`'s process pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from typing import Any

from prefill_kit.data.readers import Record, _load_from_disk, first_unreadable_line, resolve_inputs
from prefill_kit.data.writers import to_columns
from prefill_kit.errors import DataError
from prefill_kit.prompts.batch import BatchRenderer
from prefill_kit.prompts.few_shot import FewShot
from prefill_kit.prompts.options import detect, output_columns, resolve_options
from prefill_kit.prompts.stream import decide_ids_route, ordered_map

logger = logging.getLogger(__name__)


class _MapRenderer:
    """`datasets.map` function: a column batch in, rendered columns out (fewer rows when skipping)."""

    def __init__(self, renderer: BatchRenderer, columns: list[str], out_columns: list[str], offset: int = 0) -> None:
        self.renderer = renderer
        self.columns = columns
        self.out_columns = out_columns
        self.offset = offset  # index of the first row of the shard this renders, for error messages

    def records(self, batch: dict[str, list], indices: list[int]) -> list[Record]:
        values = [batch[c] for c in self.columns]
        offset = self.offset
        return [Record("dataset", "row", i + offset + 1, dict(zip(self.columns, row, strict=True)),  # 1-based
                       index=i + offset)
                for i, row in zip(indices, zip(*values, strict=True), strict=True)]

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        result = self.renderer(self.records(batch, indices))
        for reject in result.rejects:
            logger.warning("skipped dataset row %s: %s%s", reject["row"],
                           f"field {reject['field']!r}: " if reject["field"] else "", reject["reason"])
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
    function = _MapRenderer(BatchRenderer(options, fmt), in_columns, output_columns(in_columns, fmt, options))
    if isinstance(data, datasets.Dataset) and num_proc and num_proc > 1:
        shards = shard_bounds(len(data), num_proc, batch_size)
        if len(shards) > 1 and "fork" in multiprocessing.get_all_start_methods():
            return _map_in_processes(data, function, shards, batch_size)
    return data.map(function, batched=True, batch_size=batch_size, with_indices=True, remove_columns=in_columns)


def shard_bounds(rows: int, num_proc: int, batch_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges, one per process, none smaller than about one batch."""
    n = max(1, min(num_proc, -(-rows // batch_size)))
    return [(rows * i // n, rows * (i + 1) // n) for i in range(n)]


def _map_in_processes(data, function: _MapRenderer, shards: list[tuple[int, int]], batch_size: int):
    """`data.map(function)` over contiguous shards in forked processes, concatenated in input order.

    Why not `Dataset.map(num_proc=...)`: it pickles the function, tokenizer included, for every shard and
    hashes it for a fingerprint, which costs seconds per call. Forked workers inherit the function and
    the data instead, and each writes its own Arrow file (in datasets' temporary cache directory, removed
    at exit), so only file names cross the process boundary.
    """
    import datasets
    from datasets.fingerprint import generate_random_fingerprint, get_temporary_cache_files_directory

    head = min(len(data), function.renderer.calibration_rows)
    decide_ids_route(function.renderer, function.records(data[:head], list(range(head))))
    job = _ShardJob(data, function, shards, batch_size, get_temporary_cache_files_directory(),
                    generate_random_fingerprint())
    paths = list(ordered_map(job, range(len(shards)), len(shards)))
    return datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in paths])


class _ShardJob:
    """Worker: render shard `index` of `data` into its own Arrow file and return its path."""

    def __init__(self, data, function: _MapRenderer, shards: list[tuple[int, int]], batch_size: int,
                 directory: str, fingerprint: str) -> None:
        self.data, self.function, self.shards, self.batch_size = data, function, shards, batch_size
        self.directory, self.fingerprint = directory, fingerprint

    def __call__(self, index: int) -> str:
        start, stop = self.shards[index]
        path = os.path.join(self.directory, f"prefill-kit-{self.fingerprint}-{index:05d}.arrow")
        parent = self.function.renderer  # its encoder (cutter, memo) is inherited; its thread is not
        renderer = BatchRenderer(parent.options, parent.fmt, parent.encoder)
        function = _MapRenderer(renderer, self.function.columns, self.function.out_columns, offset=start)
        self.data.select(range(start, stop)).map(function, batched=True, batch_size=self.batch_size,
                                                 with_indices=True, remove_columns=self.function.columns,
                                                 cache_file_name=path, new_fingerprint=f"{self.fingerprint}-{index}")
        return path
